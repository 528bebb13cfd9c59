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


def test_int8_smoothing_is_chosen_once_and_read_back_exactly(tiny_model_dir, tmp_path):
    """A second int8 load reads the smoothing the first chose, and computes bitwise the same."""
    from probes.lm.model import load_model

    first = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype="int8")
    stored = list((tmp_path / "int8-smoothing").glob("*.safetensors"))
    assert len(stored) == 1
    second = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype="int8")
    fresh = load_model(str(tiny_model_dir), cache_dir=tmp_path / "elsewhere", dtype="int8")
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        logits = [lm.model(input_ids=ids).logits for lm in (first, second, fresh)]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    assert first.fingerprint == second.fingerprint == fresh.fingerprint


def test_a_stored_smoothing_file_for_other_layers_is_chosen_again(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from probes.lm.model import load_model

    load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype="int8")
    (stored,) = (tmp_path / "int8-smoothing").glob("*.safetensors")
    save_file({"not.a.layer": torch.ones(3)}, stored)
    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype="int8")
    reference = load_model(str(tiny_model_dir), cache_dir=tmp_path / "elsewhere", dtype="int8")
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode():
        assert torch.equal(lm.model(input_ids=ids).logits, reference.model(input_ids=ids).logits)


def test_the_int8_product_is_exact_at_the_activation_bits_it_is_given():
    """On 8 bits, a kernel that adds u8 x s8 pairs in 16 bits saturates; ``activation_bits`` must not pick 8 there."""
    from probes.lm.quantize import PackedInt8, activation_bits

    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (32, 64)).float()
    weight[:, :2] = 127.0  # the largest weights against the largest activations: the sum a 16-bit pair would clip
    rows = torch.rand(6, 64) * 2 - 1
    rows[:, :2] = 1.0
    framed = torch.cat([rows, torch.tensor([[1.0, -1.0] + [0.0] * 62])])
    packed = PackedInt8(weight)
    assert packed.reduce_range == (activation_bits() == 7)
    got = torch.ops.quantized.linear_dynamic(framed, packed.packed, packed.reduce_range)[:-1]
    levels = 2 ** activation_bits() - 1
    scale = 2.0 / levels  # the frame row pins the activations' range to [-1, 1]
    zero = round(1.0 / scale)
    grid = (torch.round(rows / scale) + zero).clamp(0, levels) - zero
    stored, _ = torch.ops.quantized.linear_unpack(packed.packed)
    want = (grid * scale) @ stored.dequantize().T
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-3)


def test_products_on_one_input_share_their_smoothing_and_it_beats_every_fixed_strength(tiny_model_dir):
    """q/k/v (and gate/up) read one input, so one divisor serves them fused or not; the chosen one errs least."""
    from probes.lm import quantize
    from probes.lm.model import load_model

    lm = load_model(str(tiny_model_dir))
    model, tokenizer = lm.model, lm.tokenizer
    divisors = quantize.smoothing(model, tokenizer)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert divisors[attention.q_proj] is divisors[attention.k_proj] is divisors[attention.v_proj]
    assert divisors[mlp.gate_proj] is divisors[mlp.up_proj]
    assert divisors[attention.o_proj] is not divisors[attention.q_proj]
    groups = quantize._calibration_inputs(model, [mlp.down_proj], [[1, 5, 9, 2, 7, 3]])
    ((members, rows),) = groups
    want = mlp.down_proj(rows)
    floor = rows.abs().amax(0).clamp_min(quantize._FLOOR)

    def error(divisor: torch.Tensor) -> float:
        return float((quantize.RowInt8Linear(mlp.down_proj, divisor)(rows) - want).norm() / want.norm())

    chosen = error(quantize._best_divisor(members, rows))
    assert all(chosen <= error(floor**alpha) for alpha in quantize.ALPHAS)
