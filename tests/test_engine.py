"""The generation loop on a tiny random Llama: batching invariance, joins, cancellation, block and ablate."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_hostile import until

from guard.engine import TORCH_THREADS, Engine, QueueFull
from guard.events import Emitted, Failed, Finished, GenerationRequest, Handle, PromptChecked
from guard.policy import ANY, Action, Policy, Stage
from guard.runtime import build_runtime
from guard.sampling import SamplingParams, sample
from guard.settings import Settings
from guard.textstream import TextStream
from probes.data import Dataset, Row
from probes.features import extract
from probes.lm.model import LoadedModel, load_model
from probes.lm.render import render_messages
from probes.lm.transformers_step import TransformersStep
from probes.probe import LinearProbe, logit, sigmoid

PROMPTS = [
    "How do I bake bread?",
    "Write a poem about the sea and the wind.",
    "Tell me how to steal a car.",
    "What is the capital of France?",
]


def probe_for(lm, layer: int = 2, seed: int = 0, threshold: float = 0.5) -> LinearProbe:
    rng = np.random.default_rng(seed)
    d = lm.hidden_size
    return LinearProbe(
        "toy",
        (layer,),
        rng.normal(size=(1, d)).astype(np.float32),
        0.0,
        np.zeros((1, d), np.float32),
        np.ones((1, d), np.float32),
        rng.normal(size=(1, d)).astype(np.float32),
        threshold,
        manifest={"model_fingerprint": lm.fingerprint},
    )


def request(lm, text: str, max_tokens: int = 12, policies=None, stop=()) -> GenerationRequest:
    enc = render_messages(lm.tokenizer, [{"role": "user", "content": text}], span_message=0, add_generation_prompt=True)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0, stop=stop)
    return GenerationRequest(enc.ids, (enc.start, enc.end), sampling, policies)


async def run(engine: Engine, req: GenerationRequest, delay: float = 0.0) -> tuple[str, Finished, list]:
    await asyncio.sleep(delay)
    return await collect(engine.submit(req, asyncio.get_running_loop()))


async def collect(handle: Handle) -> tuple[str, Finished, list]:
    """The reply's text, how it finished, and every event."""
    pieces, events = [], []
    async for event in handle.events():
        events.append(event)
        if isinstance(event, Emitted):
            pieces.append(event.text)
    return "".join(pieces), events[-1], events


@pytest.fixture(params=["lean-step", "compiled", "transformers"])
def path(request) -> str:
    """How the engine runs the model: the lean step, the lean step compiled, transformers' forward."""
    return request.param


@pytest.fixture
def lm_for_path(path, tiny_lm, tiny_compiled_lm) -> LoadedModel:
    return tiny_compiled_lm if path == "compiled" else tiny_lm


def test_batched_equals_alone_including_a_late_join(tiny_lm, engine_for, path, lm_for_path):
    policy = Policy("toy", "toy", Stage.BOTH, Action.FLAG)
    engine = engine_for([policy], [probe_for(tiny_lm)], lm=lm_for_path, fast_decode=path != "transformers")

    async def scenario():
        alone = [await run(engine, request(tiny_lm, p, 16)) for p in PROMPTS]
        together = await asyncio.gather(
            *(run(engine, request(tiny_lm, p, 16), delay=0.05 * i) for i, p in enumerate(PROMPTS))
        )
        return alone, together

    alone, together = asyncio.run(scenario())
    for (text_a, done_a, _), (text_b, done_b, _) in zip(alone, together, strict=True):
        assert text_a == text_b and done_a.completion_tokens == done_b.completion_tokens
        assert done_a.verdicts["toy"].score == pytest.approx(done_b.verdicts["toy"].score, abs=1e-4)


def test_the_engine_reports_queue_wait_prefill_and_decode_step_times(tiny_lm, engine_for):
    engine = engine_for()
    reported: list[tuple[str, float]] = []
    engine.timing = lambda phase, seconds: reported.append((phase, seconds))

    async def two() -> list:
        return await asyncio.gather(*(run(engine, request(tiny_lm, text, 6)) for text in PROMPTS[:2]))

    done = [finished for _, finished, _ in asyncio.run(two())]
    engine.stop()  # the last step reports after its events are out: let the engine thread finish it
    phases = [phase for phase, _ in reported]
    # a pass per prompt at most, or one for both packed, unless a pass beside decoding streams is cut to its share
    assert phases.count("queue_wait") == 2 and phases.count("prefill") >= 1
    # a step checks one token of every row (the first one included): at least as many steps as the longest reply
    assert phases.count("decode_step") >= max(d.completion_tokens for d in done)
    assert all(seconds >= 0 for _, seconds in reported)


def test_lean_decode_step_generates_what_transformers_generates(tiny_lm, engine_for):
    policy = Policy("toy", "toy", Stage.BOTH, Action.FLAG)
    lean = engine_for([policy], [probe_for(tiny_lm)])
    reference = engine_for([policy], [probe_for(tiny_lm)], fast_decode=False)
    assert lean.step is tiny_lm.decoder and isinstance(reference.step, TransformersStep)

    async def together(engine):
        return await asyncio.gather(
            *(run(engine, request(tiny_lm, p, 16), delay=0.05 * i) for i, p in enumerate(PROMPTS))
        )

    outcomes = zip(asyncio.run(together(lean)), asyncio.run(together(reference)), strict=True)
    for (text_a, done_a, _), (text_b, done_b, _) in outcomes:
        assert text_a == text_b and done_a.completion_tokens == done_b.completion_tokens
        assert done_a.verdicts["toy"].score == pytest.approx(done_b.verdicts["toy"].score, abs=1e-5)


def test_cancel_stops_generation(tiny_lm, engine_for):
    engine = engine_for()

    async def scenario():
        handle = engine.submit(request(tiny_lm, PROMPTS[0], 400), asyncio.get_running_loop())
        async for event in handle.events():
            if isinstance(event, Emitted):
                handle.cancel()
            if isinstance(event, Finished):
                return event

    done = asyncio.run(scenario())
    assert done.reason == "cancelled" and done.completion_tokens < 400
    deadline = time.monotonic() + 5  # the row leaves the batch right after the event is sent
    while engine.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.load() == {"running": 0, "waiting": 0}


def test_output_block_emits_nothing_past_the_threshold(tiny_lm, engine_for):
    always = Policy("toy", "toy", Stage.OUTPUT, Action.BLOCK, threshold=0.0, message="no")
    engine = engine_for([always], [probe_for(tiny_lm)])
    text, done, events = asyncio.run(run(engine, request(tiny_lm, PROMPTS[0])))
    assert text == "" and done.reason == "content_filter" and done.message == "no" and done.completion_tokens == 0
    assert done.verdicts["toy"].filtered and done.verdicts["toy"].detected
    assert isinstance(events[0], PromptChecked) and events[0].verdicts == {}  # output-stage only


def test_prompt_block(tiny_lm, engine_for):
    policy = Policy("toy", "toy", Stage.PROMPT, Action.BLOCK, threshold=0.0, message="blocked")
    engine = engine_for([policy], [probe_for(tiny_lm)])
    text, done, events = asyncio.run(run(engine, request(tiny_lm, PROMPTS[2])))
    assert events[0].blocked and events[0].message == "blocked" and events[0].verdicts["toy"].filtered
    assert done.reason == "content_filter" and text == "" and done.verdicts == {}


def test_request_policy_subset(tiny_lm, engine_for):
    policies = [Policy("a", "toy", Stage.BOTH, Action.FLAG), Policy("b", "toy", Stage.PROMPT, Action.BLOCK, 0.0)]
    engine = engine_for(policies, [probe_for(tiny_lm), probe_for(tiny_lm, seed=1)])
    _text, done, events = asyncio.run(run(engine, request(tiny_lm, PROMPTS[0], policies=frozenset({"a"}))))
    assert set(events[0].verdicts) == {"a", ANY} and not events[0].blocked and done.reason in {"stop", "length"}


def test_the_whole_sets_verdict_crosses_where_any_checked_policy_does(tiny_lm, engine_for):
    """``any`` scores the largest margin of a checked policy over its threshold: above 0.5 exactly when one crossed."""
    probe = probe_for(tiny_lm)
    for low, high in ((0.0, 0.999999), (0.999999, 0.999999)):  # one crosses at once / none does
        policies = [
            Policy("low", "toy", Stage.BOTH, Action.FLAG, low),
            Policy("high", "toy", Stage.BOTH, Action.FLAG, high),
        ]
        engine = engine_for(policies, [probe, probe])
        _text, done, events = asyncio.run(run(engine, request(tiny_lm, PROMPTS[0])))
        for verdicts in (events[0].verdicts, done.verdicts):
            members = [verdicts["low"], verdicts["high"]]
            overall = verdicts[ANY]
            assert overall.detected == any(v.detected for v in members) == (low == 0.0)
            assert (overall.score > 0.5) == any(v.score > t for v, t in zip(members, (low, high), strict=True))
            assert overall.action == ANY and not overall.filtered


def test_calibrating_a_probe_changes_its_score_but_not_the_sets_verdict_or_any_score(tiny_lm, engine_for):
    """A calibrated probe reports the mapped score, and with a set's shift it flags what the uncalibrated one
    did; ``any`` reads margins in uncalibrated logits, so it scores the same."""
    probe = probe_for(tiny_lm)
    calibrated = probe.calibrated(0.25, -0.5, {"method": "platt"})

    def verdicts(p: LinearProbe, shift: float) -> dict:
        engine = engine_for([Policy("a", "toy", Stage.BOTH, Action.FLAG, shift=shift)], [p])
        return asyncio.run(run(engine, request(tiny_lm, PROMPTS[0])))[2][0].verdicts

    score = verdicts(probe, 0.0)["a"].score
    crossing = float(logit(score) - logit(probe.threshold))  # the shift at which the uncalibrated probe stops
    for shift in (crossing - 0.05, crossing + 0.05):
        plain, mapped = verdicts(probe, shift), verdicts(calibrated, shift)
        assert mapped["a"].score == pytest.approx(float(sigmoid(0.25 * logit(plain["a"].score) - 0.5)), abs=1e-5)
        assert mapped["a"].detected == plain["a"].detected == (shift < crossing)
        assert mapped[ANY].score == pytest.approx(plain[ANY].score, abs=1e-4)
    assert mapped["a"].score != pytest.approx(plain["a"].score, abs=1e-3)


def reading_its_own_direction(probe: LinearProbe) -> LinearProbe:
    """``probe`` whose ablation direction is what it reads: ablated, it scores sigmoid(bias) = 0.5."""
    return LinearProbe(
        probe.name,
        probe.layers,
        probe.weight,
        probe.bias,
        probe.mean,
        probe.scale,
        probe.weight * 50,
        probe.threshold,
        manifest=probe.manifest,
    )


def test_ablation_fires_and_recomputes(tiny_lm, engine_for, path, lm_for_path):
    flag = Policy("toy", "toy", Stage.OUTPUT, Action.FLAG, threshold=0.0)
    ablate = Policy("toy", "toy", Stage.OUTPUT, Action.ABLATE, threshold=0.0)
    probe = reading_its_own_direction(probe_for(tiny_lm))
    kw = {"lm": lm_for_path, "fast_decode": path != "transformers"}
    flagged = asyncio.run(run(engine_for([flag], [probe], **kw), request(tiny_lm, PROMPTS[1], 16)))
    ablated = asyncio.run(run(engine_for([ablate], [probe], **kw), request(tiny_lm, PROMPTS[1], 16)))
    verdict = ablated[1].verdicts["toy"]
    assert verdict.filtered and verdict.ablated_from_token == 0
    # ablated from the first token on, the probe reads nothing along its own direction: score = sigmoid(bias) = 0.5
    assert verdict.score == pytest.approx(0.5, abs=1e-4)
    assert flagged[1].verdicts["toy"].score != pytest.approx(0.5, abs=1e-2)


def test_rows_of_two_probe_versions_in_one_step_are_scored_by_their_own(tiny_lm, engine_for, monkeypatch):
    """After a hot reload the batch holds rows of two probe sets, which ``_check_tokens`` scores set by set:
    each reply's output verdict is its own version's, with the score it gets alone."""
    policy = Policy("toy", "toy", Stage.OUTPUT, Action.FLAG, threshold=1.0)  # scores every token, never crosses
    old, new = probe_for(tiny_lm, seed=0), probe_for(tiny_lm, seed=2)
    first, second = request(tiny_lm, PROMPTS[0], 40), request(tiny_lm, PROMPTS[1], 12)
    alone_old = asyncio.run(run(engine_for([policy], [old]), first))[1]
    alone_new = asyncio.run(run(engine_for([policy], [new]), second))[1]
    engine = engine_for([policy], [old])
    sets_a_step = []
    check = engine._check_tokens
    monkeypatch.setattr(
        engine,
        "_check_tokens",
        lambda rows, tap: sets_a_step.append(len({id(r.probes) for r in rows})) or check(rows, tap),
    )

    async def scenario():
        loop = asyncio.get_running_loop()
        events = engine.submit(first, loop).events()
        seen = [await anext(events), await anext(events)]  # prompt verdicts, then a first token: it decodes
        assert isinstance(seen[-1], Emitted)
        engine.replace_probe("toy", new)
        joined = asyncio.ensure_future(run(engine, second))
        seen += [event async for event in events]
        return seen[-1], (await joined)[1]

    done_old, done_new = asyncio.run(scenario())
    assert max(sets_a_step) == 2  # the two versions shared decode steps
    assert done_old.verdicts["toy"].score == pytest.approx(alone_old.verdicts["toy"].score, abs=1e-5)
    assert done_new.verdicts["toy"].score == pytest.approx(alone_new.verdicts["toy"].score, abs=1e-5)
    assert done_old.verdicts["toy"].score != pytest.approx(alone_new.verdicts["toy"].score, abs=1e-3)


def test_decode_threads_default_to_one_on_int8(tiny_lm, tiny_model_dir, tmp_path):
    quantised = load_model(str(tiny_model_dir), cache_dir=tmp_path, dtype="int8")
    assert Engine(quantised, (), ()).threads == 1
    assert Engine(tiny_lm, (), ()).threads == torch.get_num_threads()
    assert Engine(quantised, (), (), threads=2).threads == 2  # GUARD_THREADS wins


def test_queue_limit(tiny_lm):
    engine = Engine(tiny_lm, (), (), max_waiting=1)  # not started: nothing drains the queue

    async def scenario():
        loop = asyncio.get_running_loop()
        first = engine.submit(request(tiny_lm, PROMPTS[0]), loop)
        with pytest.raises(QueueFull):
            engine.submit(request(tiny_lm, PROMPTS[1]), loop)
        first.cancel()  # a request that gave up waiting holds no place
        engine.submit(request(tiny_lm, PROMPTS[1]), loop)
        assert engine.load() == {"running": 0, "waiting": 1}
        assert (await anext(first.events())).reason == "cancelled"

    asyncio.run(scenario())


def test_text_stream_holds_back_possible_stop_strings(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok("How do I bake bread? Write a poem")["input_ids"]
    stream = TextStream(tok, stop=("bread?",))
    out = "".join(stream.push(i) for i in ids)
    assert stream.stopped and out == "How do I bake " and "bread" not in out
    plain = TextStream(tok)
    assert "".join(plain.push(i) for i in ids) + plain.flush() == tok.decode(ids)


MIXED = "Crème brûlée, 東京 and 🦀🎉 — twice: crème brûlée, 東京, 🦀🎉!\n\tdone. " * 3


def streamed(tokenizer, ids: list[int]) -> tuple[list[str], str]:
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids]
    return pieces, "".join(pieces) + stream.flush()


def test_text_stream_decodes_a_window_yet_gives_the_whole_decode(tiny_lm):
    tok = tiny_lm.tokenizer
    ids = tok(MIXED)["input_ids"]
    ids = [*ids[:20], tok.eos_token_id, *ids[20:]]  # a special token inside: skipped, as in decode
    pieces, whole = streamed(tok, ids)
    assert whole == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces)  # a character split over tokens waits for its end
    assert "".join(streamed(tok, ids[:-1])[0]) != ""  # text is released as it comes, not only at the end


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_sampling_takes_the_first_maximum_as_torch_does(dtype):
    greedy = SamplingParams(temperature=0)
    logits = torch.randn(2, 5000, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[1, [7, 4000]] = logits[1].max() + 1  # a tie: the first one wins
    with torch.inference_mode():
        assert [sample(row, greedy, None) for row in logits] == logits.argmax(-1).tolist()
    assert sample(logits[1], greedy, None) == 7


def legacy_request(lm, text: str, max_tokens: int = 12) -> GenerationRequest:
    """A legacy completion: generates from the raw text, scores it rendered as a user message."""
    scored = render_messages(
        lm.tokenizer, [{"role": "user", "content": text}], span_message=0, add_generation_prompt=True
    )
    raw = tuple(lm.tokenizer(text)["input_ids"])
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
    return GenerationRequest(raw, (scored.start, scored.end), sampling, score_ids=scored.ids)


@pytest.mark.parametrize("compiled", [False, True], ids=["lean-step", "compiled"])
def test_requests_arriving_together_are_prefilled_in_one_pass_as_if_alone(
    tiny_lm, tiny_compiled_lm, engine_for, monkeypatch, compiled
):
    """Chat prompts, a legacy completion and a request ablating from its first token, submitted at once:
    one packed prefill pass (each after the cached template prefix), and every reply and prompt score is
    what the request gets alone."""
    lm = tiny_compiled_lm if compiled else tiny_lm
    toy = Policy("toy", "toy", Stage.BOTH, Action.FLAG)
    steer = Policy("steer", "toy", Stage.OUTPUT, Action.ABLATE, threshold=1.0, ablate_always=True)
    probe = reading_its_own_direction(probe_for(tiny_lm))
    alone_engine = engine_for([toy, steer], [probe, probe], lm=lm)
    engine = Engine(lm, [toy, steer], [probe, probe])  # started once every request has arrived
    passes = []
    prefill = engine.step.prefill

    def recording(segments, on_layer=None):
        passes.append(len({id(segment.cache) for segment in segments}))  # the prompts (their caches) in a pass
        return prefill(segments, on_layer)

    monkeypatch.setattr(engine.step, "prefill", recording)  # the step is the model's: shared by both engines
    requests = [request(tiny_lm, p, 10, policies=frozenset({"toy"})) for p in PROMPTS]
    requests += [legacy_request(tiny_lm, PROMPTS[2], 10), request(tiny_lm, PROMPTS[0], 10)]  # the last ablates

    async def scenario():
        alone = [await run(alone_engine, r) for r in requests]
        passes.clear()
        handles = [engine.submit(r, asyncio.get_running_loop()) for r in requests]
        engine.start()
        try:
            together = await asyncio.gather(*(collect(h) for h in handles))
        finally:
            engine.stop()
        return alone, together

    alone, together = asyncio.run(scenario())
    assert max(passes) == len(requests) + 1  # the legacy completion scores one segment and generates from another
    assert abs(together[-1][2][0].verdicts["toy"].score - 0.5) < 1e-5  # ablated in the prefill too
    assert abs(together[0][2][0].verdicts["toy"].score - 0.5) > 1e-4  # the same prompt, not ablated
    for (text_a, done_a, events_a), (text_b, done_b, events_b) in zip(alone, together, strict=True):
        assert text_a == text_b and done_a.completion_tokens == done_b.completion_tokens
        assert events_a[0].verdicts["toy"].score == pytest.approx(events_b[0].verdicts["toy"].score, abs=1e-5)


def test_the_server_loads_with_one_thread_and_decodes_with_torchs_default(tiny_model_dir, tmp_path):
    """A thread that ran torch with two OpenMP threads keeps a worker that slows every other thread's
    parallel regions (guard.runtime): the loading thread stays at one, the engine still gets torch's default."""
    (tmp_path / "none.json").write_text(json.dumps({"policies": []}))
    settings = Settings(
        model=str(tiny_model_dir),
        cache_dir=tmp_path,
        policy_file=tmp_path / "none.json",
        compile=False,
        dtype="float32",
    )
    seen = {}

    def load() -> None:
        seen["runtime"] = build_runtime(settings)
        seen["loader_threads"] = torch.get_num_threads()

    loader = threading.Thread(target=load)
    loader.start()
    loader.join()
    assert seen["loader_threads"] == 1
    assert seen["runtime"].engine.threads == TORCH_THREADS


def test_a_compiled_step_compiles_once_for_one_row_and_once_for_more(tiny_compiled_lm, engine_for):
    """Warmed up at start, the compiled step serves prefills and batches of any size without compiling again
    (a new variant mid-serving would stall every stream for seconds and round differently)."""
    engine = engine_for(
        [Policy("toy", "toy", Stage.BOTH, Action.FLAG)], [probe_for(tiny_compiled_lm)], lm=tiny_compiled_lm
    )
    code = engine.step._compiled._torchdynamo_orig_callable.__func__.__code__
    variants = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))

    async def scenario():
        await run(engine, request(tiny_compiled_lm, PROMPTS[0], 8))
        await asyncio.gather(
            *(run(engine, request(tiny_compiled_lm, p, 12), delay=0.02 * i) for i, p in enumerate(PROMPTS))
        )

    asyncio.run(scenario())
    assert variants == 2 and len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code)) == 2


def test_a_failed_compile_fails_start_instead_of_hanging(tiny_model_dir, tmp_path, monkeypatch):
    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, compiled=True)

    def no_compiler(*args, **kw):
        raise OSError("g++: not found")

    monkeypatch.setattr(lm.decoder, "_compiled", no_compiler)
    with pytest.raises(RuntimeError, match="GUARD_COMPILE=0"):
        Engine(lm, (), ()).start()


def test_a_step_compiling_in_the_background_decodes_eagerly_until_compiled(
    tiny_model_dir, tmp_path, tiny_lm, tiny_compiled_lm, engine_for, monkeypatch
):
    """The engine starts before its step compiles: requests meanwhile decode eagerly, as on an eager engine,
    and once it is compiled as on an engine compiled before start, with no variant compiled after."""
    policy = Policy("toy", "toy", Stage.BOTH, Action.FLAG)
    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, compiled=True)
    compiled, gate = lm.decoder._compiled, threading.Event()

    def held(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # the compile, held until released
        assert gate.wait(120)
        return compiled(ids, positions)

    monkeypatch.setattr(lm.decoder, "_compiled", held)
    engine = engine_for([policy], [probe_for(lm)], lm=lm, compile_in_background=True)
    eager = engine_for([policy], [probe_for(tiny_lm)])
    before = engine_for([policy], [probe_for(tiny_compiled_lm)], lm=tiny_compiled_lm)

    def replies(on: Engine, model: LoadedModel) -> list[tuple[str, float]]:
        async def together():
            return await asyncio.gather(
                *(run(on, request(model, p, 12), delay=0.02 * i) for i, p in enumerate(PROMPTS))
            )

        return [(text, done.verdicts["toy"].score) for text, done, _ in asyncio.run(together())]

    assert engine.step_state() == "compiling"
    for (text, score), (text_eager, score_eager) in zip(replies(engine, lm), replies(eager, tiny_lm), strict=True):
        assert text == text_eager and score == pytest.approx(score_eager, abs=1e-6)
    gate.set()
    until(lambda: engine.step_state() == "compiled", timeout=120)
    for (text, score), (text_before, score_before) in zip(
        replies(engine, lm), replies(before, tiny_compiled_lm), strict=True
    ):
        assert text == text_before and score == pytest.approx(score_before, abs=1e-6)
    code = compiled._torchdynamo_orig_callable.__func__.__code__
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code)) == 2  # one row, and any other count


def test_a_failed_background_compile_leaves_the_engine_decoding_eagerly(
    tiny_model_dir, tmp_path, engine_for, monkeypatch
):
    lm = load_model(str(tiny_model_dir), cache_dir=tmp_path, compiled=True)

    def no_compiler(*args, **kw):
        raise OSError("g++: not found")

    monkeypatch.setattr(lm.decoder, "_compiled", no_compiler)
    engine = engine_for(lm=lm, compile_in_background=True)
    until(lambda: engine.step_state() == "eager", timeout=120)
    text, done, _ = asyncio.run(run(engine, request(lm, PROMPTS[0], 6)))
    assert done.completion_tokens == 6 and text


@pytest.mark.parametrize("fails_at", [0, 3], ids=["first-token", "mid-reply"])
def test_a_failing_row_fails_alone_and_the_batch_goes_on(tiny_lm, engine_for, monkeypatch, fails_at):
    """A row whose sampling raises gets its own generic error with an id; the rows decoded with it finish
    as they do alone, and the engine serves the next request."""
    import guard.engine.loop as loop

    policy = Policy("toy", "toy", Stage.BOTH, Action.FLAG)
    engine = engine_for([policy], [probe_for(tiny_lm)])
    calls = []

    def faulty(logits, params, generator, generated):
        if params.seed == 666:
            calls.append(1)
            if len(calls) > fails_at:
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return sample(logits, params, generator, generated)

    good = [request(tiny_lm, p, 16) for p in PROMPTS[:3]]
    bad = GenerationRequest(good[0].prompt_ids, good[0].prompt_span, SamplingParams(max_tokens=16, seed=666))

    async def scenario():
        alone = [await run(engine, r) for r in good]
        monkeypatch.setattr(loop, "sample", faulty)
        loop_ = asyncio.get_running_loop()
        handles = [engine.submit(r, loop_) for r in [good[0], bad, *good[1:]]]
        together = await asyncio.gather(*(collect(h) for h in handles))
        return alone, together, await run(engine, good[2])

    alone, together, after = asyncio.run(scenario())
    failed = together.pop(1)[1]
    assert isinstance(failed, Failed) and "error id" in failed.error and "inf, nan" not in failed.error
    for (text_a, done_a, _), (text_b, done_b, _) in zip(alone, together, strict=True):
        assert isinstance(done_b, Finished) and text_a == text_b and done_a.reason == done_b.reason
    assert after[0] == alone[2][0]


def test_a_prompt_whose_pass_fails_to_start_fails_alone_beside_a_running_stream(tiny_lm, engine_for, monkeypatch):
    """A prompt arriving while a stream decodes, whose pass cannot be set up (its layer callback raises),
    gets its own generic error; the stream finishes as it does alone, and the engine serves on."""
    engine = engine_for([Policy("toy", "toy", Stage.BOTH, Action.FLAG)], [probe_for(tiny_lm)])
    running = request(tiny_lm, PROMPTS[0], 200)
    bad = GenerationRequest(running.prompt_ids, running.prompt_span, SamplingParams(max_tokens=8, seed=666))
    tap = engine._tap

    def faulty(rows, tokens=None):
        if tokens is not None and any(row.request.sampling.seed == 666 for row in rows):
            raise RuntimeError("an internal detail")
        return tap(rows, tokens)

    async def scenario():
        alone = await run(engine, running)
        monkeypatch.setattr(engine, "_tap", faulty)
        handle = engine.submit(running, asyncio.get_running_loop())
        events = handle.events()
        first = await anext(events)
        while not isinstance(first, Emitted):
            first = await anext(events)
        failed = await collect(engine.submit(bad, asyncio.get_running_loop()))
        rest = [first] + [event async for event in events]
        return alone, failed, rest, await run(engine, request(tiny_lm, PROMPTS[1], 4))

    alone, failed, rest, after = asyncio.run(scenario())
    assert isinstance(failed[1], Failed) and "error id" in failed[1].error and "internal" not in failed[1].error
    assert "".join(e.text for e in rest if isinstance(e, Emitted)) == alone[0]
    assert isinstance(rest[-1], Finished) and rest[-1].reason == alone[1].reason
    assert isinstance(after[1], Finished)


def test_a_long_prompt_is_prefilled_in_chunks_as_in_one_pass(tiny_lm, engine_for, monkeypatch):
    """A prompt cut into chunks, over passes of a few chunks each continuing its cache: its reply and its
    prompt score are what one piece in one pass gives (a legacy completion's two caches included)."""
    import guard.engine.loop as loop
    import probes.lm.prefix as prefix

    policy = Policy("toy", "toy", Stage.BOTH, Action.FLAG)
    long = " ".join(PROMPTS * 6)
    requests = [request(tiny_lm, long, 8), legacy_request(tiny_lm, long, 8)]
    monkeypatch.setattr(prefix, "CHUNK", 10_000)
    whole = engine_for([policy], [probe_for(tiny_lm)])
    alone = [asyncio.run(run(whole, r)) for r in requests]
    monkeypatch.setattr(prefix, "CHUNK", 8)
    monkeypatch.setattr(loop, "PREFILL_TOKENS", 16)
    chunked = engine_for([policy], [probe_for(tiny_lm)])
    passes = []
    prefill = chunked.step.prefill
    monkeypatch.setattr(
        chunked.step, "prefill", lambda segments, tap=None: passes.append(segments) or prefill(segments, tap)
    )
    asyncio.run(run(chunked, request(tiny_lm, PROMPTS[0], 1)))  # the template prefix, computed once and kept
    for (text_a, done_a, events_a), req in zip(alone, requests, strict=True):
        passes.clear()
        text_b, done_b, events_b = asyncio.run(run(chunked, req))
        sizes = [sum(len(s.ids) for s in p) for p in passes]
        assert len(passes) >= len(req.prompt_ids) // 16 and max(sizes) <= 16, sizes
        assert text_a == text_b and done_a.completion_tokens == done_b.completion_tokens
        assert events_a[0].verdicts["toy"].score == pytest.approx(events_b[0].verdicts["toy"].score, abs=1e-5)


async def beside_a_stream(engine: Engine, long: GenerationRequest, phases: list[str]) -> tuple[str, Finished, list]:
    """``long`` run while a long reply streams, the engine's phases recorded from its arrival on."""
    running = engine.submit(request(engine.lm, PROMPTS[0], 400), asyncio.get_running_loop())
    events = running.events()
    while not isinstance(await anext(events), Emitted):
        pass
    engine.timing = lambda phase, seconds: phases.append(phase)
    done = await run(engine, long)
    running.cancel()
    return done


def test_a_running_stream_decodes_while_a_pass_runs_on_the_prefill_thread(tiny_lm, engine_for, monkeypatch):
    """Overlapped, a slow prefill pass runs beside the running batch, which keeps stepping: several decode
    steps a pass, where the engine thread alone takes one between passes. The prompt's reply is the same."""
    import guard.engine.loop as loop
    import probes.lm.prefix as prefix

    monkeypatch.setattr(loop, "PREFILL_TOKENS", 16)
    monkeypatch.setattr(prefix, "CHUNK", 16)
    policy = Policy("toy", "toy", Stage.BOTH, Action.FLAG)
    engine = engine_for([policy], [probe_for(tiny_lm)])
    prefill = engine.step.prefill

    def slow(segments, tap=None):
        time.sleep(0.02)
        return prefill(segments, tap)

    monkeypatch.setattr(engine.step, "prefill", slow)
    phases: list[str] = []
    long = request(tiny_lm, " ".join(PROMPTS * 6), 4)
    expected = asyncio.run(run(engine, long))[0]

    text, done, _ = asyncio.run(beside_a_stream(engine, long, phases))
    assert text == expected and done.reason in {"stop", "length"}
    passes = "".join("p" if phase == "prefill" else "d" if phase == "decode_step" else "" for phase in phases)
    between = [len(steps) for steps in passes.strip("d").split("p")[1:-1]]  # decode steps between two passes
    assert len(between) >= 3
    if engine.overlap:
        assert statistics.median(between) >= 3, passes
    else:
        assert set(between) == {1}, passes


def test_a_tail_probe_reads_the_prompts_last_token_whatever_the_chunks_and_refuses_the_output_stage(
    tiny_lm, engine_for, monkeypatch
):
    """A ``tail`` probe scores the state at the prompt's last template token, as training extracts it, for a
    chat request and a legacy completion, prefilled whole or in chunks; on the output stage it is refused."""
    import probes.lm.prefix as prefix

    probe = replace(probe_for(tiny_lm, seed=3), pooling="tail")
    policy = Policy("toy", "toy", Stage.PROMPT, Action.FLAG)
    texts = [PROMPTS[1], " ".join(PROMPTS * 3)]
    expected = probe.predict_proba(extract(tiny_lm, Dataset(tuple(Row(t, 0) for t in texts)), (2,), pooling="tail"))
    mean = replace(probe, pooling="mean").predict_proba(extract(tiny_lm, Dataset((Row(texts[1], 0),)), (2,)))[0]
    assert abs(mean - expected[1]) > 1e-3  # the readings differ: the test tells them apart
    for chunk in (10_000, 8):
        monkeypatch.setattr(prefix, "CHUNK", chunk)
        engine = engine_for([policy], [probe])
        for text, score in zip(texts, expected, strict=True):
            for req in (request(tiny_lm, text, 2), legacy_request(tiny_lm, text, 2)):
                _, _, events = asyncio.run(run(engine, req))
                assert events[0].verdicts["toy"].score == pytest.approx(float(score), abs=1e-5)
    asked = replace(request(tiny_lm, texts[0], 2), explain=True)
    explanation = asyncio.run(run(engine, asked))[2][0].verdicts["toy"].explanation
    assert explanation.tokens == [] and explanation.score == pytest.approx(float(expected[0]), abs=1e-5)
    with pytest.raises(ValueError, match="prompt stage only"):
        engine_for([Policy("toy", "toy", Stage.BOTH, Action.FLAG)], [probe])


def test_running_streams_decode_between_a_long_prompts_chunks(tiny_lm, engine_for, monkeypatch):
    """While a long prompt prefills, every pass is followed by a decode step of the running batch, and each
    pass takes at most the budget; a request that goes away stops at its next chunk."""
    import guard.engine.loop as loop
    import probes.lm.prefix as prefix

    monkeypatch.setattr(loop, "PREFILL_TOKENS", 16)
    monkeypatch.setattr(prefix, "CHUNK", 16)
    engine = engine_for([Policy("toy", "toy", Stage.BOTH, Action.FLAG)], [probe_for(tiny_lm)])
    phases: list[str] = []
    long = request(tiny_lm, " ".join(PROMPTS * 6), 4)

    _, done, _ = asyncio.run(beside_a_stream(engine, long, phases))
    assert done.reason in {"stop", "length"}
    chunk_passes = phases.count("prefill")
    assert chunk_passes >= len(long.prompt_ids) // 16
    after = [b for a, b in itertools.pairwise(phases) if a == "prefill"]
    assert after.count("decode_step") >= chunk_passes - 1  # the running stream steps after every chunk

    passes = []

    def cancel_after_a_pass(phase: str, seconds: float) -> None:
        if phase == "prefill":
            passes.append(phase)
            handle.cancel()

    async def cancelled():
        nonlocal handle
        engine.timing = cancel_after_a_pass
        handle = engine.submit(long, asyncio.get_running_loop())
        return await anext(handle.events())

    handle = None
    assert asyncio.run(cancelled()).reason == "cancelled" and len(passes) == 1


def test_a_long_prompts_chunks_ride_in_the_running_streams_decode_steps(tiny_lm, monkeypatch):
    """On the engine thread alone (``mixing``), each of a long prompt's passes rides in a decode step of the
    running stream, within the budget, instead of a pass of its own; its reply and score are what it gets alone."""
    import guard.engine.loop as loop
    import probes.lm.prefix as prefix

    monkeypatch.setattr(loop, "PREFILL_TOKENS", 16)
    monkeypatch.setattr(prefix, "CHUNK", 16)
    engine = Engine(tiny_lm, [Policy("toy", "toy", Stage.BOTH, Action.FLAG)], [probe_for(tiny_lm)], overlap=False)
    assert engine.mixing
    engine.start()
    try:
        long = request(tiny_lm, " ".join(PROMPTS * 6), 4)
        text, done, events = asyncio.run(run(engine, long))
        riders, alone = [], []
        forward, prefill = engine.step.forward, engine.step.prefill

        def step(ids, positions, cache, mask=None, on_layer=None, segments=()):
            riders.append(sum(len(s.ids) for s in segments))
            return forward(ids, positions, cache, mask, on_layer, segments)

        monkeypatch.setattr(engine.step, "forward", step)
        monkeypatch.setattr(
            engine.step, "prefill", lambda segments, tap=None: alone.append(1) or prefill(segments, tap)
        )
        phases: list[str] = []
        beside = asyncio.run(beside_a_stream(engine, long, phases))
        assert beside[0] == text and beside[1].reason == done.reason
        assert beside[2][0].verdicts["toy"].score == pytest.approx(events[0].verdicts["toy"].score, abs=1e-5)
        carried = [tokens for tokens in riders if tokens]
        assert len(carried) >= len(long.prompt_ids) // 16 - 1 and max(carried) <= 16, riders
        assert len(alone) <= 2, alone  # the prefix, and at most a pass before the stream's first step
    finally:
        engine.stop()


def test_a_receiver_that_is_gone_stops_its_generation_and_nothing_else(tiny_lm, engine_for):
    """Events for a closed event loop are dropped and that generation stops; the engine serves on."""
    engine = engine_for()
    gone = asyncio.new_event_loop()
    engine.submit(request(tiny_lm, PROMPTS[0], 400), gone)
    gone.close()
    _, done, _ = asyncio.run(run(engine, request(tiny_lm, PROMPTS[1], 8)))
    assert done.reason in {"stop", "length"}
    deadline = time.monotonic() + 5
    while engine.load()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.load() == {"running": 0, "waiting": 0}


def test_a_shadow_version_is_scored_beside_the_active_one_and_never_acts(tiny_lm, engine_for):
    """The shadow's scores are what it scores when active; its crossings block nothing."""
    policy = Policy("toy", "toy", Stage.BOTH, Action.BLOCK)
    never, always = probe_for(tiny_lm, seed=0, threshold=1.0), probe_for(tiny_lm, seed=2, threshold=0.0)
    as_active = asyncio.run(
        run(engine_for([replace(policy, action=Action.FLAG)], [always]), request(tiny_lm, PROMPTS[0]))
    )
    engine = engine_for([policy], [never])
    engine.replace_shadow("toy", always)
    assert engine.shadows() == {"toy": always.version}
    text, done, events = asyncio.run(run(engine, request(tiny_lm, PROMPTS[0])))
    assert done.reason in {"stop", "length"} and text == as_active[0]  # the shadow blocked nothing
    prompt, output = events[0].shadow["toy"], done.shadow["toy"]
    assert prompt.detected and output.detected and prompt.version == always.version
    assert prompt.score == pytest.approx(as_active[2][0].verdicts["toy"].score, abs=1e-6)
    assert output.score == pytest.approx(as_active[1].verdicts["toy"].score, abs=1e-6)
    assert not events[0].verdicts["toy"].detected and not done.verdicts["toy"].detected
    engine.replace_probe("toy", always)  # promoted: the shadow ends with it
    assert engine.shadows() == {}
    engine.replace_shadow("toy", never)
    engine.replace_shadow("toy", None)
    assert engine.shadows() == {} and asyncio.run(run(engine, request(tiny_lm, PROMPTS[0])))[1].shadow == {}


def direction_for(lm, layer: int = 2, strength: float = 4.0, seed: int = 5):
    from probes.direction import Direction

    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(lm.num_layers, lm.hidden_size))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    norms = np.ones(lm.num_layers, np.float32)
    layers, manifest = tuple(range(lm.num_layers)), {"model_fingerprint": lm.fingerprint}
    return Direction("refusal", layers, vectors.astype(np.float32), norms, layer, strength, manifest)


def steered_reference(lm, req: GenerationRequest, direction, strength: float, first: int) -> str:
    """Greedy decoding with a hook adding the steering at the direction's layer from position ``first`` on."""
    from probes.lm.hooks import adding

    return hooked_reference(lm, req, {direction.layer: adding(direction.vector(direction.layer), strength, first)})


def hooked_reference(lm, req: GenerationRequest, by_layer: dict) -> str:
    """Greedy decoding by transformers' own forward, recomputed in full each token, with ``by_layer``'s hooks."""
    from probes.lm.hooks import hooks

    ids = list(req.prompt_ids)
    with torch.inference_mode(), hooks(lm.model, by_layer, layer_path=lm.layer_path):
        for _ in range(req.sampling.max_tokens):
            token = int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token == lm.tokenizer.eos_token_id:
                break
            ids.append(token)
    return lm.tokenizer.decode(ids[len(req.prompt_ids) :])


def test_an_ablate_policy_naming_a_direction_ablates_its_vector_at_every_layer_and_follows_its_versions(
    tiny_lm, engine_for
):
    """The old direction's vector is what the probe reads: ablated at every layer, the probe scores
    sigmoid(bias) = 0.5; the new one is another vector, and the same request scores otherwise."""
    from probes.lm.hooks import projecting

    probe = probe_for(tiny_lm)
    old, new = direction_for(tiny_lm, layer=1, seed=3), direction_for(tiny_lm, layer=1, seed=4)
    old.vectors[:] = probe.weight[0] / np.linalg.norm(probe.weight[0])
    ablate = Policy("toy", "toy", Stage.OUTPUT, Action.ABLATE, threshold=1.0, ablate_always=True, direction="refusal")
    engine = engine_for([ablate], [probe], directions={"refusal": old})
    req = request(tiny_lm, PROMPTS[1], 12)

    def ablated(direction) -> str:
        vector = direction.vector(direction.layer)
        return hooked_reference(tiny_lm, req, dict.fromkeys(range(tiny_lm.num_layers), projecting(vector)))

    before = asyncio.run(run(engine, req))
    assert engine.directions() == {"refusal": old.version}
    engine.replace_direction(new)
    after = asyncio.run(run(engine, req))
    assert engine.directions() == {"refusal": new.version}
    assert (before[0], after[0]) == (ablated(old), ablated(new))
    verdicts = before[1].verdicts["toy"], after[1].verdicts["toy"]
    assert [v.direction_version for v in verdicts] == [old.version, new.version]
    assert verdicts[0].score == pytest.approx(0.5, abs=1e-4)
    assert verdicts[1].score != pytest.approx(0.5, abs=1e-2)


@pytest.mark.parametrize("path", ["lean-step", "transformers"])
def test_refuse_on_the_prompt_steers_from_the_first_token_and_shares_the_batch(tiny_lm, engine_for, path):
    direction = direction_for(tiny_lm)
    refuse = Policy("toy", "toy", Stage.PROMPT, Action.REFUSE, threshold=0.0, direction="refusal")
    engine = engine_for(
        [refuse], [probe_for(tiny_lm)], fast_decode=path != "transformers", directions={"refusal": direction}
    )
    steered = request(tiny_lm, PROMPTS[2], 12)
    text, done, events = asyncio.run(run(engine, steered))
    verdict = events[0].verdicts["toy"]
    assert verdict.action == "refuse" and verdict.filtered and verdict.steered_from_token == 0
    assert done.reason in {"stop", "length"} and not events[0].blocked  # the reply is the model's own
    assert text == steered_reference(tiny_lm, steered, direction, direction.strength, len(steered.prompt_ids) - 1)
    assert text != steered_reference(tiny_lm, steered, direction, 0.0, 0)  # the steering changed the reply
    # batched with rows that are not steered (their policy subset has no refuse), each reply is the one alone
    plain = [replace(request(tiny_lm, p, 12), policies=frozenset()) for p in PROMPTS]

    async def together():
        return await asyncio.gather(run(engine, steered), *(run(engine, r, delay=0.01) for r in plain))

    outcomes = asyncio.run(together())
    assert outcomes[0][0] == text
    for r, outcome in zip(plain, outcomes[1:], strict=True):
        assert outcome[0] == steered_reference(tiny_lm, r, direction, 0.0, 0)


def test_refuse_on_the_output_recomputes_the_crossing_token_under_steering(tiny_lm, engine_for):
    direction = direction_for(tiny_lm)
    flag = Policy("toy", "toy", Stage.OUTPUT, Action.FLAG, threshold=0.0)
    refuse = Policy("toy", "toy", Stage.OUTPUT, Action.REFUSE, threshold=0.0, strength=6.0)
    flagged = asyncio.run(run(engine_for([flag], [probe_for(tiny_lm)]), request(tiny_lm, PROMPTS[1], 12)))
    engine = engine_for([refuse], [probe_for(tiny_lm)], directions={"refusal": direction})
    req = request(tiny_lm, PROMPTS[1], 12)
    text, done, _ = asyncio.run(run(engine, req))
    verdict = done.verdicts["toy"]
    assert verdict.filtered and verdict.steered_from_token == 0 and verdict.action == "refuse"
    assert text == steered_reference(tiny_lm, req, direction, 6.0, len(req.prompt_ids) - 1) != flagged[0]
    with pytest.raises(ValueError, match="not loaded"):
        Engine(tiny_lm, [refuse], [probe_for(tiny_lm)])


def test_a_steer_policy_steers_along_its_own_direction_by_its_signed_strength(tiny_lm, engine_for):
    style = direction_for(tiny_lm)  # the refusal-like test direction, steered the other way
    steer = Policy("toy", "toy", Stage.PROMPT, Action.STEER, threshold=0.0, direction="style", strength=-4.0)
    engine = engine_for([steer], [probe_for(tiny_lm)], directions={"style": style})
    req = request(tiny_lm, PROMPTS[2], 12)
    text, done, events = asyncio.run(run(engine, req))
    verdict = events[0].verdicts["toy"]
    assert verdict.action == "steer" and verdict.filtered and verdict.steered_from_token == 0
    assert done.reason in {"stop", "length"}  # the reply is the model's own
    assert text == steered_reference(tiny_lm, req, style, -4.0, len(req.prompt_ids) - 1)
    assert text != steered_reference(tiny_lm, req, style, 0.0, 0)


@pytest.mark.parametrize("policies", [1, 0])
def test_a_dial_steers_the_whole_sequence_and_only_its_row(tiny_lm, engine_for, policies):
    from guard.policy import Dial

    direction = direction_for(tiny_lm)
    policy = Policy("toy", "toy", Stage.BOTH, Action.FLAG, threshold=1.0)
    engine = engine_for(
        [policy][:policies],
        [probe_for(tiny_lm)][:policies],
        directions={"refusal": direction},
        dials=[Dial("refusal", "refusal", -9, 9)],
    )
    turned = replace(request(tiny_lm, PROMPTS[0], 12), steer={"refusal": 3.0})
    plain = request(tiny_lm, PROMPTS[3], 12)

    async def together():
        return await asyncio.gather(run(engine, turned), run(engine, plain, delay=0.01))

    (text, done, _), (other, plain_done, _) = asyncio.run(together())
    assert text == steered_reference(tiny_lm, turned, direction, 3.0, 0)  # every position, the prompt's too
    assert text != steered_reference(tiny_lm, turned, direction, 0.0, 0)
    assert other == steered_reference(tiny_lm, plain, direction, 0.0, 0)
    dial = done.verdicts["refusal"]  # the reply says what turned it
    assert (dial.action, dial.steered_from_token, dial.strength) == ("steer", 0, 3.0)
    assert dial.direction_version == direction.version and not dial.filtered
    assert "refusal" not in plain_done.verdicts


def test_a_steered_prompts_template_prefix_is_cached_under_its_steering_and_never_shared_with_another(
    tiny_lm, engine_for
):
    from guard.policy import Dial

    direction = direction_for(tiny_lm)
    engine = engine_for([], [], directions={"refusal": direction}, dials=[Dial("refusal", "refusal", -9, 9)])
    plain = request(tiny_lm, PROMPTS[0], 8)
    up, down = (replace(plain, steer={"refusal": strength}) for strength in (3.0, -3.0))

    async def one_after_another():
        return [(await run(engine, req))[0] for req in (plain, up, up, down, plain)]

    texts = asyncio.run(one_after_another())
    assert texts[0] == texts[4] == steered_reference(tiny_lm, plain, direction, 0.0, 0)
    assert texts[1] == texts[2] == steered_reference(tiny_lm, up, direction, 3.0, 0)
    assert texts[3] == steered_reference(tiny_lm, down, direction, -3.0, 0)
    assert len(engine._prefixes._kept) == 3  # one template prefix each: unsteered, +3 and -3


def test_a_replaced_direction_steers_new_requests_while_those_in_flight_keep_theirs(tiny_lm, engine_for):
    from guard.policy import Dial

    old, new = direction_for(tiny_lm), direction_for(tiny_lm, layer=1, strength=5.0, seed=9)
    refuse = Policy("toy", "toy", Stage.PROMPT, Action.REFUSE, threshold=0.0, direction="refusal")
    engine = engine_for(
        [refuse], [probe_for(tiny_lm)], directions={"refusal": old}, dials=[Dial("turn", "refusal", -9, 9)]
    )
    turned = replace(request(tiny_lm, PROMPTS[0], 12), steer={"turn": 2.0}, policies=frozenset())
    refused = request(tiny_lm, PROMPTS[2], 12)

    async def across_the_swap():
        loop = asyncio.get_running_loop()
        before = [engine.submit(turned, loop), engine.submit(refused, loop)]
        engine.replace_direction(new)
        after = [engine.submit(turned, loop), engine.submit(refused, loop)]
        return await asyncio.gather(*map(collect, before + after))

    results = asyncio.run(across_the_swap())
    assert engine.directions() == {"refusal": new.version} != {"refusal": old.version}
    assert results[0][0] != results[2][0] and results[1][0] != results[3][0]  # the two directions steer apart
    for (text, done, events), direction in zip(results, (old, old, new, new), strict=True):
        if "turn" in done.verdicts:
            assert text == steered_reference(tiny_lm, turned, direction, 2.0, 0)
            assert done.verdicts["turn"].direction_version == direction.version
        else:
            first = len(refused.prompt_ids) - 1
            assert text == steered_reference(tiny_lm, refused, direction, direction.strength, first)
            verdict = events[0].verdicts["toy"]
            assert (verdict.direction_version, verdict.strength) == (direction.version, direction.strength)


def test_logit_bias_and_penalties_apply_before_the_choice():
    logits = torch.tensor([0.0, 1.0, 3.0, 2.0])
    greedy = SamplingParams(temperature=0)
    assert sample(logits, greedy, None) == 2
    assert sample(logits, replace(greedy, logit_bias=((2, -100.0),)), None) == 3
    assert sample(logits, replace(greedy, logit_bias=((0, 100.0),)), None) == 0
    assert sample(logits, replace(greedy, frequency_penalty=1.0), None, {2: 2}) == 3  # 3 - 2 < 2
    assert sample(logits, replace(greedy, presence_penalty=0.5), None, {2: 5}) == 2  # once, however often: 2.5 > 2
    assert sample(logits, replace(greedy, presence_penalty=1.5), None, {2: 5}) == 3
    assert sample(logits, SamplingParams(temperature=1.0, logit_bias=((1, 100.0),)), None) == 1
    assert logits.tolist() == [0.0, 1.0, 3.0, 2.0]  # the step's logits are left as they were
