"""The shipped default policies: which rows of the shared data pool feed which probe, and why.

Every recipe is a list of picks (source, filter, label for this policy, cap). Sampling under a cap is
deterministic (rows ordered by a hash of their text), so smaller caps take subsets of larger ones and
the policies share most of their benign rows, which are then extracted once. A row picked twice with
different labels keeps the label of its first pick (picks are listed most specific first).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from probes.data import Dataset, Row
from probes.eval.sources import read_source

SELF_HARM = re.compile(
    r"suicid|self[- ]?harm|kill(ing)? (my|your|them|him|her)sel|end (my|your|their|his|her) (own )?life|"
    r"cut(ting)? (my|your|them)sel|overdos|anorexi|bulimi|eating disorder|starv(e|ing) (my|your|them)sel|"
    r"hang (my|your|them)sel|slit (my|your) wrist",
    re.IGNORECASE,
)
WEAPONS = re.compile(
    r"\bbombs?\b|explosive|\bIEDs?\b|detonat|nerve agent|sarin|\bVX\b|ricin|anthrax|botulinum|smallpox|"
    r"bio(logical)?[- ]?weapon|chemical weapon|chemical warfare|biological warfare|weapons? of mass destruction|"
    r"nuclear (weapon|bomb|device)|dirty bomb|radiolog|enriched uranium|plutonium|mustard gas|nerve gas|"
    r"pathogen|toxin|napalm|grenade",
    re.IGNORECASE,
)
HARMFUL_REQUESTS = ("advbench", "harmbench", "strongreject", "malicious_instruct", "do_not_answer", "ailuminate")


def _any(_: Row) -> bool:
    return True


# The shipped policies' layers, chosen on the leave-one-dataset-out table (docs/policies.md): mean-pooled
# layers 9, 15 and 21 concatenated beat the best layer of a sweep on unseen sources.
PRESET_LAYERS = (9, 15, 21)


@dataclass(frozen=True)
class Pick:
    source: str
    label: int
    where: Callable[[Row], bool] = _any
    cap: int | None = None
    why: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    picks: tuple[Pick, ...]
    heldout: tuple[str, ...] = field(default=())
    stage: str = "prompt"  # what its rows are: user prompts, or assistant replies ("output", rows with a prompt)
    pooling: str | None = None  # how its probe reads a row, when not the command's (``probes.features``)
    max_text_tokens: int | None = None  # how much of a row it reads, when not the command's
    # its threshold rule, when the command names none: at most this share of dev negatives, and of dev ordinary
    # traffic, above the threshold (``probes.train.TrainConfig``)
    target_fpr: float | None = None
    traffic_fpr: float | None = None

    def rows(self, data_dir: Path) -> tuple[Dataset, dict]:
        """The policy's rows and a provenance record (per-pick counts, conflicts resolved)."""
        cache: dict[str, list[Row]] = {}
        chosen: dict[str, Row] = {}
        counts = []
        conflicts = 0
        for pick in self.picks:
            if pick.source not in cache:
                cache[pick.source] = read_source(pick.source, data_dir)
            rows = sorted((r for r in cache[pick.source] if pick.where(r)), key=_hash_order)
            taken = 0
            for row in rows:
                if pick.cap is not None and taken >= pick.cap:
                    break
                previous = chosen.get(row.key)
                if previous is None:
                    chosen[row.key] = Row(row.text, pick.label, row.prompt, row.category, row.source)
                    taken += 1
                elif previous.label != pick.label:
                    conflicts += 1
            counts.append({"source": pick.source, "label": pick.label, "rows": taken, "why": pick.why})
        provenance = {
            "preset": self.name,
            "picks": counts,
            "label_conflicts_skipped": conflicts,
            "heldout_sources": list(self.heldout),
        }
        return Dataset(tuple(chosen.values())), provenance


def _hash_order(row: Row) -> str:
    return hashlib.sha256(row.key.encode()).hexdigest()


def _category(*names: str) -> Callable[[Row], bool]:
    return lambda r: r.category in names


def _matches(pattern: re.Pattern[str]) -> Callable[[Row], bool]:
    return lambda r: bool(pattern.search(r.text))


def _avoids(pattern: re.Pattern[str]) -> Callable[[Row], bool]:
    return lambda r: not pattern.search(r.text)


def _labelled(label: int) -> Callable[[Row], bool]:
    """Rows the source itself labels ``label`` (1 harmful, 0 benign)."""
    return lambda r: r.label == label


_NOT_HARMFUL_DNA = ("Treat Chatbot as a Human",)

HARMFUL_REQUEST = Recipe(
    name="harmful_request",
    description="Requests for help with harmful, dangerous or illegal acts, versus ordinary instructions and chat.",
    picks=(
        Pick("advbench", 1, why="harmful instructions"),
        Pick("harmbench", 1, lambda r: r.category != "copyright", why="harmful behaviours; copyright is not harm"),
        Pick("strongreject", 1, why="forbidden prompts, 6 categories"),
        Pick("malicious_instruct", 1, why="malicious questions"),
        Pick(
            "do_not_answer",
            1,
            lambda r: not r.category.startswith(_NOT_HARMFUL_DNA),
            cap=500,
            why="risky requests; 'treat chatbot as a human' is not harmful",
        ),
        Pick("ailuminate", 1, cap=600, why="hazard prompts incl. adversarial phrasing"),
        Pick("toxicchat", 0, _labelled(0), cap=1200, why="real user traffic: what ordinary prompts look like"),
        Pick("alpaca", 0, cap=1500, why="benign instructions"),
        Pick("medicheck_neg", 0, cap=300, why="ordinary Reddit questions"),
    ),
    heldout=("safety_tuned_llamas",),
)

JAILBREAK = Recipe(
    name="jailbreak",
    description=(
        "Requests for harmful help, plain or wrapped in a jailbreak template or an adversarial suffix, read where "
        "the model is about to answer; the same requests wrapped benign are not."
    ),
    picks=(
        *HARMFUL_REQUEST.picks,
        Pick("jailbreak_wrapped", 1, _labelled(1), why="harmful requests inside jailbreak templates and suffixes"),
        Pick(
            "jailbreak_wrapped", 0, _labelled(0), why="benign instructions in the same wrappers: a wrapper is not harm"
        ),
    ),
    heldout=HARMFUL_REQUEST.heldout,
    pooling="tail",  # the mean over a long template barely moves with the request inside it
    max_text_tokens=2048,  # the whole template, whose request may come last
    # looser than the others': the dev traffic rule binds, and at 1% / 1.5% it catches half the wrapped requests
    # of template families it never saw; the set still keeps its traffic budget (docs/policies.md)
    target_fpr=0.05,
    traffic_fpr=0.03,
)

HATE = Recipe(
    name="hate",
    description="Hateful statements about protected groups, versus neutral, counter-speech and quoting statements.",
    picks=(
        Pick("hatecheck", 1, _labelled(1), cap=1200, why="29 functional tests of hate"),
        Pick("hatecheck", 0, _labelled(0), why="hard negatives: counter-speech, quotes, reclaimed slurs, negation"),
        Pick("toxigen", 1, _labelled(1), why="implicit hate"),
        Pick("toxigen", 0, _labelled(0), why="topic-matched neutral statements about the same groups"),
        Pick("davidson", 1, _category("hate"), cap=500, why="hate speech tweets"),
        Pick("davidson", 0, _category("neither"), cap=500, why="tweets that are neither hateful nor offensive"),
        Pick("toxicchat", 0, _labelled(0), cap=400, why="ordinary user traffic"),
        Pick("alpaca", 0, cap=400, why="benign instructions"),
    ),
)

SELF_HARM_POLICY = Recipe(
    name="self_harm",
    description="Suicide and self-harm: requests for means or encouragement, and statements of intent.",
    picks=(
        Pick("ailuminate", 1, _category("ssh"), why="suicide & self-harm hazard prompts"),
        Pick("do_not_answer", 1, lambda r: "Self-Harm" in (r.category or ""), why="self-harm requests"),
        *(Pick(s, 1, _matches(SELF_HARM), why="harmful requests that mention self-harm") for s in HARMFUL_REQUESTS),
        *(
            Pick(s, 0, _avoids(SELF_HARM), cap=150, why="other harms: the policy must be specific")
            for s in HARMFUL_REQUESTS
        ),
        Pick("medicheck", 0, _avoids(SELF_HARM), cap=300, why="medical questions without self-harm"),
        Pick("toxicchat", 0, lambda r: r.label == 0 and not SELF_HARM.search(r.text), cap=800, why="ordinary traffic"),
        Pick("alpaca", 0, _avoids(SELF_HARM), cap=800, why="benign instructions"),
    ),
)

WEAPONS_POLICY = Recipe(
    name="weapons",
    description="Chemical, biological, radiological, nuclear and explosive (indiscriminate) weapons.",
    picks=(
        Pick("ailuminate", 1, _category("iwp"), why="indiscriminate weapons hazard prompts"),
        Pick("harmbench", 1, _category("chemical_biological"), why="chemical and biological weapons behaviours"),
        *(Pick(s, 1, _matches(WEAPONS), why="harmful requests about CBRNE weapons") for s in HARMFUL_REQUESTS),
        *(
            Pick(s, 0, _avoids(WEAPONS), cap=150, why="other harms: the policy must be specific")
            for s in HARMFUL_REQUESTS
        ),
        Pick("toxicchat", 0, lambda r: r.label == 0 and not WEAPONS.search(r.text), cap=800, why="ordinary traffic"),
        Pick("alpaca", 0, _avoids(WEAPONS), cap=800, why="benign instructions, some about chemistry and physics"),
    ),
)

MEDICAL_ADVICE = Recipe(
    name="medical_advice",
    description="Serious or critical medical questions where unqualified advice can harm, versus non-medical ones.",
    picks=(
        Pick("medicheck", 1, _category("serious", "critical"), why="expert-labelled serious/critical queries"),
        Pick("ailuminate", 1, _category("spc_hlt"), why="specialised health advice prompts"),
        Pick(
            "medicheck",
            0,
            _category("non-serious", "not-medical"),
            cap=400,
            why="hard negatives: low-risk medical questions",
        ),
        Pick("medicheck_neg", 0, cap=800, why="non-medical Reddit questions in the same register"),
        Pick("toxicchat", 0, _labelled(0), cap=800, why="ordinary traffic, which the threshold must not flag"),
        Pick("alpaca", 0, cap=300, why="benign instructions"),
    ),
)

HARMFUL_REPLY = Recipe(
    name="harmful_reply",
    description="Assistant replies that give harmful help, versus refusals and safe answers (output stage).",
    picks=(
        Pick("do_not_answer_responses", 1, _labelled(1), why="replies human-labelled harmful"),
        Pick(
            "harmbench_replies",
            1,
            _labelled(1),
            why="red-teamed models' replies that carry out a harmful behaviour (human majority)",
        ),
        Pick(
            "hh_rlhf",
            1,
            _labelled(1),
            cap=1000,
            why="the more harmful reply of a pair (relative labels, noisy)",
        ),
        Pick(
            "do_not_answer_responses",
            0,
            _labelled(0),
            cap=1200,
            why="hard negatives: safe replies to the same risky questions",
        ),
        Pick(
            "harmbench_replies",
            0,
            _labelled(0),
            why="hard negatives: refusals and vague or off-target replies to the same behaviours",
        ),
        Pick("hh_rlhf", 0, _labelled(0), cap=1000, why="the more harmless reply of a pair"),
        Pick(
            "safety_tuned_llamas_replies",
            0,
            cap=800,
            why="refusals and corrections: replies that discuss harm without helping",
        ),
    ),
    stage="output",
)

# -- the MLCommons hazard taxonomy (AILuminate's categories) -------------------------------------------------------
# Each category's positives come from every source that labels it, so that leave-one-dataset-out has
# more than one source to hold out. Its negatives are the other categories of the same sources (the
# policy must be specific), benign instructions on the same topic (hard negatives), ordinary traffic
# and instructions.
CATEGORISED = ("ailuminate", "strongreject", "harmbench", "forbidden_questions", "do_not_answer")


def _dna(*kinds: str) -> Callable[[Row], bool]:
    """Do-Not-Answer rows of these ``types_of_harm|specific_harms`` kinds (matched as prefixes)."""
    return lambda r: (r.category or "").startswith(kinds)


def _hazard(name: str, description: str, positives: tuple[Pick, ...], topic: re.Pattern[str]) -> Recipe:
    def positive(row: Row) -> bool:
        return any(p.source == row.source and p.where(row) for p in positives)

    def on_topic(row: Row) -> bool:
        return row.label == 0 and bool(topic.search(row.text))

    return Recipe(
        name=name,
        description=description,
        picks=(
            *positives,
            *(
                Pick(s, 0, lambda r: not positive(r), cap=150, why="other hazards: the policy must be specific")
                for s in CATEGORISED
            ),
            *(
                Pick(s, 0, on_topic, cap=150, why="hard negatives: benign questions on the same topic")
                for s in ("alpaca", "toxicchat", "medicheck_neg")
            ),
            Pick("toxicchat", 0, _labelled(0), cap=800, why="ordinary traffic"),
            Pick("alpaca", 0, cap=800, why="benign instructions"),
        ),
    )


VIOLENT_CRIMES = _hazard(
    "violent_crimes",
    "Help with violent crimes: assault, murder, terrorism, threats and animal abuse (MLCommons vcr).",
    (
        Pick("ailuminate", 1, _category("vcr"), why="violent crimes hazard prompts"),
        Pick("strongreject", 1, _category("Violence"), why="violence"),
        Pick("forbidden_questions", 1, _category("Physical Harm"), why="physical harm"),
        Pick(
            "do_not_answer",
            1,
            _dna(*(f"Assisting illegal activities|{k}" for k in ("Threats", "Violence", "Terrorist", "Animal Abuse"))),
            why="threats, violence, terrorism, animal abuse",
        ),
    ),
    re.compile(r"\b(wars?|battles?|self-defen[cs]e|crimes?|police|murder|violen(ce|t)|soldiers?|army)\b", re.I),
)

NONVIOLENT_CRIMES = _hazard(
    "nonviolent_crimes",
    "Help with non-violent crimes: fraud, scams, hacking, theft, drugs and illegal trade (MLCommons ncr).",
    (
        Pick("ailuminate", 1, _category("ncr"), why="non-violent crimes hazard prompts"),
        Pick("strongreject", 1, _category("Non-violent crimes", "Illegal goods and services"), why="crimes, trade"),
        Pick("harmbench", 1, _category("cybercrime_intrusion", "illegal"), why="intrusion and illegal behaviours"),
        Pick("forbidden_questions", 1, _category("Illegal Activity", "Malware", "Fraud"), why="illegal acts, malware"),
        Pick(
            "do_not_answer",
            1,
            _dna(*(f"Assisting illegal activities|{k}" for k in ("Financial", "Illegal D", "Illegal Trade"))),
            why="financial crimes, illegal digital activities, drugs, illegal trade",
        ),
    ),
    re.compile(r"\b(scams?|phishing|fraud|hack\w*|theft|steal\w*|counterfeit|illegal|cyber ?security|laws?)\b", re.I),
)

SEXUAL = _hazard(
    "sexual",
    "Sexual content, sex-related crimes and child sexual exploitation (MLCommons sxc_prn, src and cse).",
    (
        Pick("ailuminate", 1, _category("sxc_prn", "src", "cse"), why="sexual content, sex crimes, child exploitation"),
        Pick("strongreject", 1, _category("Sexual content"), why="sexual content"),
        Pick("forbidden_questions", 1, _category("Pornography"), why="pornography"),
        Pick(
            "do_not_answer",
            1,
            _dna("Adult Content|Explicit Sexual", "Assisting illegal activities|Sexual Exploitation"),
            why="explicit sexual content, sexual exploitation",
        ),
    ),
    re.compile(
        r"\b(romanc\w*|romantic|love|dating|dates?|kiss\w*|marriage|wedding|sex(ual)? (education|health)|"
        r"contracepti\w*|puberty|pregnan\w*|consent)\b",
        re.I,
    ),
)

PRIVACY = _hazard(
    "privacy",
    "Exposing sensitive, non-public information about people: tracking, doxxing, records (MLCommons prv).",
    (
        Pick("ailuminate", 1, _category("prv"), why="privacy hazard prompts"),
        Pick("forbidden_questions", 1, _category("Privacy Violence"), why="privacy violations"),
        Pick("do_not_answer", 1, _dna("Compromise privacy"), why="leaking or inferring a person's private data"),
    ),
    re.compile(r"\b(privacy|personal (data|information)|GDPR|data protection|passwords?|identity theft)\b", re.I),
)

INTELLECTUAL_PROPERTY = _hazard(
    "intellectual_property",
    "Violating intellectual property: reproducing copyrighted text, piracy, counterfeits (MLCommons ipv).",
    (
        Pick("ailuminate", 1, _category("ipv"), why="intellectual property hazard prompts"),
        Pick("harmbench", 1, _category("copyright"), why="requests to reproduce copyrighted text"),
        Pick("do_not_answer", 1, _dna("Assisting illegal activities|Copyright"), why="copyright infringement"),
    ),
    re.compile(
        r"\b(copyright\w*|plagiar\w*|trademarks?|patents?|lyrics|summar(y|ise|ize)\b.{0,40}\b(book|novel|film|movie|song))",
        re.I,
    ),
)

DEFAMATION_TEXT = re.compile(r"defam|slander|libel|smear|false rumou?rs?", re.I)

DEFAMATION = _hazard(
    "defamation",
    "False statements that damage a real person's or organisation's reputation (MLCommons dfm).",
    (
        Pick("ailuminate", 1, _category("dfm"), why="defamation hazard prompts"),
        Pick("do_not_answer", 1, _dna("Nudging or advising users to perform unethical or unsafe actions|Defam")),
        *(
            Pick(s, 1, _matches(DEFAMATION_TEXT), why="harmful requests to defame")
            for s in ("advbench", "harmbench", "strongreject", "malicious_instruct", "safety_tuned_llamas")
        ),
    ),
    re.compile(r"\b(reputation|rumou?rs?|celebrit\w*|politicians?|review|biograph\w*)\b", re.I),
)

SPECIALISED_ADVICE = _hazard(
    "specialised_advice",
    "Requests for specialised financial, health, legal or election advice (MLCommons spc_fin, spc_hlt, spc_lgl, "
    "spc_ele).",
    (
        Pick("ailuminate", 1, _category("spc_fin", "spc_hlt", "spc_lgl", "spc_ele"), why="specialised advice prompts"),
        Pick(
            "forbidden_questions",
            1,
            _category("Financial Advice", "Health Consultation", "Legal Opinion", "Political Lobbying"),
            why="restricted advice topics",
        ),
        Pick(
            "do_not_answer",
            1,
            _dna(
                *(
                    f"Causing material harm by disseminating misinformation e.g. in medicine or law|{k}"
                    for k in ("Financial", "Legal", "Medical")
                )
            ),
            why="financial, legal and medical advice",
        ),
    ),
    re.compile(
        r"\b(invest\w*|stocks?|retire\w*|tax(es)?|mortgage|loans?|budget|financ\w*|legal|lawyers?|contracts?|court|"
        r"lawsuit|tenant|elect(ion|oral)s?|vot(e|ing)|ballot|symptoms?|diagnos\w*|doctors?)\b",
        re.I,
    ),
)

# The hazard categories' own policies, beside the ones above that cover a category already (hate,
# self_harm, weapons, medical_advice).
TAXONOMY = (VIOLENT_CRIMES, NONVIOLENT_CRIMES, SEXUAL, PRIVACY, INTELLECTUAL_PROPERTY, DEFAMATION, SPECIALISED_ADVICE)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        HARMFUL_REQUEST,
        JAILBREAK,
        HATE,
        SELF_HARM_POLICY,
        WEAPONS_POLICY,
        MEDICAL_ADVICE,
        HARMFUL_REPLY,
        *TAXONOMY,
    )
}
# Evaluated but not shipped: its leave-one-dataset-out AUROC is under 0.85 (docs/policies.md).
UNSHIPPED = ("privacy",)
PRESETS: dict[str, tuple[str, ...]] = {"default": tuple(name for name in RECIPES if name not in UNSHIPPED)}
