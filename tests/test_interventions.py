"""The per-row operators of the shared decode batch (guard.interventions): what they do to a row does not
depend on which other rows share its batch, to the bit, since an int8 product after them can turn a
1e-6 difference into a different token."""

from __future__ import annotations

import numpy as np
import torch

from guard.interventions import Ablation, Steering
from probes.direction import Direction

D_MODEL = 576


def test_ablation_projects_out_masked_rows_only_and_is_bitwise_alike_in_any_batch():
    rng = np.random.default_rng(0)
    ablation = Ablation([{3: rng.normal(size=D_MODEL)}, {3: rng.normal(size=D_MODEL), 5: rng.normal(size=D_MODEL)}])
    hidden = torch.from_numpy(rng.normal(scale=30, size=(4, 1, D_MODEL)).astype(np.float32))
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    batched = ablation.apply(3, hidden, mask)
    for row in range(4):
        assert torch.equal(ablation.apply(3, hidden[row : row + 1], mask[row : row + 1])[0], batched[row]), row
    assert torch.equal(batched[1], hidden[1])  # no direction selected: untouched
    directions = ablation.directions[3]
    for row in (0, 2):  # one direction each (several are projected out at once, not one after another)
        selected = directions[mask[row].bool()]
        assert float((batched[row] @ selected.T).abs().max()) < 1e-3  # of |h . r| ~ 30
        assert float((hidden[row] @ selected.T).abs().max()) > 1.0


def test_steering_adds_each_rows_strengths_bitwise_alike_in_any_batch():
    rng = np.random.default_rng(1)
    vectors = [rng.normal(size=(1, D_MODEL)).astype(np.float32) for _ in range(3)]
    steering = Steering([Direction(f"d{i}", (3,), v, np.ones(1), 3, 5.0) for i, v in enumerate(vectors)])
    strengths = torch.tensor([[1.5, 0.0, 0.3], [0.0, -2.0, 0.0], [2.0, -3.0, 7.1], [0.7, 1.1, -0.2]])
    batched = steering.additions(strengths)[3]
    for row in range(4):
        assert torch.equal(steering.additions(strengths[row : row + 1])[3][0], batched[row]), row
    expected = strengths.numpy() @ np.concatenate(vectors)
    np.testing.assert_allclose(batched.numpy(), expected, rtol=1e-5, atol=1e-5)
