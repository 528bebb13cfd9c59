"""Benchmark: releasing a reply's text token by token, by reply length, on the default model's tokenizer.

Side by side, for replies of ``--lengths`` tokens: ``whole``, decoding the whole reply at every token
(what ``guard.textstream.TextStream`` did before), against ``TextStream.push``, which decodes a short
window. Both with a stop string, as a request with ``stop`` has. Prints microseconds per token
(averaged over the reply, and for the last token) and the ratio, checks that both give the same text,
and writes JSON.

    .venv/bin/python tests/bench/bench_detokenize.py [--lengths 64,512,2048]
        [--out tests/bench/results/detokenize.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from guard.textstream import TextStream
from probes.lm.model import load_model

TEXT = "Photosynthesis turns sunlight, water and carbon dioxide into sugar; in Tokyo (東京) it is 🌿 too. "


def whole(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> tuple[list[float], str]:
    """Seconds per token decoding ``ids[:n]`` for every n, and the final text."""
    times, text = [], ""
    for n in range(1, len(ids) + 1):
        started = time.perf_counter()
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        times.append(time.perf_counter() - started)
    return times, text


def windowed(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> tuple[list[float], str]:
    stream, times, pieces = TextStream(tokenizer, stop=("</answer>",)), [], []
    for token in ids:
        started = time.perf_counter()
        pieces.append(stream.push(token))
        times.append(time.perf_counter() - started)
    return times, "".join(pieces) + stream.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,512,2048")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/detokenize.json"))
    args = parser.parse_args()
    tokenizer = load_model().tokenizer
    cells = []
    for length in (int(n) for n in args.lengths.split(",")):
        ids = tokenizer(TEXT * (length // 10 + 1))["input_ids"][:length]
        (whole_times, whole_text), (window_times, window_text) = whole(tokenizer, ids), windowed(tokenizer, ids)
        cell = {
            "tokens": length,
            "whole_us_per_token": sum(whole_times) / length * 1e6,
            "window_us_per_token": sum(window_times) / length * 1e6,
            "whole_last_token_us": whole_times[-1] * 1e6,
            "window_last_token_us": window_times[-1] * 1e6,
            "same_text": whole_text.rstrip("\ufffd") == window_text,  # a cut character is never released
        }
        cell["ratio"] = cell["whole_us_per_token"] / cell["window_us_per_token"]
        cells.append(cell)
        print(json.dumps(cell), flush=True)
    print("\n| reply tokens | whole decode us/token (last) | window us/token (last) | ratio | same text |")
    print("|---|---|---|---|---|")
    for c in cells:
        print(
            f"| {c['tokens']} | {c['whole_us_per_token']:.1f} ({c['whole_last_token_us']:.0f})"
            f" | {c['window_us_per_token']:.1f} ({c['window_last_token_us']:.0f})"
            f" | {c['ratio']:.1f} | {c['same_text']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cells": cells}, indent=2) + "\n")


if __name__ == "__main__":
    main()
