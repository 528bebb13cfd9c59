import torch
from torch import nn

from probes.lm.quantize import RowInt8Linear, quantize_int8


def _linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 48, bias=bias).requires_grad_(False)


def test_row_int8_linear_is_close_to_the_float_product():
    linear = _linear()
    x = torch.randn(5, 7, 64) * torch.logspace(-2, 2, 5)[:, None, None]  # rows of very different magnitudes
    want = linear(x)
    got = RowInt8Linear(linear)(x)
    assert got.shape == want.shape
    for row in range(5):  # each row relative to its own size: a small row is not drowned by a large one
        assert float((got[row] - want[row]).norm() / want[row].norm()) < 0.03, row


def test_a_rows_result_does_not_depend_on_the_other_rows():
    quantized = RowInt8Linear(_linear())
    x = torch.randn(3, 4, 64)
    x[1] *= 100.0  # a loud neighbour would set torch's per-tensor scale
    together = quantized(x)
    for batch in range(3):
        for token in range(4):
            assert torch.equal(together[batch, token], quantized(x[batch, token][None])[0])


def test_quantize_int8_swaps_every_linear_and_keeps_the_bias():
    model = nn.Sequential(_linear(), nn.ReLU(), nn.Sequential(nn.Linear(48, 8, bias=False)))
    bias = model[0].bias.detach().clone()
    quantize_int8(model)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model[0], RowInt8Linear) and torch.equal(model[0].bias, bias)
    assert model[2][0].bias is None
    assert model(torch.randn(2, 64)).shape == (2, 8)
