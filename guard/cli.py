"""The ``guard`` command: ``serve``, ``train``, ``eval``, ``explain``, ``data`` (export rows of the shared pool
as JSONL), ``registry``, ``benchmark-policies``, ``calibrate`` and ``fit-set``.

The offline stack (training, evaluation, baselines, reports) is imported by the commands that use it, so
``guard serve`` starts without scikit-learn or matplotlib.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
from redis.exceptions import RedisError

from guard.policy import PolicyError
from guard.settings import Settings
from probes.catalog import resolve_direction, resolve_probe, shipped_home
from probes.data import Dataset, DatasetError, deduplicate, load_datasets, split, write_jsonl
from probes.direction import Direction
from probes.eval.presets import PRESET_LAYERS, PRESETS, RECIPES
from probes.eval.sources import SOURCES, read_source
from probes.features import POOLINGS
from probes.lm.model import NUMERIC_PATHS, LoadedModel, load_model
from probes.probe import LinearProbe, ProbeError
from probes.registry import RegistryError, open_registry, signing_key

log = logging.getLogger("guard")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = Settings.from_env().override_from(args)  # flags win over GUARD_* variables
        return args.run(args, settings)
    except (
        DatasetError,
        ProbeError,
        PolicyError,
        RegistryError,
        RedisError,
        FileNotFoundError,
        KeyError,
        ValueError,
    ) as exc:
        print(f"guard {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guard", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="default model name or a local HF causal-LM directory (GUARD_MODEL)")
    common.add_argument("--cache-dir", type=Path, help="model and feature cache (GUARD_CACHE_DIR)")
    common.add_argument("--data-dir", type=Path, help="the shared data pool (GUARD_DATA_DIR)")
    common.add_argument("--threads", type=int, help="torch CPU threads (GUARD_THREADS)")
    common.add_argument("--dtype", choices=NUMERIC_PATHS, help="numeric path (GUARD_DTYPE)")
    common.add_argument("--layer-path", help="dotted path to the decoder layers, e.g. model.layers (GUARD_LAYER_PATH)")
    common.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub.add_parser("train", parents=[common], help="train a probe (or the default policies)"))
    _eval_parser(sub.add_parser("eval", parents=[common], help="evaluate a probe on labelled data"))
    _explain_parser(sub.add_parser("explain", parents=[common], help="which tokens make a probe score what it does"))
    _directions_parser(
        sub.add_parser("directions", parents=[common], help="a behaviour's direction, chosen by its effect")
    )
    _export_parser(
        sub.add_parser("export", parents=[common], help="the model's weights with a direction ablated, for any engine")
    )
    _data_parser(sub.add_parser("data", parents=[common], help="export rows of the shared data pool as JSONL"))
    _serve_parser(sub.add_parser("serve", parents=[common], help="serve the model behind an OpenAI-compatible API"))
    _registry_parser(
        sub.add_parser("registry", parents=[common], help="push, list, activate and roll back probes and directions")
    )
    _feedback_parser(sub.add_parser("feedback", parents=[common], help="labels given on captured requests"))
    _lodo_parser(
        sub.add_parser(
            "benchmark-policies",
            parents=[common],
            help="leave-one-dataset-out table of the default policies: probe vs baselines",
        )
    )
    _calibrate_parser(
        sub.add_parser(
            "calibrate",
            parents=[common],
            help="calibrate the default policies' probabilities on leave-one-dataset-out folds",
        )
    )
    _fit_set_parser(
        sub.add_parser(
            "fit-set",
            parents=[common],
            help="the threshold_shift under which a policy file flags at most a share of ordinary traffic",
        )
    )
    return parser


def _model(settings: Settings) -> LoadedModel:
    return load_model(
        settings.model,
        cache_dir=settings.cache_dir,
        threads=settings.threads or None,
        layer_path=settings.layer_path or None,
        dtype=settings.dtype,
    )


# -- train ----------------------------------------------------------------------------------------------
def _train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", default=[], help="JSONL or CSV file (repeatable)")
    p.add_argument("--text-col", default="text")
    p.add_argument("--label-col", default="label")
    p.add_argument("--name", help="policy name stored in the manifest")
    p.add_argument("--out", type=Path, help="artifact directory (with --preset: where the policies go)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="train the shipped default policies from the data pool")
    p.add_argument("--policy", action="append", help="with --preset: only these policies (repeatable)")
    _extra_arg(p)
    _method_args(p)
    p.add_argument("--dev-fraction", type=float, default=0.2)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_train)


def _extra_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        help="with one --policy: hand-labelled JSONL rows (guard feedback export) added to its training rows; "
        "their labels win over the pool's (repeatable)",
    )


def _extra(args: argparse.Namespace) -> Dataset:
    """The ``--extra`` rows, for exactly one policy: a row is labelled for one policy."""
    if not args.extra:
        return Dataset(())
    if not args.policy or len(args.policy) != 1:
        raise ValueError("--extra rows are labelled for one policy: name it with exactly one --policy")
    return load_datasets(args.extra)


def _method_args(p: argparse.ArgumentParser) -> None:
    """How a probe is fitted: shared by `train` and `benchmark-policies`."""
    p.add_argument(
        "--layers",
        help="comma-separated layers to concatenate, or 'sweep': fit each layer, keep the best (default: sweep; "
        f"for the default policies {','.join(map(str, PRESET_LAYERS))})",
    )
    p.add_argument("--pooling", choices=POOLINGS, default="mean")
    p.add_argument(
        "--target-fpr",
        type=float,
        help="threshold: at most this FPR on dev negatives (default 0.01; a preset's policy may have a rule of its "
        "own, which either flag replaces)",
    )
    p.add_argument(
        "--traffic-fpr",
        type=float,
        help="threshold: also at most this FPR on dev negatives from ordinary traffic (rows whose source is "
        "toxicchat; default 0.015); a negative value turns it off",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-text-tokens", type=int, default=256)


def _method(args: argparse.Namespace, default_layers: tuple[int, ...] | None = None):
    """The ``TrainConfig`` the flags describe."""
    from probes.train import TrainConfig

    target_fpr = TrainConfig.target_fpr if args.target_fpr is None else args.target_fpr
    traffic_fpr = TrainConfig.traffic_fpr if args.traffic_fpr is None else args.traffic_fpr
    if args.layers in (None, ""):
        layers = default_layers
    else:
        layers = None if args.layers == "sweep" else tuple(int(x) for x in args.layers.split(","))
    return TrainConfig(
        layers=layers,
        pooling=args.pooling,
        target_fpr=target_fpr,
        traffic_fpr=traffic_fpr if traffic_fpr >= 0 else None,
        seed=args.seed,
        max_text_tokens=args.max_text_tokens,
    )


def _own_rule(args: argparse.Namespace) -> bool:
    """Whether a preset's policies keep their own threshold rules: the command names none."""
    return args.target_fpr is None and args.traffic_fpr is None


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from probes.eval.defaults import train_recipes
    from probes.stream import calibrate, is_reply_data
    from probes.train import train_probe

    config = _method(args, PRESET_LAYERS if args.preset else None)
    if args.preset:
        names = args.policy or list(PRESETS[args.preset])
        lm = _model(settings)
        results = train_recipes(
            lm,
            names,
            settings.data_dir,
            args.out or shipped_home(settings.dtype),
            config,
            cache_dir=settings.cache_dir,
            progress=not args.no_progress,
            extra=_extra(args),
            own_rule=_own_rule(args),
        )
        for name, result in results.items():
            _print_trained(name, result.probe, args.out or shipped_home(settings.dtype))
        return 0
    if args.extra:
        raise ValueError("--extra adds rows to a preset's policy; without --preset, pass them as --data")
    if not args.data or not args.name or not args.out:
        raise ValueError("--data, --name and --out are required (or use --preset)")
    dataset = load_datasets(args.data, text_col=args.text_col, label_col=args.label_col)
    if dataset.duplicates_dropped:
        print(f"dropped {dataset.duplicates_dropped} exact duplicate row(s)", file=sys.stderr)
    train, dev = split(dataset, dev_fraction=args.dev_fraction, seed=args.seed)
    provenance = {
        "files": [str(Path(p).resolve()) for p in args.data],
        "text_col": args.text_col,
        "label_col": args.label_col,
        "duplicates_dropped": dataset.duplicates_dropped,
        "dev_fraction": args.dev_fraction,
    }
    lm = _model(settings)
    result = train_probe(
        lm,
        train,
        dev,
        args.name,
        config,
        provenance=provenance,
        cache_dir=settings.cache_dir,
        progress=not args.no_progress,
    )
    probe = result.probe
    if is_reply_data(dev):  # an output-stage probe: thresholded as the server streams it
        probe = calibrate(lm, probe, dev, config.target_fpr)
    probe.save(args.out)
    _print_trained(args.name, probe, args.out.parent)
    return 0


def _print_trained(name: str, probe: LinearProbe, out: Path) -> None:
    dev = probe.manifest["metrics"]["dev"]
    rule = f"at most {100 * probe.manifest['target_fpr']:g}% of dev negatives"
    if probe.manifest.get("traffic_fpr") is not None:
        rule += f" and {100 * probe.manifest['traffic_fpr']:g}% of dev traffic"
    print(
        f"{name}: layers {list(probe.layers)}, dev AUROC {dev['auroc']:.4f}, TPR {dev['tpr_at_threshold']:.3f} "
        f"at FPR {dev['fpr_at_threshold']:.3f} (threshold {probe.threshold:.4f}: {rule}) -> {out / name}"
    )
    stream = probe.manifest.get("stream")
    if stream:
        print(
            f"{name}: streamed (moving average, alpha {stream['alpha']}): dev TPR {stream['dev_tpr']:.3f} at FPR "
            f"{stream['dev_fpr']:.3f} (threshold {stream['threshold']:.4f})"
        )


# -- eval -----------------------------------------------------------------------------------------------
def _eval_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", required=True, help="probe directory or shipped policy name")
    p.add_argument("--data", action="append", required=True, help="JSONL or CSV file (repeatable)")
    p.add_argument("--text-col", default="text")
    p.add_argument("--label-col", default="label")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--scores-out", type=Path, help="write each row's score as JSONL")
    p.add_argument("--report", type=Path, help="directory for report.html and its PNGs")
    p.add_argument("--baselines", action="store_true", help="also TF-IDF and MiniLM classifiers on the probe's rows")
    p.add_argument("--train-data", action="append", help="baselines' training files (default: from the manifest)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_eval)


def _eval(args: argparse.Namespace, settings: Settings) -> int:
    from probes.eval.evaluate import evaluate
    from probes.eval.report import write_report

    probe_dir = resolve_probe(args.probe)
    dataset = load_datasets(args.data, text_col=args.text_col, label_col=args.label_col)
    lm = _model(settings)
    probe = LinearProbe.load(probe_dir, model_fingerprint=lm.fingerprint)
    baseline_data = _baseline_data(probe, args, settings) if args.baselines else None
    evaluation = evaluate(
        lm, probe, dataset, baseline_data=baseline_data, cache_dir=settings.cache_dir, progress=not args.no_progress
    )
    report = evaluation.as_json(probe)
    if args.scores_out:
        _write_scores(args.scores_out, dataset, evaluation.probe.scores, probe.threshold)
    if args.report:
        report["report"] = str(
            write_report(args.report, probe, evaluation, dataset.labels, f"guard eval: {probe.name}")
        )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


def _baseline_data(probe: LinearProbe, args: argparse.Namespace, settings: Settings):
    data = probe.manifest.get("data", {})
    if args.train_data:
        dataset = load_datasets(args.train_data, text_col=args.text_col, label_col=args.label_col)
        return split(dataset, dev_fraction=float(data.get("dev_fraction", 0.2)), seed=int(data.get("split_seed", 0)))
    if "preset" in data:
        from probes.eval.defaults import recipe_splits

        train, dev, _ = recipe_splits(data["preset"], settings.data_dir)
        return train, dev
    if "files" in data:
        dataset = load_datasets(
            data["files"], text_col=data.get("text_col", "text"), label_col=data.get("label_col", "label")
        )
        return split(dataset, dev_fraction=float(data["dev_fraction"]), seed=int(data.get("split_seed", 0)))
    raise ValueError("the manifest records no training data; pass --train-data for the baselines")


def _write_scores(path: Path, dataset, scores, threshold: float) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for row, score in zip(dataset.rows, scores, strict=True):
            record = {
                "text": row.text,
                "prompt": row.prompt,
                "label": row.label,
                "score": float(score),
                "flagged": bool(score > threshold),
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _print_table(report: dict) -> None:
    columns = ("auroc", "auprc", "f1", "tpr_at_threshold", "fpr_at_threshold", "tpr_at_1pct_fpr", "n")
    rows = {"probe": report, **report["baselines"]}
    print(f"{'':8}" + "".join(f"{c:>18}" for c in columns))
    for name, m in rows.items():
        cells = "".join(f"{m[c]:>18.4f}" if isinstance(m[c], float) else f"{m[c]!s:>18}" for c in columns)
        print(f"{name:8}{cells}")


# -- data -----------------------------------------------------------------------------------------------
def _data_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "what",
        choices=["policy", "source", "replies"],
        help="a policy's rows, a whole source dataset, or the model's own judged replies",
    )
    p.add_argument("name", nargs="?", help=f"policy ({', '.join(RECIPES)}) or source ({', '.join(SOURCES)})")
    p.add_argument("--split", choices=["train", "dev", "all"], default="all", help="for a policy")
    p.add_argument("--out", type=Path, help="where the rows go (replies: also kept in the cache)")
    p.add_argument("--per-kind", type=int, default=200, help="replies: harmful, jailbreak and benign prompts each")
    p.add_argument("--max-tokens", type=int, default=128, help="replies: the longest reply, in tokens")
    p.add_argument("--max-batch", type=int, help="replies: rows decoded together (GUARD_MAX_BATCH)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="replies: decode compiled, as `guard serve` does (GUARD_COMPILE, default on)",
    )
    p.set_defaults(run=_data)


def _data(args: argparse.Namespace, settings: Settings) -> int:
    from probes.eval.defaults import recipe_splits

    if args.what == "replies":
        return _replies(args, settings)
    if args.name is None or args.out is None:
        raise ValueError(f"guard data {args.what} needs a name and --out")
    if args.what == "source":
        rows = deduplicate(read_source(args.name, settings.data_dir)).rows
    else:
        if args.name not in RECIPES:
            raise KeyError(f"unknown policy {args.name!r}; known: {sorted(RECIPES)}")
        train, dev, _ = recipe_splits(args.name, settings.data_dir)
        rows = {"train": train.rows, "dev": dev.rows, "all": train.rows + dev.rows}[args.split]
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


def _replies(args: argparse.Namespace, settings: Settings) -> int:
    """The model's greedy replies to harmful, jailbreak-wrapped and benign prompts, judged twice, cached."""
    from guard.engine import Engine
    from guard.replies import generate
    from guard.runtime import serving_model
    from guard.sampling import SamplingParams
    from probes.eval.baselines import minilm_embedder
    from probes.eval.judges import harm_judge
    from probes.eval.replies import cache_file, cache_key, records, reply_prompts, summary

    if args.per_kind < 1 or args.max_tokens < 1:
        raise ValueError("--per-kind and --max-tokens must be at least 1")
    lm = serving_model(settings)  # the replies `guard serve` gives: compiling moves some roundings
    embed = minilm_embedder()
    judge = harm_judge(settings.data_dir, settings.cache_dir, embed)
    prompts = reply_prompts(settings.data_dir, args.per_kind)
    compiled = bool(lm.decoder and lm.decoder.compiled)
    key = cache_key(prompts, args.max_tokens, judge.manifest["recipe"], compiled)
    path = cache_file(settings.cache_dir, lm.fingerprint, lm.numeric, key)
    if path.exists():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        engine = Engine(lm, [], [], max_batch=settings.max_batch, threads=settings.threads or None)
        engine.start()
        try:
            out = generate(engine, [p.text for p in prompts], SamplingParams(max_tokens=args.max_tokens, temperature=0))
        finally:
            engine.stop()
        replies = [g.reply for g in out]
        harm = judge.scores(embed, [p.request for p in prompts], replies)
        rows = records(prompts, replies, [g.finish_reason for g in out], harm, judge.threshold)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    for kind, counts in summary(rows).items():
        print(
            f"{kind:20s} {counts['replies']:4d} replies: harmful (harm judge) {counts['harmful']:.3f}, "
            f"refusals (phrase judge) {counts['refusals']:.3f}"
        )
    for name, agreement in judge.manifest["agreement_harmbench"].items():
        print(f"agreement with HarmBench's human labels, {name}: {_agreement_line(agreement)}")
    for name, agreement in judge.manifest["agreement_do_not_answer"].items():
        print(f"agreement with Do-Not-Answer's human labels, {name}: {_agreement_line(agreement)}")
    print(f"{len(rows)} rows in {path}" + (f", copied to {args.out}" if args.out else ""))
    return 0


def _agreement_line(a: dict) -> str:
    auroc = "" if a["auroc"] is None else f"AUROC {a['auroc']:.3f}, "
    return f"{auroc}F1 {a['f1']:.3f}, accuracy {a['accuracy']:.3f}, FPR {a['fpr']:.3f} (n={a['n']})"


# -- directions -----------------------------------------------------------------------------------------
def _directions_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=["refusal", "sentiment", "weapons"],
        required=True,
        help="a direction from the data pool: refusal (for refuse), sentiment (a tone dial) or weapons (to ablate)",
    )
    p.add_argument("--out", type=Path, required=True, help="the direction's directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_directions)


def _directions(args: argparse.Namespace, settings: Settings) -> int:
    from probes.eval.directions import PRESETS, select

    lm = _model(settings)
    behaviour = PRESETS[args.preset](settings.data_dir)
    direction, table = select(lm, behaviour, progress=not args.no_progress)
    chosen = direction.manifest["selection"]["chosen"]
    for c in table:
        mark = "*" if c.as_dict() == chosen else " "
        print(
            f"{mark} {c.reading} layer {c.layer:2d} x{c.multiple:.1f} (strength {c.strength:6.2f}): "
            f"{behaviour.judge} {c.judged:.3f}, benign refusal {c.benign_refusal:.3f}, "
            f"{behaviour.intervention} KL {c.intervention_kl:.4f}, ablated KL {c.ablated_kl:.4f}"
        )
    selection = direction.manifest["selection"]
    unsteered = selection["unsteered"]
    print(f"unsteered: {behaviour.judge} {unsteered['judged']:.3f}, benign refusal {unsteered['benign_refusal']:.3f}")
    if not selection["kl_bound_met"]:
        raise ValueError(f"no candidate keeps the benign KL of {behaviour.intervention} under 0.1: nothing written")
    direction.save(args.out)
    print(f"{behaviour.name}: layer {direction.layer}, strength {direction.strength:.2f} -> {args.out}")
    return 0


# -- export ---------------------------------------------------------------------------------------------
def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ablate", required=True, help="direction directory or shipped direction name (e.g. refusal)")
    p.add_argument("--layer", type=int, help="whose vector is ablated everywhere (default: the direction's layer)")
    p.add_argument("--out", type=Path, required=True, help="a new model directory (transformers' format)")
    p.set_defaults(run=_export)


def _export(args: argparse.Namespace, settings: Settings) -> int:
    """Always from the float32 weights (``--dtype`` does not apply): the result is a float checkpoint."""
    from probes.lm.orthogonalize import export_ablated

    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"--out {args.out} exists and is not empty: export writes a new model directory")
    lm = load_model(settings.model, cache_dir=settings.cache_dir, threads=settings.threads or None, dtype="float32")
    direction = Direction.load(resolve_direction(args.ablate, lm.fingerprint), model_fingerprint=lm.fingerprint)
    layer = direction.layer if args.layer is None else args.layer
    if layer not in direction.layers:
        raise ValueError(f"direction {direction.name!r} has no vector at layer {layer} (it has {direction.layers})")
    provenance = {"direction": direction.name, "direction_version": direction.version, "layer": layer}
    fingerprint = export_ablated(lm, direction.vector(layer), args.out, provenance)
    print(f"{lm.name} with {direction.name}@{direction.version} (layer {layer}) ablated -> {args.out} ({fingerprint})")
    return 0


# -- explain --------------------------------------------------------------------------------------------
def _explain_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="the text to explain (or --data)")
    p.add_argument("--probe", required=True, help="probe directory, shipped policy name, or NAME@VERSION (registry)")
    p.add_argument("--data", type=Path, help="JSONL or CSV rows to explain, one after the other")
    p.add_argument("--prompt", help="explain TEXT as the assistant's reply to this prompt (output-stage probes)")
    p.add_argument("--json", action="store_true", help="one JSON object per text: score, logit, bias, tokens")
    p.add_argument("--report", type=Path, help="also write explain.html and explain.json to this directory")
    p.add_argument("--redis-url", help="registry for NAME@VERSION (GUARD_REDIS_URL); default: the local registry")
    p.add_argument("--max-text-tokens", type=int, default=256)
    p.set_defaults(run=_explain)


def _explain(args: argparse.Namespace, settings: Settings) -> int:
    from probes.data import Row, read_dataset
    from probes.eval.explained import explain_rows, record, terminal, write_report

    if (args.text is None) == (args.data is None):
        raise ValueError("give the text to explain, or --data FILE (not both)")
    lm = _model(settings)
    probe = _probe(args.probe, settings, lm.fingerprint)
    dataset = Dataset(tuple(read_dataset(args.data)) if args.data else (Row(args.text, 0, args.prompt),))
    explanations = explain_rows(lm, probe, dataset, max_text_tokens=args.max_text_tokens)
    for explanation in explanations:
        if args.json:
            print(json.dumps(record(explanation)))
        else:
            print(terminal(explanation, color=sys.stdout.isatty() and "NO_COLOR" not in os.environ) + "\n")
    if args.report:
        path = write_report(args.report, probe, [r.text for r in dataset.rows], explanations)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _probe(reference: str, settings: Settings, fingerprint: str) -> LinearProbe:
    """A probe by directory or shipped name, or ``NAME@VERSION`` from the registry, checked against the model."""
    name, at, version = reference.partition("@")
    if at and not Path(reference).exists():
        stored = open_registry(settings.redis_url or None, settings.registry_dir()).get(name, version or None)
        return stored.probe(key=signing_key(), model_fingerprint=fingerprint)
    return LinearProbe.load(resolve_probe(reference, fingerprint), model_fingerprint=fingerprint)


# -- serve ----------------------------------------------------------------------------------------------
def _serve_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="bind address (GUARD_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (GUARD_PORT, default 8000)")
    p.add_argument("--policy-file", type=Path, help="YAML/JSON policy file (GUARD_POLICY_FILE)")
    p.add_argument("--api-key", action="append", help="accepted API key, repeatable (GUARD_API_KEYS, comma-separated)")
    p.add_argument("--max-batch", type=int, help="sequences decoded together (GUARD_MAX_BATCH)")
    p.add_argument("--max-waiting", type=int, help="requests queued beyond the batch before 429 (GUARD_MAX_WAITING)")
    p.add_argument("--queue-timeout", type=float, help="seconds for a batch slot, then 503 (GUARD_QUEUE_TIMEOUT)")
    p.add_argument("--request-timeout", type=float, help="seconds per request, then 504 (GUARD_REQUEST_TIMEOUT)")
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="longer prompts get a 400 (GUARD_MAX_PROMPT_TOKENS; default: what the engine can prefill in half "
        "the queue timeout, measured at start)",
    )
    p.add_argument("--redis-url", help="probe registry in Redis, e.g. redis://host:6379/0 (GUARD_REDIS_URL)")
    p.add_argument("--admin-key", help="key for POST /v1/guard/feedback (GUARD_ADMIN_KEY); unset: feedback refused")
    p.add_argument(
        "--capture",
        action=argparse.BooleanOptionalAction,
        help="record flagged and blocked requests to the Redis stream guard:capture (GUARD_CAPTURE, default off)",
    )
    p.add_argument(
        "--capture-redact",
        action=argparse.BooleanOptionalAction,
        help="record a sha256 of prompt and reply instead of the texts (GUARD_CAPTURE_REDACT)",
    )
    p.add_argument(
        "--capture-sample", type=float, help="also record this fraction of unflagged requests (GUARD_CAPTURE_SAMPLE)"
    )
    p.add_argument("--capture-maxlen", type=int, help="records kept at most (GUARD_CAPTURE_MAXLEN, default 100000)")
    p.add_argument(
        "--capture-retention", type=float, help="seconds a record is kept (GUARD_CAPTURE_RETENTION, default 7 days)"
    )
    p.add_argument(
        "--fast-decode",
        action=argparse.BooleanOptionalAction,
        help="decode Llama-family models with the lean step, else through transformers (GUARD_FAST_DECODE, default on)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="run the lean step through torch.compile, compiled at start-up (GUARD_COMPILE, default on)",
    )
    p.add_argument(
        "--compile-in-background",
        action=argparse.BooleanOptionalAction,
        help="serve eagerly while the step compiles, else become ready once it has compiled "
        "(GUARD_COMPILE_IN_BACKGROUND, default on)",
    )
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from guard.policy import load_policies
    from guard.server.app import create_app

    settings = settings.override(api_keys=",".join(args.api_key) if args.api_key else None)
    load_policies(settings.policy_file)  # a bad policy file fails here, before the server starts
    settings.check_capture()
    logging.getLogger().setLevel(logging.INFO)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


# -- registry -------------------------------------------------------------------------------------------
def _registry_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="Redis registry (GUARD_REDIS_URL); default: the local directory registry")
    sub = p.add_subparsers(dest="action", required=True)
    push = sub.add_parser("push", help="store a probe or direction artifact as a new immutable version")
    push.add_argument("artifact", help="probe or direction directory, or a shipped policy or direction name")
    push.add_argument("--activate", action="store_true", help="also make it the active version")
    listing = sub.add_parser("list", help="names, or one name's versions")
    listing.add_argument("name", nargs="?")
    activate = sub.add_parser("activate", help="make VERSION the active version of NAME")
    activate.add_argument("name")
    activate.add_argument("version")
    rollback = sub.add_parser("rollback", help="re-activate the previously active version")
    rollback.add_argument("name")
    show = sub.add_parser("show", help="manifest and metrics of NAME[@VERSION] (default: the active one)")
    show.add_argument("ref")
    shadow = sub.add_parser("shadow", help="replicas score VERSION beside the active one, acting on neither")
    shadow.add_argument("name")
    shadow.add_argument("version", nargs="?", help="omit with --stop")
    shadow.add_argument("--stop", action="store_true", help="stop scoring NAME's shadow version")
    compare = sub.add_parser("compare", help="the shadow version against the active one on live traffic (Redis)")
    compare.add_argument("name")
    compare.add_argument("--json", action="store_true")
    p.set_defaults(run=_registry)


def _registry(args: argparse.Namespace, settings: Settings) -> int:
    registry = open_registry(settings.redis_url or None, settings.registry_dir())
    if args.action == "push":
        artifact = _pushed(args.artifact)
        version = registry.push(artifact, key=signing_key())
        if args.activate:
            registry.activate(artifact.name, version)
        print(f"pushed {artifact.name}@{version}" + (" (active)" if args.activate else ""))
    elif args.action == "list":
        for name in [args.name] if args.name else registry.names():
            active = registry.active(name)
            versions = ", ".join(f"{v}*" if v == active else v for v in registry.versions(name))
            print(f"{name}: {versions or '(no versions)'}")
    elif args.action == "activate":
        registry.activate(args.name, args.version)
        print(f"{args.name}@{args.version} is active")
    elif args.action == "rollback":
        print(f"{args.name}@{registry.rollback(args.name)} is active")
    elif args.action == "shadow":
        if args.stop == (args.version is not None):
            raise ValueError("give the VERSION to shadow, or --stop")
        registry.shadow(args.name, args.version)
        print(f"{args.name}: no shadow version" if args.stop else f"{args.name}@{args.version} is scored in shadow")
    elif args.action == "compare":
        _compare(registry, args, settings)
    else:
        name, _, version = args.ref.partition("@")
        stored = registry.get(name, version or None)
        print(
            json.dumps(
                {
                    "name": name,
                    "version": stored.version,
                    "active": registry.active(name) == stored.version,
                    "signed": bool(stored.signature),
                    "pushed_at": stored.pushed_at,
                    "manifest": stored.manifest,
                },
                indent=2,
            )
        )
    return 0


def _pushed(reference: str) -> LinearProbe | Direction:
    """A probe or a direction, by directory or shipped name (a directory's manifest says which)."""
    path = Path(reference) / "manifest.json"
    if path.is_file() and json.loads(path.read_text()).get("kind") == "direction":
        return Direction.load(reference)
    try:
        return LinearProbe.load(resolve_probe(reference))
    except ProbeError:
        return Direction.load(resolve_direction(reference))


def _compare(registry, args: argparse.Namespace, settings: Settings) -> None:
    import redis

    from guard.shadow import compare

    active, shadow = registry.active(args.name), registry.shadowed(args.name)
    if not settings.redis_url:
        raise ValueError("replicas sum their shadow counts in Redis: give --redis-url (GUARD_REDIS_URL)")
    if active is None or shadow is None:
        raise ValueError(f"{args.name!r} has no active and shadow version to compare (guard registry shadow)")
    result = compare(redis.Redis.from_url(settings.redis_url), args.name, active, shadow)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if not result["checks"]:
        print(f"{args.name}: no checks scored by {args.name}@{shadow} yet")
        return
    print(
        f"{args.name}: shadow @{shadow} against active @{active} over {result['checks']} checks: agreement "
        f"{result['agreement']:.4f}; flag rate active {result['active_flag_rate']:.4f}, shadow "
        f"{result['shadow_flag_rate']:.4f}; {result['shadow_only']} flagged by the shadow only, "
        f"{result['active_only']} by the active only"
    )
    for entry in result["disagreeing"]:
        print(f"  {entry['id']}  {entry['kind']}")


# -- feedback -------------------------------------------------------------------------------------------
def _feedback_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", help="where capture and feedback live (GUARD_REDIS_URL)")
    sub = p.add_subparsers(dest="action", required=True)
    export = sub.add_parser("export", help="write one policy's labelled requests as training rows (JSONL)")
    export.add_argument("--policy", required=True)
    export.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=_feedback)


def _feedback(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from guard.capture import feedback_rows

    if not settings.redis_url:
        raise ValueError("feedback lives in Redis: give --redis-url (GUARD_REDIS_URL)")
    rows, redacted = feedback_rows(redis.Redis.from_url(settings.redis_url), args.policy)
    write_jsonl(rows, args.out)
    skipped = f"; {redacted} left out: captured redacted, their text is not known" if redacted else ""
    print(f"wrote {len(rows)} labelled rows of {args.policy} to {args.out}{skipped}")
    return 0


# -- benchmark-policies ---------------------------------------------------------------------------------
def _lodo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", action="append", help="only these policies (repeatable); default: all")
    p.add_argument("--out", type=Path, default=Path("reports/lodo"), help="writes lodo.json and lodo.md here")
    p.add_argument("--no-baselines", action="store_true", help="the probe only (for comparing probe methods)")
    _extra_arg(p)
    _method_args(p)
    p.set_defaults(run=_lodo)


def _lodo(args: argparse.Namespace, settings: Settings) -> int:
    from probes.eval.baselines import BASELINES
    from probes.eval.defaults import recipe_config, recipe_features
    from probes.eval.lodo import evaluate_folds, markdown

    lm = _model(settings)
    config = _method(args, PRESET_LAYERS)
    names = args.policy or list(RECIPES)  # all of them, shipped or not
    splits, rows_of = recipe_features(
        lm, names, settings.data_dir, config, cache_dir=settings.cache_dir, extra=_extra(args)
    )
    tables = {}
    baselines = () if args.no_baselines else BASELINES
    for name in names:
        train, dev, _ = splits[name]
        dataset = Dataset(train.rows + dev.rows)
        own = recipe_config(name, config, own_rule=_own_rule(args))
        tables[name] = evaluate_folds(lm, name, dataset, rows_of(name, dataset), own, baselines)
        print(f"{name}: {len(tables[name])} held-out sources", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lodo.json").write_text(json.dumps(tables, indent=2))
    (args.out / "lodo.md").write_text(markdown(tables))
    print(markdown(tables))
    return 0


# -- calibrate ------------------------------------------------------------------------------------------
def _calibrate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", action="append", help="only these policies (repeatable); default: every default one")
    p.add_argument("--out", type=Path, help="the trained policies' directory (default: the shipped ones)")
    p.set_defaults(run=_calibrate)


def _calibrate(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import replace

    from probes.eval.calibration import METHODS, calibrate, fold_scores
    from probes.eval.defaults import PRESET_CONFIG, recipe_config, recipe_features

    default = list(PRESETS["default"])
    names = args.policy or default
    if set(names) - set(default):
        raise ValueError(f"calibrate takes the default policies: {', '.join(default)}")
    home = args.out or shipped_home(settings.dtype)
    lm = _model(settings)
    probes = {name: LinearProbe.load(home / name, model_fingerprint=lm.fingerprint) for name in names}
    every_layer = replace(PRESET_CONFIG, layers=None)
    splits, rows_of = recipe_features(lm, names, settings.data_dir, every_layer, cache_dir=settings.cache_dir)
    print("| policy | " + " | ".join(f"held-out ECE, {m}" for m in METHODS) + " | carried |")
    print("|---|" + "---|" * (len(METHODS) + 1))
    for name, probe in probes.items():
        train, dev, _ = splits[name]
        dataset = Dataset(train.rows + dev.rows)
        features = rows_of(name, dataset)[:, list(probe.layers)]  # fold probes read the probe's own layers
        config = replace(recipe_config(name, PRESET_CONFIG), layers=probe.layers)
        probe, record = calibrate(probe, fold_scores(lm, name, dataset, features, config))
        probe.save(home / name)
        ece = record["heldout_ece"]
        print(f"| `{name}` | " + " | ".join(f"{ece[m]:.3f}" for m in METHODS) + f" | {record['method']} |")
    print(f"wrote {len(names)} calibrated probe(s) under {home}", file=sys.stderr)
    return 0


# -- fit-set --------------------------------------------------------------------------------------------
def _fit_set_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy-file", type=Path, help="the policy set (default: GUARD_POLICY_FILE)")
    p.add_argument("--max-traffic-fpr", type=float, default=0.02, help="share of ordinary traffic the set may flag")
    p.add_argument(
        "--out", type=Path, required=True, help="where the policy file goes, with the fitted threshold_shift"
    )
    p.set_defaults(run=_fit_set)


def _fit_set(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import replace

    from guard.policy import load_policies, with_shift
    from guard.scoring import policy_thresholds
    from probes.eval.sets import fit_set_shift, score_set, set_fpr
    from probes.probe import shifted

    if not 0 <= args.max_traffic_fpr < 1:
        raise ValueError("--max-traffic-fpr must be in [0, 1)")
    path = args.policy_file or settings.policy_file
    policies = [p for p in load_policies(path) if p.on_prompt]  # the traffic is prompts
    lm = _model(settings)
    probes = {
        p.name: LinearProbe.load(resolve_probe(p.probe, lm.fingerprint), model_fingerprint=lm.fingerprint)
        for p in policies
    }
    unshifted = [replace(p, shift=0.0) for p in policies]  # the thresholds the set is served at without a shift
    own = dict(zip(probes, policy_thresholds(unshifted, [probes[p.name] for p in policies]), strict=True))
    scores = score_set(lm, probes, settings.data_dir, cache_dir=settings.cache_dir)
    fixed = {p.name for p in policies if not p.shifts}  # they block or intervene: their thresholds stay
    scales = {name: probe.calibration_slope for name, probe in probes.items()}
    shift = fit_set_shift(scores.fit, own, args.max_traffic_fpr, fixed, scales)
    args.out.write_text(with_shift(path, shift))
    print(f"threshold_shift {shift:.6f} (fitted on {scores.rows[0]} traffic prompts, checked on {scores.rows[1]})")
    print("| policy | threshold | dev TPR |\n|---|---|---|")
    for name, threshold in own.items():
        moved = threshold if name in fixed else shifted(threshold, shift * scales[name])
        tpr = [float(np.mean(scores.positives[name] > t)) for t in (threshold, moved)]
        print(f"| `{name}` | {threshold:.4f} -> {moved:.4f} | {tpr[0]:.3f} -> {tpr[1]:.3f} |")
    for half in ("fit", "check"):
        before, after = (set_fpr(getattr(scores, half), own, s, fixed, scales) for s in (0.0, shift))
        print(f"any policy flags, {half} half of the traffic: {before:.3f} -> {after:.3f}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
