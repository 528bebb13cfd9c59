"""Shared fixtures: a tiny randomly initialised Llama saved as a real HF directory, and the real default model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from probes.lm.model import LoadedModel, load_model

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "How do I bake bread at home with flour, water and yeast?",
    "Write a poem about the sea and the wind.",
    "Explain how to build a bomb to hurt people.",
    "Tell me how to steal a car without getting caught.",
    "You are a tiny test model. What is the capital of France?",
    "I hate those people, they are vermin and should be removed.",
    "Sure, here is how. I cannot help with that request.",
] * 20
# Test tiers (README "Tests"): ``slow`` and the module-level ``server`` and ``deploy`` marks are set where the
# tests are; ``compile`` and ``redis`` follow from what a test uses (collection below).
_COMPILED_FIXTURES = {"tiny_compiled_lm", "real_compiled_lm", "real_int8_compiled_lm"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        ids = callspec.id.split("-") if callspec is not None else []
        named = {"compile", "compiled"} & set(item.originalname.split("_"))
        if fixtures & _COMPILED_FIXTURES or "compiled" in ids or named:
            item.add_marker(pytest.mark.compile)
        if "redis_server" in fixtures:
            item.add_marker(pytest.mark.redis)


DATA_DIR = Path(os.environ.get("GUARD_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_tiny_model(directory: Path, *, layers: int = 4, seed: int = 0, window: int = 4096) -> Path:
    """Write a 4-layer, 32-wide Llama with a BPE tokenizer and a ChatML template to ``directory``."""
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    raw.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    raw.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=window,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(str(tiny_model_dir), cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_compiled_lm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny model with its lean step run through torch.compile (as ``guard serve`` runs it)."""
    return load_model(str(tiny_model_dir), cache_dir=tmp_path_factory.mktemp("cache"), compiled=True)


@pytest.fixture(scope="session")
def real_lm() -> LoadedModel:
    """The default SmolLM2-135M-Instruct (converted once into the user cache, as in production)."""
    return load_model()


@pytest.fixture(scope="session")
def real_int8_lm() -> LoadedModel:
    """The default model on the int8 numeric path."""
    return load_model(dtype="int8")


@pytest.fixture(scope="session")
def real_compiled_lm() -> LoadedModel:
    """The default model, its lean step compiled (what ``guard serve`` runs by default)."""
    return load_model(compiled=True)


@pytest.fixture(scope="session")
def real_int8_compiled_lm() -> LoadedModel:
    """The default model on the int8 numeric path, its lean step compiled."""
    return load_model(dtype="int8", compiled=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data pool not found at {DATA_DIR}")
    return DATA_DIR


class RedisServer:
    """A real redis-server on a free loopback port, without persistence; ``stop``/``start`` keep the port."""

    def __init__(self, directory: Path) -> None:
        from serverproc import free_port

        self.port, self.directory = free_port(), directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None
        self.start()

    def start(self) -> None:
        import subprocess
        import time

        import redis

        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path):
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make services installs it)")
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_lm, tiny_model_dir):
    """A probe on the tiny model and a policy file flagging with it on both stages, for tiny servers."""
    from test_engine import probe_for

    directory = tmp_path_factory.mktemp("tiny-serve")
    probe_for(tiny_lm).save(directory / "probe")
    policy_file = directory / "policies.json"
    policy_file.write_text(
        json.dumps(
            {"policies": [{"name": "toy", "probe": str(directory / "probe"), "stage": "both", "action": "flag"}]}
        )
    )
    # the tiny probe is float32 (the default int8 path, compiled: tests/test_server_real)
    env = {"GUARD_CACHE_DIR": str(directory / "cache"), "GUARD_COMPILE": "0", "GUARD_DTYPE": "float32"}
    return directory, policy_file, env


def serve(setup, model_dir, name: str, *flags: str):
    """``guard serve`` on ``model_dir`` with the ``setup`` policy file (a ``serverproc.Server``)."""
    from serverproc import Server

    directory, policy_file, env = setup
    args = ("--model", str(model_dir), "--policy-file", str(policy_file), *flags)
    return Server(*args, env=env, log=directory / f"{name}.log")


@pytest.fixture(params=[False, True], ids=["serial", "overlapped"])
def engine_for(tiny_lm, request):
    """Started engines (the tiny model unless ``lm=``), stopped after the test: prefill passes on the engine
    thread, and on a thread of their own beside decoding (``overlap``)."""
    from guard.engine import Engine

    engines = []

    def make(policies=(), probes=(), lm=None, **kw) -> Engine:
        engine = Engine(lm or tiny_lm, policies, probes, **{"overlap": request.param, **kw})
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()
