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


def test_packed_int8_weights_equal_torch_ao_per_channel_dynamic_quantisation():
    """The int8 recipe is part of the int8 fingerprint: packing by hand must give torch.ao's weights exactly."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    from probes.lm.quantize import PackedInt8

    torch.manual_seed(0)
    weight = torch.randn(96, 64) * torch.logspace(-3, 1, 96)[:, None]
    weight[0] = 0.0  # a dead channel: scale at its floor
    plain = nn.Linear(64, 96, bias=False).requires_grad_(False)
    plain.weight.copy_(weight)
    plain.qconfig = per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = QuantizedLinear.from_float(plain)._packed_params._packed_params
    want, _ = torch.ops.quantized.linear_unpack(reference)
    got, _ = torch.ops.quantized.linear_unpack(PackedInt8(weight).packed)
    assert torch.equal(got.int_repr(), want.int_repr())
    assert torch.equal(got.q_per_channel_scales(), want.q_per_channel_scales())
    assert torch.equal(got.q_per_channel_zero_points(), want.q_per_channel_zero_points())


def test_int8_ranges_are_measured_once_and_read_back_exactly(tiny_model_dir, tmp_path):
    """A second int8 load reads the calibration ranges the first measured, and computes bitwise the same."""
    from probes.lm.model import load_model

    first = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype="int8")
    stored = list((tmp_path / "int8-ranges").glob("*.safetensors"))
    assert len(stored) == 1
    second = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype="int8")
    fresh = load_model(str(tiny_model_dir), cache_dir=tmp_path / "elsewhere", dtype="int8")
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        logits = [lm.model(input_ids=ids).logits for lm in (first, second, fresh)]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    assert first.fingerprint == second.fingerprint == fresh.fingerprint


def test_a_stored_range_file_for_other_layers_is_measured_again(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from probes.lm.model import load_model

    load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype="int8")
    (stored,) = (tmp_path / "int8-ranges").glob("*.safetensors")
    save_file({"not.a.layer": torch.ones(3)}, stored)
    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype="int8")
    reference = load_model(str(tiny_model_dir), cache_dir=tmp_path / "elsewhere", dtype="int8")
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode():
        assert torch.equal(lm.model(input_ids=ids).logits, reference.model(input_ids=ids).logits)
