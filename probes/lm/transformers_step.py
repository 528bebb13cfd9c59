"""The step interface over transformers' own forward, for every architecture the lean step does not cover.

It decodes and prefills as ``probes.lm.step.DecodeStep`` does, with the same arguments and the same
layer callback: ``on_layer(layer, hidden)`` sees each decoder layer's output as ``[tokens, 1, d_model]``
(one token a row) and returns what the next layer reads. A prefill runs its segments one after the
other (segments on one cache continue it, in order), so the callback sees each layer once per segment,
segment after segment; a caller that collects the rows of a pass gets them in the same order as from
the lean step's packed pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import DynamicCache, PreTrainedModel

from probes.lm.hooks import hooks, layer_output, replace_output
from probes.lm.layers import decoder_layers
from probes.lm.step import OnLayer, Segment


class TransformersStep:
    compiled = False
    warm = False
    reads_padding = True  # transformers' attention runs over the whole width under the mask
    concurrent_passes = False  # a pass's layer callback is a forward hook on the model, seen by every thread
    mixes = False  # a decode step is the batch's forward alone

    def __init__(self, model: PreTrainedModel, layer_path: str | None = None) -> None:
        self.model, self.layer_path = model, layer_path
        self.layers = len(decoder_layers(model, layer_path))

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        mask: torch.Tensor | None = None,
        on_layer: OnLayer | None = None,
        segments: Sequence[Segment] = (),
    ) -> torch.Tensor:
        """Logits ``[rows, vocab]`` for the token after ``ids`` ``[rows, 1]``; ``mask`` covers the cache and ``ids``."""
        if segments:
            raise ValueError("transformers' forward does not carry prefill segments in a decode step (mixes is False)")
        with self._calling(on_layer):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1]

    def prefill(self, segments: Sequence[Segment], on_layer: OnLayer | None = None) -> torch.Tensor:
        """Logits ``[segments, vocab]`` for the token after each segment's last one; each ``cache`` grows by its ids."""
        logits = []
        with self._calling(on_layer):
            for segment in segments:
                past = segment.cache.get_seq_length()
                positions = torch.arange(past, past + len(segment.ids))[None]
                out = self.model(
                    input_ids=torch.tensor([segment.ids]),
                    position_ids=positions,
                    cache=segment.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                logits.append(out.logits[0, -1])
        return torch.stack(logits)

    def warm_up(self) -> None:
        """Nothing to compile."""

    @contextmanager
    def _calling(self, on_layer: OnLayer | None) -> Iterator[None]:
        """Every layer's output through ``on_layer`` in the one-token-a-row layout, for this call only."""
        if on_layer is None:
            yield
            return

        def hook_for(layer: int):
            def hook(module: torch.nn.Module, args: tuple, output: object) -> object:
                hidden = layer_output(output)  # [rows, pos, d_model]
                changed = on_layer(layer, hidden.transpose(0, 1).reshape(-1, 1, hidden.shape[-1]))
                return replace_output(output, changed.reshape(hidden.shape[1], hidden.shape[0], -1).transpose(0, 1))

            return hook

        with hooks(self.model, {layer: hook_for(layer) for layer in range(self.layers)}, layer_path=self.layer_path):
            yield
