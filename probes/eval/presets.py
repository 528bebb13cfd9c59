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

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (HARMFUL_REQUEST, JAILBREAK, HATE, SELF_HARM_POLICY, WEAPONS_POLICY, MEDICAL_ADVICE, HARMFUL_REPLY)
}
PRESETS: dict[str, tuple[str, ...]] = {"default": tuple(RECIPES)}
