"""Streamed reply scores (``probes.stream``): calibrated offline, computed alike by the engine."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import torch

from guard.engine.loop import _running
from guard.engine.tap import LayerTap
from guard.policy import Action, Policy, Stage
from guard.scoring import ProbeBank
from probes.data import Dataset, Row
from probes.probe import LinearProbe, sigmoid
from probes.stream import calibrate, ema, is_reply_data, traces
from tests.test_engine import PROMPTS, probe_for, request, run


def streaming(probe: LinearProbe, alpha: float, threshold: float = 0.5) -> LinearProbe:
    return replace(
        probe, manifest={**probe.manifest, "stream": {"scorer": "ema", "alpha": alpha, "threshold": threshold}}
    )


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.7])
def test_the_engine_scores_a_stream_as_the_offline_scorer_does(tiny_lm, alpha):
    probe = probe_for(tiny_lm)
    probe = streaming(probe, alpha) if alpha else probe
    bank = ProbeBank.build([probe], [None], ["toy"])
    layer = probe.layers[0]
    hidden = torch.randn(12, tiny_lm.hidden_size, generator=torch.Generator().manual_seed(0))
    state, engine_scores = torch.zeros(1), []
    for t in range(len(hidden)):
        tap = LayerTap([], {layer})
        tap(layer, hidden[t].reshape(1, 1, -1))
        total, scores = _running(bank, torch.tensor([True]), tap, slice(None), [state], torch.tensor([[t + 1.0]]))
        state, _ = total[0], engine_scores.append(float(scores[0, 0]))
    weight, bias = probe.folded()
    logits = hidden.double().numpy() @ weight[0]
    offline = ema(logits, alpha) if alpha else np.cumsum(logits) / np.arange(1, len(logits) + 1)
    assert engine_scores == pytest.approx(sigmoid(offline + bias).tolist(), abs=1e-5)


def test_a_streaming_probe_is_held_to_its_streamed_threshold(tiny_lm):
    plain, streamed = probe_for(tiny_lm), streaming(probe_for(tiny_lm), 0.1, threshold=0.83)
    bank = ProbeBank.build([plain, streamed, streamed], [None, None, 0.4], ["a", "b", "c"])
    assert bank.thresholds.tolist() == pytest.approx([plain.threshold, 0.83, 0.4])  # a policy's own wins
    assert bank.alpha.tolist() == pytest.approx([0.0, 0.1, 0.1])


def test_a_set_shift_moves_each_policys_threshold_by_the_same_logits(tiny_lm):
    from guard.scoring import policy_thresholds

    probe = probe_for(tiny_lm)
    own = Policy("a", "a", threshold=0.5, shift=np.log(3.0))  # logit 0 + log 3: odds 3, probability 0.75
    plain = Policy("b", "b")
    assert policy_thresholds([own, plain], [probe, probe]) == pytest.approx([0.75, probe.threshold])
    # on a calibrated probe the shift is in its uncalibrated logits: it flags what the uncalibrated one would
    calibrated = probe.calibrated(0.5, -1.0, {"method": "platt"})
    shifted_policy = Policy("c", "c", shift=np.log(3.0))
    (moved,) = policy_thresholds([shifted_policy], [calibrated])
    (raw,) = policy_thresholds([shifted_policy], [probe])
    assert moved == pytest.approx(float(sigmoid(0.5 * np.log(raw / (1 - raw)) - 1.0)))


def test_a_moving_average_of_weight_one_reads_each_token_as_last_pooling_does(tiny_lm, engine_for):
    policy = Policy("toy", "toy", Stage.OUTPUT, Action.FLAG, threshold=0.55)
    last = replace(probe_for(tiny_lm), pooling="last")
    _, by_last, _ = asyncio.run(run(engine_for([policy], [last]), request(tiny_lm, PROMPTS[1], 16)))
    _, by_ema, _ = asyncio.run(
        run(engine_for([policy], [streaming(probe_for(tiny_lm), 1.0)]), request(tiny_lm, PROMPTS[1], 16))
    )
    a, b = by_last.verdicts["toy"], by_ema.verdicts["toy"]
    assert a.score == pytest.approx(b.score, abs=1e-6) and a.detected_at_token == b.detected_at_token


def test_calibration_holds_dev_streams_to_the_target_fpr(tiny_lm, tmp_path):
    rows = [Row(f"Reply number {i}: " + "word " * (i % 7 + 1), i % 2, prompt=f"Question {i}?") for i in range(40)]
    dev = Dataset(tuple(rows))
    assert is_reply_data(dev) and not is_reply_data(Dataset((Row("a prompt", 0),)))
    probe = calibrate(tiny_lm, probe_for(tiny_lm), dev, target_fpr=0.1, alpha=0.2)
    stream = probe.manifest["stream"]
    peaks = np.array([t.max() for t in traces(tiny_lm, probe, dev, 0.2)])
    negatives = peaks[np.asarray(dev.labels) == 0]
    assert stream["dev_fpr"] == pytest.approx((negatives > stream["threshold"]).mean()) and stream["dev_fpr"] <= 0.1
    probe.save(tmp_path / "toy")
    assert LinearProbe.load(tmp_path / "toy").stream == (0.2, pytest.approx(stream["threshold"]))
