"""Weights that cannot write a direction: every write to the residual stream orthogonalised against it.

Directional ablation (Arditi et al. 2024) removes a unit direction ``r`` from the residual stream at every
layer and position: ``h <- h - (h . r) r``. The residual stream is a sum of writes: the token embedding,
and each layer's attention output projection and MLP down projection. When each of those matrices is
replaced by its part orthogonal to ``r`` (``W <- W - r r^T W`` for a projection writing ``W x``, each
embedding row ``e <- e - (e . r) r``), no write has a component along ``r``, so neither has the stream:
the model computes what it computes with the direction ablated after every write, and needs no
runtime hooks, so any engine that loads the weights serves the ablated model.

The output embedding is not a write. A model whose input and output embeddings are tied is untied
first, so its logits still read the residual stream through the original matrix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from probes.lm.layers import decoder_layers
from probes.lm.model import LoadedModel, fingerprint, staged_directory

MANIFEST = "guard_export.json"

# Architectures whose attention and MLP add their output projection's result to the residual stream
# unchanged (no norm after the projection, as Gemma has), and where those projections live in a layer.
RESIDUAL_WRITES = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
}


@torch.no_grad()
def orthogonalize(model: PreTrainedModel, direction: torch.Tensor) -> None:
    """Orthogonalise ``model``'s residual-stream writes against ``direction`` ``[d_model]``, in place."""
    kind = model.config.model_type
    if kind not in RESIDUAL_WRITES:
        covered = ", ".join(sorted(RESIDUAL_WRITES))
        raise ValueError(
            f"orthogonalising weights covers {covered} models, whose layers add their output projections to "
            f"the residual stream unchanged; {kind!r} is not one of them"
        )
    hidden = int(model.config.hidden_size)
    if direction.shape != (hidden,) or not torch.isfinite(direction).all() or not direction.norm() > 0:
        raise ValueError(f"the direction must be a finite, non-zero vector of {hidden} values")
    unit = (direction.double() / direction.double().norm()).to(model.dtype)
    _untie(model)
    embedding = model.get_input_embeddings().weight
    embedding.copy_(embedding - torch.outer(embedding @ unit, unit))
    for layer in decoder_layers(model):
        for path in RESIDUAL_WRITES[kind]:
            projection = layer.get_submodule(path)
            # weight [d_model, in]: its output W x loses its component along the direction
            projection.weight.copy_(projection.weight - torch.outer(unit, unit @ projection.weight))
            if projection.bias is not None:
                projection.bias.copy_(projection.bias - (projection.bias @ unit) * unit)


def export_ablated(lm: LoadedModel, direction: np.ndarray, out: Path, provenance: dict[str, Any]) -> str:
    """``lm``'s float weights with ``direction`` orthogonalised out, written to ``out`` as a model directory
    (config, safetensors weights, tokenizer, and ``guard_export.json`` saying what was done); returns the new
    weights' fingerprint. ``lm`` itself is changed: load it again to serve the original."""
    if lm.numeric != "float32":
        raise ValueError(f"export writes float32 weights: load the model on float32, not {lm.numeric}")
    orthogonalize(lm.model, torch.from_numpy(np.asarray(direction, dtype=np.float32)))
    exported = fingerprint(lm.model)
    with staged_directory(out) as staging:
        lm.model.save_pretrained(staging)
        lm.tokenizer.save_pretrained(staging)
        manifest = {**provenance, "source": lm.name, "source_fingerprint": lm.fingerprint, "fingerprint": exported}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return exported


def _untie(model: PreTrainedModel) -> None:
    output = model.get_output_embeddings()
    if output is None or output.weight is not model.get_input_embeddings().weight:
        return
    output.weight = torch.nn.Parameter(output.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
