"""Orthogonalised weights compute what the original model computes with the direction ablated after every write."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from probes.lm.hooks import layer_output, replace_output
from probes.lm.layers import decoder_layers
from probes.lm.orthogonalize import RESIDUAL_WRITES, orthogonalize

IDS = torch.tensor([[1, 17, 42, 9, 250, 3, 77, 5], [8, 8, 100, 31, 2, 64, 12, 90]])


@contextmanager
def ablated_at_every_write(model, direction: torch.Tensor):
    """The runtime form: forward hooks project ``direction`` out of the embedding's output and out of each
    layer's attention and MLP output (the writes to the residual stream)."""
    unit = direction / direction.norm()

    def project(module, args, output):
        hidden = layer_output(output)
        return replace_output(output, hidden - (hidden @ unit)[..., None] * unit)

    modules = [model.get_input_embeddings()]
    for layer in decoder_layers(model):
        modules += [layer.self_attn, layer.mlp]
    handles = [m.register_forward_hook(project) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _with_uneven_norms(model):
    """Random init leaves every RMSNorm weight at 1, which keeps a normed stream orthogonal to the direction
    and would hide a tied output embedding that was orthogonalised too."""
    generator = torch.Generator().manual_seed(3)
    for name, weight in model.named_parameters():
        if "norm" in name:
            weight.copy_(torch.rand(weight.shape, generator=generator) + 0.5)
    return model


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def _small(kind: str):
    torch.manual_seed(0)
    shape = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    config, model = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    return _with_uneven_norms(model(config(**shape)).eval().requires_grad_(False))


def _check(original, exported, direction: torch.Tensor, tolerance: float = 1e-4) -> None:
    with ablated_at_every_write(original, direction):
        want = _logits(original)
    got = _logits(exported)
    assert not torch.allclose(want, _logits(original), atol=1e-3)  # the ablation changes what the model says
    assert torch.allclose(got, want, atol=tolerance, rtol=tolerance), float((got - want).abs().max())


def _llama(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    return _with_uneven_norms(model)


def test_exported_llama_weights_equal_ablation_at_every_write_and_reload_with_transformers(tiny_lm, tmp_path):
    direction = torch.randn(tiny_lm.hidden_size, generator=torch.Generator().manual_seed(1))
    original, copy = _llama(tiny_lm.path), _llama(tiny_lm.path)
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight  # tied, as SmolLM2's are
    orthogonalize(copy, direction)
    copy.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert not reloaded.config.tie_word_embeddings
    # the output embedding still reads the stream through the original matrix
    assert torch.equal(reloaded.get_output_embeddings().weight, original.get_output_embeddings().weight)
    _check(original, reloaded, direction)
    with torch.inference_mode():  # the stream never has a component along the direction (the last is normed)
        hidden = reloaded(input_ids=IDS, output_hidden_states=True).hidden_states[:-1]
    unit = direction / direction.norm()
    assert max(float((h @ unit).abs().max()) for h in hidden) < 1e-5


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_other_llama_like_architectures(kind):
    original, exported = _small(kind), _small(kind)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(2))
    orthogonalize(exported, direction)
    _check(original, exported, direction)


def test_bad_directions_and_architectures_are_refused(tiny_lm):
    copy = AutoModelForCausalLM.from_pretrained(tiny_lm.path, dtype=torch.float32).eval().requires_grad_(False)
    for bad in (torch.zeros(tiny_lm.hidden_size), torch.ones(3), torch.full((tiny_lm.hidden_size,), float("nan"))):
        with pytest.raises(ValueError, match="finite, non-zero vector"):
            orthogonalize(copy, bad)
    copy.config.model_type = "gemma3"
    with pytest.raises(ValueError, match=", ".join(sorted(RESIDUAL_WRITES))):
        orthogonalize(copy, torch.ones(tiny_lm.hidden_size))


def test_cli_export_writes_a_model_that_loads_and_computes_the_ablation(tiny_lm, tiny_model_dir, tmp_path, capsys):
    import json

    import numpy as np

    from guard.cli import main
    from probes.direction import from_means
    from probes.lm.model import load_model

    rng = np.random.default_rng(0)
    means = rng.normal(size=(2, tiny_lm.num_layers, tiny_lm.hidden_size)).astype(np.float32)
    direction = from_means("toy", means[0], means[1], layer=2, strength=1.0, model_fingerprint=tiny_lm.fingerprint)
    direction.save(tmp_path / "toy")
    common = ["export", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--ablate", str(tmp_path / "toy"), "--out", str(tmp_path / "out")]) == 0
    exported = load_model(str(tmp_path / "out"), cache_dir=tmp_path / "cache", dtype="float32")
    manifest = json.loads((tmp_path / "out" / "guard_export.json").read_text())
    assert manifest["fingerprint"] == exported.fingerprint != tiny_lm.fingerprint
    assert manifest["source_fingerprint"] == tiny_lm.fingerprint and manifest["layer"] == 2
    vector = torch.from_numpy(direction.vector(2))
    original = _llama(tiny_model_dir)
    _with_uneven_norms(exported.model)  # the same norms on both sides
    _check(original, exported.model, vector)

    capsys.readouterr()
    assert main([*common, "--ablate", str(tmp_path / "toy"), "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*common, "--ablate", str(tmp_path / "toy"), "--layer", "9", "--out", str(tmp_path / "o2")]) == 2
    assert "no vector at layer 9" in capsys.readouterr().err
    other = from_means("other", means[0], means[1], layer=2, strength=1.0, model_fingerprint="sha256:else")
    other.save(tmp_path / "other")
    assert main([*common, "--ablate", str(tmp_path / "other"), "--out", str(tmp_path / "o3")]) == 2
    assert not (tmp_path / "o3").exists()
