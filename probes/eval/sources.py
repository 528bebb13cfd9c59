"""Readers for the public safety datasets in the shared data pool (``../shared/data``, see its README).

Each source yields rows labelled in its own terms (1 harmful / violating, 0 benign) with a category
where the dataset has one; a policy recipe (``probes.eval.presets``) decides what each row means for it.
The data is read in place and never copied into the repository.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from probes.data import Row
from probes.eval.jailbreaks import hash_order, suffix, templates, wrap

SourceReader = Callable[[Path], list[Row]]


def read_source(name: str, data_dir: Path) -> list[Row]:
    if name not in SOURCES:
        raise KeyError(f"unknown source {name!r}; known: {', '.join(sorted(SOURCES))}")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data pool {data_dir} not found; set GUARD_DATA_DIR or --data-dir")
    return SOURCES[name](data_dir)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _rows(source: str, items: list[tuple[str, int, str | None]]) -> list[Row]:
    return [
        Row(text.strip(), label, category=cat, source=source) for text, label, cat in items if text and text.strip()
    ]


def _advbench(d: Path) -> list[Row]:
    return _rows("advbench", [(r["goal"], 1, None) for r in _csv(d / "advbench/harmful_behaviors.csv")])


def _harmbench(d: Path) -> list[Row]:
    rows = _csv(d / "harmbench/harmbench_behaviors_text_all.csv")
    return _rows("harmbench", [(r["Behavior"], 1, r["SemanticCategory"]) for r in rows])


def _strongreject(d: Path) -> list[Row]:
    return _rows(
        "strongreject", [(r["forbidden_prompt"], 1, r["category"]) for r in _csv(d / "strongreject/strongreject.csv")]
    )


def _malicious_instruct(d: Path) -> list[Row]:
    lines = (d / "malicious_instruct/malicious_instruct.txt").read_text(encoding="utf-8").splitlines()
    return _rows("malicious_instruct", [(line, 1, None) for line in lines])


def _do_not_answer(d: Path) -> list[Row]:
    rows = _csv(d / "do_not_answer/do_not_answer_en.csv")
    return _rows("do_not_answer", [(r["question"], 1, f"{r['types_of_harm']}|{r['specific_harms']}") for r in rows])


def _ailuminate(d: Path) -> list[Row]:
    rows = _csv(d / "ailuminate/airr_official_1.0_demo_en_us_prompt_set_release.csv")
    return _rows("ailuminate", [(r["prompt_text"], 1, r["hazard"]) for r in rows])


# Scenarios of the forbidden question set that restrict advice rather than name a harm: its questions
# are often harmless in themselves ("Do I have COVID-19?"), so the source labels them 0.
_RESTRICTED_TOPICS = ("Economic Harm", "Political Lobbying", "Legal Opinion", "Financial Advice", "Health Consultation")


def _forbidden_questions(d: Path) -> list[Row]:
    rows = _csv(d / "jailbreak_llms/forbidden_question_set.csv")
    return _rows(
        "forbidden_questions",
        [
            (r["question"], int(r["content_policy_name"] not in _RESTRICTED_TOPICS), r["content_policy_name"])
            for r in rows
        ],
    )


def _alpaca(d: Path) -> list[Row]:
    items = json.loads((d / "alpaca_noinput/alpaca.json").read_text(encoding="utf-8"))
    return _rows("alpaca", [(x["instruction"], 0, None) for x in items])


def _toxicchat(d: Path) -> list[Row]:
    data = json.loads((d / "toxicchat/toxic_chat_train.json").read_text(encoding="utf-8"))
    items = []
    for x in data["instances"]:
        notes = x["annotations"]
        jailbreak = notes["jailbreaking"]["majority_human"] == "1"
        items.append((x["instance"], int(notes["toxicity"]["majority_human"]), "jailbreak" if jailbreak else None))
    return _rows("toxicchat", items)


_STL_FILES = {
    "I-MaliciousInstructions": 1,
    "I-CoNa": 1,
    "I-Controversial": 1,
    "Q-Harm": 1,
    "I-PhysicalSafetyUnsafe": 1,
    "I-PhysicalSafetySafe": 0,
    "I-Alpaca": 0,
}


def _safety_tuned_llamas(d: Path) -> list[Row]:
    items = []
    for name, label in _STL_FILES.items():
        data = json.loads((d / f"safety_tuned_llamas/evaluation/{name}.json").read_text(encoding="utf-8"))
        items += [(text, label, name) for text in data["instructions"]]
    return _rows("safety_tuned_llamas", items)


def _hatecheck(d: Path) -> list[Row]:
    rows = _csv(d / "hatecheck/test_suite_cases.csv")
    return _rows("hatecheck", [(r["test_case"], int(r["label_gold"] == "hateful"), r["functionality"]) for r in rows])


def _toxigen(d: Path) -> list[Row]:
    items = []
    for path in sorted((d / "toxigen/prompts").glob("*.txt.gz")):
        kind, group = path.name.removesuffix("_1k.txt.gz").split("_", 1)
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                for part in line.strip().split("\\n-"):
                    items.append((part.strip().lstrip("- ").strip(), int(kind == "hate"), group))
    return _rows("toxigen", items)


_DAVIDSON = {"0": (1, "hate"), "1": (1, "offensive"), "2": (0, "neither")}


def _davidson(d: Path) -> list[Row]:
    rows = _csv(d / "davidson_hate_offensive/labeled_data.csv")
    return _rows("davidson", [(r["tweet"], *_DAVIDSON[r["class"]]) for r in rows])


_MEDICAL = {"0": "not-medical", "1": "non-serious", "2": "serious", "3": "critical"}


def _medicheck(d: Path) -> list[Row]:
    rows = _csv(d / "medical_safety/medicheck-expert.csv")
    items = [(r["query"], int(r["query-label-expert"] in {"2", "3"}), _MEDICAL[r["query-label-expert"]]) for r in rows]
    return _rows("medicheck", items)


def _medicheck_neg(d: Path) -> list[Row]:
    lines = (d / "medical_safety/medicheck-neg.csv").read_text(encoding="utf-8").splitlines()
    return _rows("medicheck_neg", [(line.strip().strip('"'), 0, "not-medical") for line in lines])


_DNA_MODELS = ("GPT4", "ChatGPT", "Claude", "ChatGLM2", "llama2-7b-chat", "vicuna-7b")


def _do_not_answer_responses(d: Path) -> list[Row]:
    """Response-level rows: the assistant's reply to a risky question, human-labelled harmful (1) or safe (0)."""
    out = []
    for r in _csv(d / "do_not_answer/data_en.csv"):
        for m in _DNA_MODELS:
            text = r.get(f"{m}_response", "").strip()
            if text and r.get(f"{m}_harmful") in {"0", "1"}:
                out.append(
                    Row(
                        text,
                        int(r[f"{m}_harmful"]),
                        prompt=r["question"].strip(),
                        category=r["types_of_harm"],
                        source="do_not_answer_responses",
                    )
                )
    return out


def _harmbench_replies(d: Path) -> list[Row]:
    """HarmBench's classifier validation set: red-teamed models' replies to HarmBench behaviours, harmful (1)
    when the majority of three annotators judged the reply an instance of the behaviour. The prompt is the
    behaviour (after its context, if any), not the attack prompt; the category is the behaviour's id, so
    splits can keep a behaviour's replies together. Ids without a behaviour row are skipped, as upstream does."""
    behaviours = {
        r["BehaviorID"]: "\n\n".join(t for t in (r["ContextString"].strip(), r["Behavior"].strip()) if t)
        for r in _csv(d / "harmbench/harmbench_behaviors_text_all.csv")
    }
    records = json.loads((d / "harmbench_classifier_val/text_behaviors_val_set.json").read_text(encoding="utf-8"))
    return [
        Row(r["generation"].strip(), majority(r), prompt=behaviours[key], category=key, source="harmbench_replies")
        for key, pair in records.items()
        if key in behaviours
        for r in pair
        if r["generation"].strip()
    ]


def majority(record: dict) -> int:
    """The human label of a HarmBench classifier-validation record: at least two of three annotators."""
    return int(sum(int(record[f"human_{i}"]) for i in range(3)) >= 2)


def _hh_rlhf(d: Path) -> list[Row]:
    """HH-RLHF harmless-base pairs: the final assistant turn, rejected (1: the more harmful) vs chosen (0).

    The prompt is the last human turn before it. Pairs whose two replies are equal, or whose turns are
    malformed (a role marker left inside a turn), are dropped. The labels are relative (crowdworkers
    preferred ``chosen`` as the more harmless), so they are noisy.
    """
    out = []
    with gzip.open(d / "hh_rlhf_harmless_base/test.jsonl.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            pair = json.loads(line)
            turns = {key: _last_exchange(pair[key]) for key in ("chosen", "rejected")}
            (prompt, chosen), (_, rejected) = turns["chosen"], turns["rejected"]
            texts = (prompt, chosen, rejected)
            if all(texts) and chosen != rejected and not any(_ROLE.search(t) for t in texts):
                out.append(Row(rejected, 1, prompt=prompt, category="rejected", source="hh_rlhf"))
                out.append(Row(chosen, 0, prompt=prompt, category="chosen", source="hh_rlhf"))
    return out


_ROLE = re.compile(r"\b(Human|Assistant):")


def _last_exchange(transcript: str) -> tuple[str, str]:
    """The last human turn and the assistant's reply to it, from a "\n\nHuman: … \n\nAssistant: …" transcript."""
    head, _, reply = transcript.rpartition("\n\nAssistant:")
    _, _, prompt = head.rpartition("\n\nHuman:")
    return prompt.strip(), reply.strip()


def _safety_tuned_llamas_replies(d: Path) -> list[Row]:
    """Safe replies (0) to harmful requests: refusals and corrections written for safety tuning."""
    path = d / "safety_tuned_llamas/training/safety_only_data_Instructions.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return [
        Row(item["output"].strip(), 0, prompt=item["instruction"].strip(), source="safety_tuned_llamas_replies")
        for item in data
        if item["output"].strip() and item["instruction"].strip()
    ]


WRAPPED_PER_FAMILY = 16  # templates of each family
WRAPPED_PER_TEMPLATE = 2  # requests of each label in each template
WRAPPED_SUFFIXED = 150  # requests of each label with an adversarial suffix


def _jailbreak_wrapped(d: Path) -> list[Row]:
    """The pool's harmful requests (1) and benign instructions (0) wrapped in jailbreak templates (category: the
    template's family) and followed by adversarial suffixes (category ``suffix``): a template alone is not harm."""
    readers = (_advbench, _harmbench, _strongreject, _malicious_instruct)
    harmful = sorted({r.text for read in readers for r in read(d) if r.category != "copyright"}, key=hash_order)
    benign = sorted({r.text for r in _alpaca(d)}, key=hash_order)
    chosen = templates(d, WRAPPED_PER_FAMILY)
    items: list[tuple[str, int, str | None]] = []
    taken = 0
    for family, texts in sorted(chosen.items()):
        for template in texts:
            for k in range(WRAPPED_PER_TEMPLATE):
                items += [
                    (wrap(template, pool[taken + k])[0], label, family) for label, pool in ((1, harmful), (0, benign))
                ]
            taken += WRAPPED_PER_TEMPLATE
    pieces = sorted({word for texts in chosen.values() for text in texts for word in re.findall(r"\S{1,8}", text)})
    rng = np.random.default_rng(0)
    for k in range(WRAPPED_SUFFIXED):
        for label, pool in ((1, harmful), (0, benign)):
            items.append((pool[taken + k] + " " + suffix(pieces, rng), label, "suffix"))
    return _rows("jailbreak_wrapped", items)


SOURCES: dict[str, SourceReader] = {
    "advbench": _advbench,
    "harmbench": _harmbench,
    "strongreject": _strongreject,
    "malicious_instruct": _malicious_instruct,
    "do_not_answer": _do_not_answer,
    "ailuminate": _ailuminate,
    "forbidden_questions": _forbidden_questions,
    "alpaca": _alpaca,
    "toxicchat": _toxicchat,
    "safety_tuned_llamas": _safety_tuned_llamas,
    "hatecheck": _hatecheck,
    "toxigen": _toxigen,
    "davidson": _davidson,
    "medicheck": _medicheck,
    "medicheck_neg": _medicheck_neg,
    "do_not_answer_responses": _do_not_answer_responses,
    "hh_rlhf": _hh_rlhf,
    "harmbench_replies": _harmbench_replies,
    "safety_tuned_llamas_replies": _safety_tuned_llamas_replies,
    "jailbreak_wrapped": _jailbreak_wrapped,
}
