"""The lean decode step computes what transformers' forward computes: logits, every layer's output, the cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from probes.lm import room
from probes.lm import step as decoder
from probes.lm.batch import BatchCache
from probes.lm.hooks import capture
from probes.lm.model import LoadedModel, load_model
from probes.lm.prefix import PrefixCache
from probes.lm.step import DecodeStep

# both paths round at the same points: every int8 Linear quantises each row on its own (probes.lm.quantize),
# so a fused product quantises what its parts do (on the real model a ~1e-6 float difference can still
# cross an int8 rounding boundary: tests/test_real_model.py)
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-5, "int8": 1e-5}
INVARIANCE = {"float32": 1e-6, "bfloat16": 1e-2, "int8": 0.0}  # a row batched vs alone (0: bitwise)


def prefilled(lm: LoadedModel, texts: list[str]) -> tuple[BatchCache, torch.Tensor, torch.Tensor]:
    """As the engine builds its batch: each text prefilled alone, the caches left-padded into one.

    Returns the batch cache and the next ids and positions ``[rows, 1]``.
    """
    batch = BatchCache(lm.model.config)
    ids, positions = [], []
    with torch.inference_mode():
        for text in texts:
            encoded = lm.tokenizer(text)["input_ids"]
            cache = DynamicCache(config=lm.model.config)
            out = lm.model(input_ids=torch.tensor([encoded]), cache=cache, use_cache=True, logits_to_keep=1)
            batch.add(cache, len(encoded))
            ids.append([int(out.logits[0, -1].argmax())])
            positions.append([len(encoded)])
    return batch, torch.tensor(ids), torch.tensor(positions)


def lean_step(lm: LoadedModel, texts: list[str]) -> tuple[torch.Tensor, dict[int, torch.Tensor], DynamicCache]:
    """The lean step's logits, layer outputs and grown cache for the token after each of ``texts``, batched."""
    batch, ids, positions = prefilled(lm, texts)
    seen: dict[int, torch.Tensor] = {}

    def record(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        seen[layer] = hidden
        return hidden

    mask = batch.step_mask()
    with torch.inference_mode():
        logits = lm.decoder(ids, positions, batch.cache, None if bool(mask.all()) else mask, record)
    return logits, seen, batch.cache


def close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> bool:
    return torch.allclose(got.float(), want.float(), atol=tolerance * float(want.abs().max()), rtol=0)


def transformers_step(lm: LoadedModel, texts: list[str]) -> tuple[torch.Tensor, dict[int, torch.Tensor], DynamicCache]:
    """What ``lean_step`` returns, from transformers' own forward on the same batch."""
    batch, ids, positions = prefilled(lm, texts)
    with torch.inference_mode(), capture(lm.model, range(lm.num_layers)) as hidden:
        mask = batch.step_mask()
        out = lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=batch.cache, use_cache=True)
    return out.logits[:, -1], hidden, batch.cache


def compare_one_step(lm: LoadedModel, texts: list[str], tolerance: float) -> None:
    """The lean step against transformers' forward on the same batch: logits, every layer, the cache."""
    expected, expected_hidden, expected_cache = transformers_step(lm, texts)
    logits, seen, cache = lean_step(lm, texts)
    assert close(logits, expected, tolerance)
    if tolerance < 1e-3:
        assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()
    for layer in range(lm.num_layers):
        assert seen[layer].shape == expected_hidden[layer].shape
        assert close(seen[layer], expected_hidden[layer], tolerance), layer
    for fast_layer, layer in zip(cache.layers, expected_cache.layers, strict=True):
        assert fast_layer.keys.shape == layer.keys.shape
        assert close(fast_layer.values, layer.values, tolerance)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_decode_step_matches_transformers_with_padding(tiny_model_dir, tmp_path, dtype, compiled):
    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype=dtype, compiled=compiled)
    assert isinstance(lm.decoder, DecodeStep)
    compare_one_step(lm, ["How do I bake bread today?", "Hi"], TOLERANCE[dtype])  # row 2 is left-padded
    compare_one_step(lm, ["What is the capital of France?"], TOLERANCE[dtype])  # no padding: no mask


def test_compiled_step_picks_its_graph_by_row_count_whichever_compiled_first(tiny_model_dir, tmp_path):
    """A compiled pass checks only its inputs' guards (``decoder._input_guards``): they alone must send one
    row and several rows to their own graphs, here with the one-row graph compiled first."""
    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, compiled=True)
    compare_one_step(lm, ["What is the capital of France?"], TOLERANCE["float32"])
    compare_one_step(lm, ["How do I bake bread today?", "Hi"], TOLERANCE["float32"])
    compare_one_step(lm, ["Hi", "Tell me how to steal a car.", "What is the capital of France?"], TOLERANCE["float32"])
    compare_one_step(lm, ["Hi"], TOLERANCE["float32"])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_rows_step_does_not_depend_on_the_other_rows(tiny_model_dir, tmp_path, dtype, compiled):
    """Batch invariance of the decode step: each row's activation scale is its own on int8, and each row
    attends over its own columns. int8 is bitwise; float products round by the row count (a product's
    blocking depends on it): float32 within 1e-6, bfloat16 within its own rounding.
    """
    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype=dtype, compiled=compiled)
    assert_batch_invariant(lm, INVARIANCE[dtype])


def assert_batch_invariant(lm: LoadedModel, tolerance: float) -> None:
    texts = ["How do I bake bread today?", "Hi", "Tell me how to steal a car, quickly and quietly."]
    logits, hidden, _ = lean_step(lm, texts)
    for row, text in enumerate(texts):
        alone_logits, alone_hidden, _ = lean_step(lm, [text])
        assert close(logits[row], alone_logits[0], tolerance)
        for layer in alone_hidden:
            assert close(hidden[layer][row], alone_hidden[layer][0], tolerance), layer


JOINS = {  # the middle row leaves: a short one, or the longest (every row's padding shrinks)
    "short-leaves": ["How do I bake bread today?", "Hi", "Tell me how to steal a car, quickly and quietly."],
    "longest-leaves": ["How do I bake bread today?", "Tell me how to steal a car, quickly and quietly.", "Hi"],
}


def decode_with_joins(
    lm: LoadedModel, texts: list[str] = JOINS["short-leaves"], steps: int = 12
) -> tuple[list[torch.Tensor], BatchCache]:
    """Greedy steps over a batch that loses its middle row after step 4 and gains a row after step 7."""
    batch, ids, positions = prefilled(lm, texts)
    seen = []
    with torch.inference_mode():
        for step in range(steps):
            mask = batch.step_mask()
            logits = lm.decoder(ids, positions, batch.cache, None if bool(mask.all()) else mask)
            batch.advance()
            seen.append(logits)
            ids, positions = logits.argmax(-1, keepdim=True), positions + 1
            if step == 4:
                batch.keep([0, 2])
                ids, positions = ids[[0, 2]], positions[[0, 2]]
            if step == 7:
                joining, next_id, position = prefilled(lm, ["What is the capital of France?"])
                batch.add(joining.cache, joining.width)
                ids, positions = torch.cat([ids, next_id]), torch.cat([positions, position])
    return seen, batch


@pytest.mark.parametrize("made_by", ["batch", "step"])
@pytest.mark.parametrize("joins", JOINS)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_appending_in_place_decodes_bitwise_as_concatenating(
    tiny_model_dir, tmp_path, monkeypatch, compiled, joins, made_by
):
    """The cache grown in place (views of buffers with spare columns, reallocated when full or when rows
    leave or join) gives bitwise the logits and cache that concatenating at every step gives: in place from
    the first step, in the room the batch made, or from the third, in one the step made from the columns
    it had concatenated (knowing nothing of the rows' padding)."""
    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype="int8", compiled=compiled)
    monkeypatch.setattr(decoder, "IN_PLACE_FROM", 10**9)
    concatenated, concatenated_batch = decode_with_joins(lm, JOINS[joins])
    width = prefilled(lm, JOINS[joins])[0].width
    monkeypatch.setattr(decoder, "IN_PLACE_FROM", 4 if made_by == "batch" else width + 2)
    monkeypatch.setattr(room, "ROOM", 2)  # full every other step
    appends = []
    append = room.Room.append
    monkeypatch.setattr(room.Room, "append", lambda self, *a: appends.append(1) or append(self, *a))
    in_place, batch = decode_with_joins(lm, JOINS[joins])
    assert len(appends) >= 2 * lm.num_layers  # steps appended in place
    assert all(torch.equal(a, b) for a, b in zip(in_place, concatenated, strict=True))
    for layer, expected in zip(batch.cache.layers, concatenated_batch.cache.layers, strict=True):
        assert torch.equal(layer.keys, expected.keys) and torch.equal(layer.values, expected.values)


def packed_prefill(lm: LoadedModel, texts: list[str], split: int) -> tuple[torch.Tensor, list[dict[int, torch.Tensor]]]:
    """The lean prefill of ``texts`` in one pass, each after its first ``split`` tokens (computed alone and kept).

    Returns the logits after each text and, per text, every layer's outputs ``[tokens after split, d_model]``.
    """
    segments = [
        PrefixCache(lm.decoder, lm.model.config).segment(tuple(lm.tokenizer(t)["input_ids"]), split) for t in texts
    ]
    seen: dict[int, torch.Tensor] = {}

    def record(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        seen[layer] = hidden[:, 0]
        return hidden

    with torch.inference_mode():
        logits = lm.decoder.prefill(segments, record)
    ends = torch.tensor([len(s.ids) for s in segments]).cumsum(0).tolist()
    return logits, [
        {k: v[end - len(s.ids) : end] for k, v in seen.items()} for s, end in zip(segments, ends, strict=True)
    ]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("split", [0, 3])
def test_packed_prefill_matches_transformers_and_each_prompt_alone(tiny_model_dir, tmp_path, dtype, split, compiled):
    """Prompts prefilled in one pass: what transformers' forward computes for each (logits and every layer,
    within TOLERANCE), and what each gets prefilled alone (within INVARIANCE: bitwise on int8)."""
    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype=dtype, compiled=compiled)
    texts = ["How do I bake bread today?", "Hi there", "Tell me how to steal a car, quickly and quietly."]
    logits, hidden = packed_prefill(lm, texts, split)
    # after a prefix computed apart, sums run in another order: bfloat16 then agrees to its own rounding
    tolerance = max(TOLERANCE[dtype], INVARIANCE[dtype]) if split else TOLERANCE[dtype]
    for row, text in enumerate(texts):
        with torch.inference_mode(), capture(lm.model, range(lm.num_layers)) as expected:
            want = lm.model(input_ids=torch.tensor([lm.tokenizer(text)["input_ids"]])).logits[0, -1]
        alone_logits, alone = packed_prefill(lm, [text], split)
        assert close(logits[row], want, tolerance)
        assert close(logits[row], alone_logits[0], INVARIANCE[dtype])
        for layer in range(lm.num_layers):
            assert close(hidden[row][layer], expected[layer][0, split:], tolerance), layer
            assert close(hidden[row][layer], alone[0][layer], INVARIANCE[dtype]), layer


def mixed_or_apart(lm: LoadedModel, mixed: bool) -> tuple[torch.Tensor, dict[int, torch.Tensor], list[int]]:
    """A decode step of three rows and three prompt chunks (two continuing one cache), in one pass or in a
    step and a prefill pass of their own: the logits (rows', then each chunk's), every layer's outputs (the
    rows', then the chunks' tokens) and the caches' lengths after."""
    from probes.lm.step import Segment

    batch, ids, positions = prefilled(lm, ["How do I bake bread today?", "Hi", "Tell me how to steal a car."])
    prompt = tuple(lm.tokenizer("Write a poem about the sea, the wind and a boat at night.")["input_ids"])
    caches = [DynamicCache(config=lm.model.config) for _ in range(2)]
    segments = [Segment(prompt[:6], caches[0]), Segment(prompt[6:], caches[0]), Segment(prompt[:4], caches[1])]
    seen: dict[int, list[torch.Tensor]] = {}

    def record(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        seen.setdefault(layer, []).append(hidden[:, 0])
        return hidden

    mask = batch.step_mask()
    mask = None if bool(mask.all()) else mask
    with torch.inference_mode():
        if mixed:
            logits = lm.decoder(ids, positions, batch.cache, mask, record, segments)
        else:
            logits = torch.cat(
                [lm.decoder(ids, positions, batch.cache, mask, record), lm.decoder.prefill(segments, record)]
            )
    lengths = [c.get_seq_length() for c in (batch.cache, *caches)]
    return logits, {layer: torch.cat(parts) for layer, parts in seen.items()}, lengths


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_prompt_chunks_riding_in_a_decode_step_compute_what_passes_of_their_own_do(
    tiny_model_dir, tmp_path, dtype, compiled
):
    """A decode step that carries prompt chunks in its pass gives every row and every chunk what a step and a
    prefill pass of their own give them: logits, every layer's outputs and the caches (bitwise on int8)."""
    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype=dtype, compiled=compiled)
    logits, hidden, lengths = mixed_or_apart(lm, mixed=True)
    want_logits, want_hidden, want_lengths = mixed_or_apart(lm, mixed=False)
    assert logits.shape == want_logits.shape == (6, lm.model.config.vocab_size) and lengths == want_lengths
    assert close(logits, want_logits, INVARIANCE[dtype])
    for layer, expected in want_hidden.items():
        assert close(hidden[layer], expected, INVARIANCE[dtype]), layer
    with pytest.raises(ValueError, match="mixes is False"):
        lm.step(fast=False)(
            torch.tensor([[1]]), torch.tensor([[0]]), DynamicCache(config=lm.model.config), segments=[1]
        )


def test_fused_weights_share_the_originals_storage(tiny_lm):
    attention = tiny_lm.model.model.layers[0].self_attn
    fused = tiny_lm.decoder.qkv[0].weight
    assert attention.q_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert torch.equal(fused[: attention.q_proj.out_features], attention.q_proj.weight)
    assert torch.equal(fused[-attention.v_proj.out_features :], attention.v_proj.weight)


def test_no_decode_step_where_it_may_not_fit(tiny_model_dir, tmp_path):
    assert load_model(str(tiny_model_dir), cache_dir=tmp_path, layer_path="model.layers").decoder is None


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_segments_on_one_cache_in_one_pass_are_the_passes_one_after_the_other(
    tiny_model_dir, tmp_path, dtype, compiled
):
    """A prompt's chunks packed into one pass continue their cache in order: the same logits and cache as a
    pass per chunk (bitwise on int8), on the lean step and on transformers' forward alike."""
    from probes.lm.step import Segment

    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype=dtype, compiled=compiled)
    ids = tuple(lm.tokenizer("How do I bake bread at home with flour, water and yeast? Write a poem.")["input_ids"])
    pieces = [ids[:7], ids[7:12], ids[12:]]
    for step in (lm.decoder, lm.step(fast=False)):
        with torch.inference_mode():
            packed_cache, alone_cache = DynamicCache(config=lm.model.config), DynamicCache(config=lm.model.config)
            packed = step.prefill([Segment(p, packed_cache) for p in pieces])
            alone = torch.cat([step.prefill([Segment(p, alone_cache)]) for p in pieces])
        tolerance = INVARIANCE[dtype] if step is lm.decoder else TOLERANCE[dtype]
        assert (packed - alone).abs().max() <= tolerance
        assert packed_cache.get_seq_length() == alone_cache.get_seq_length() == len(ids)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_long_prompts_chunks_extend_its_cache_in_place_bitwise_as_concatenating(
    tiny_model_dir, tmp_path, monkeypatch, compiled
):
    """Chunks after the cache's first ``IN_PLACE_FROM`` columns are written into spare columns (views of a
    room's buffers) rather than concatenated: the same logits after every chunk and the same cache, bitwise."""
    from probes.lm.step import Segment

    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype="int8", compiled=compiled)
    ids = tuple(lm.tokenizer("How do I bake bread at home with flour, water and yeast? Write a poem.")["input_ids"])
    chunks = [ids[i : i + 3] for i in range(0, len(ids), 3)]

    def chunked() -> tuple[torch.Tensor, DynamicCache]:
        cache = DynamicCache(config=lm.model.config)
        with torch.inference_mode():
            return torch.cat([lm.decoder.prefill([Segment(chunk, cache)]) for chunk in chunks]), cache

    monkeypatch.setattr(decoder, "IN_PLACE_FROM", 10**9)
    concatenated, concatenated_cache = chunked()
    monkeypatch.setattr(decoder, "IN_PLACE_FROM", 4)
    monkeypatch.setattr(room, "ROOM", 2)  # the buffers fill up every other chunk or so
    in_place, cache = chunked()
    assert not cache.layers[0].keys.is_contiguous()  # a view of a buffer with room
    assert torch.equal(in_place, concatenated)
    for layer, expected in zip(cache.layers, concatenated_cache.layers, strict=True):
        assert torch.equal(layer.keys, expected.keys) and torch.equal(layer.values, expected.values)
