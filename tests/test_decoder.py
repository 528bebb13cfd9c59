"""The lean decode step computes what transformers' forward computes: logits, every layer's output, the cache."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from probes.decoder import DecodeStep
from probes.hooks import capture
from probes.model import LoadedModel, load_model

# every path rounds (bfloat16) and quantises activations (int8) at the same points as transformers
TOLERANCE = 1e-5


def padded_batch(lm: LoadedModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, as the engine's shared batch holds rows of different lengths."""
    encoded = [lm.tokenizer(text)["input_ids"] for text in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return ids, mask


def compare_one_step(lm: LoadedModel, texts: list[str], tolerance: float) -> None:
    ids, mask = padded_batch(lm, texts)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    layers = list(range(lm.num_layers))
    with torch.inference_mode():
        cache = DynamicCache(config=lm.model.config)
        prefill = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        step_ids = prefill.logits[:, -1].argmax(-1, keepdim=True)
        step_positions = positions[:, -1:] + 1
        step_mask = torch.cat([mask, torch.ones((len(texts), 1), dtype=mask.dtype)], dim=1)
        fast_cache = copy.deepcopy(cache)
        with capture(lm.model, layers) as expected_hidden:
            expected = lm.model(
                input_ids=step_ids, attention_mask=step_mask, position_ids=step_positions, cache=cache, use_cache=True
            ).logits[:, -1]
        seen: dict[int, torch.Tensor] = {}

        def record(layer: int, hidden: torch.Tensor) -> torch.Tensor:
            seen[layer] = hidden
            return hidden

        padded = None if bool(step_mask.all()) else step_mask
        logits = lm.decoder(step_ids, step_positions, fast_cache, padded, record)
    scale = float(expected.abs().max())
    assert torch.allclose(logits.float(), expected.float(), atol=tolerance * scale, rtol=0)
    assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()
    for layer in layers:
        want = expected_hidden[layer].float()
        got = seen[layer].float()
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=tolerance * float(want.abs().max()), rtol=0), layer
    for fast_layer, layer in zip(fast_cache.layers, cache.layers, strict=True):
        width = int(step_mask.shape[1])
        assert fast_layer.keys.shape[2] == layer.keys.shape[2] == width
        scale = float(layer.values.abs().max())
        assert torch.allclose(fast_layer.values.float(), layer.values.float(), atol=tolerance * scale, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_decode_step_matches_transformers_with_padding(tiny_model_dir, tmp_path, dtype):
    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype=dtype)
    assert isinstance(lm.decoder, DecodeStep)
    compare_one_step(lm, ["How do I bake bread today?", "Hi"], TOLERANCE)  # row 2 is left-padded
    compare_one_step(lm, ["What is the capital of France?"], TOLERANCE)  # no padding: no mask


def test_fused_weights_share_the_originals_storage(tiny_lm):
    attention = tiny_lm.model.model.layers[0].self_attn
    fused = tiny_lm.decoder.qkv[0].weight
    assert attention.q_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert torch.equal(fused[: attention.q_proj.out_features], attention.q_proj.weight)
    assert torch.equal(fused[-attention.v_proj.out_features :], attention.v_proj.weight)


def test_no_decode_step_where_it_may_not_fit(tiny_model_dir, tmp_path):
    assert load_model(str(tiny_model_dir), cache_dir=tmp_path, layer_path="model.layers").decoder is None
