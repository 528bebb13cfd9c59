"""OpenAI wire types as msgspec Structs, fields in the order of OpenAI's API reference.

guard's own extensions come last in each type, marked as such: the ``guard`` request field narrows
the policy set, and responses carry verdicts in Azure OpenAI's content-filter shape: per policy,
the engine's :class:`~guard.events.Verdict` (``filtered``, ``detected``, ``score``, ``probe_version``,
``action``, ``ablated_from_token``).
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

from guard.events import Verdict


class TextPart(Struct):
    type: str
    text: str | None = None


class ChatMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]  # function: refused with a 400
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(Struct):
    include_usage: bool = False


class GuardOptions(Struct, forbid_unknown_fields=True):
    """Extension: ``{"guard": {"policies": ["hate"]}}`` checks only these configured policies;
    ``"explain": true`` makes each verdict carry its top contributing tokens."""

    policies: list[str] | None = None
    explain: bool = False
    steer: dict[str, float] | None = None  # dial name -> strength, within the operator's bounds


class _GenerationRequest(Struct, kw_only=True):
    """Fields shared by chat and legacy completions (decoded, so their order here does not matter)."""

    model: str
    max_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # -- guard extension --
    guard: GuardOptions | None = None


class ChatCompletionRequest(_GenerationRequest, kw_only=True):
    messages: list[ChatMessage]
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = None
    presence_penalty: float | None = None


class CompletionRequest(_GenerationRequest, kw_only=True):
    prompt: str | list[str] | None  # null is allowed by the spec; guard answers it with a 400


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptFilterResult(Struct):
    prompt_index: int
    content_filter_results: dict[str, Verdict]


class ResponseMessage(Struct):
    role: str
    content: str | None
    refusal: str | None = None


class ChatChoice(Struct):
    index: int
    message: ResponseMessage
    finish_reason: str
    logprobs: None = None
    content_filter_results: dict[str, Verdict] = {}


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None
    prompt_filter_results: list[PromptFilterResult] = []


class Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    refusal: str | None = None


class ChunkChoice(Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None
    content_filter_results: dict[str, Verdict] | UnsetType = UNSET


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: Usage | UnsetType | None = UNSET
    prompt_filter_results: list[PromptFilterResult] | UnsetType = UNSET


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None
    content_filter_results: dict[str, Verdict] | UnsetType = UNSET


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage | UnsetType | None = UNSET
    prompt_filter_results: list[PromptFilterResult] | UnsetType = UNSET


class Model(Struct):
    id: str
    created: int
    owned_by: str = "guard"
    object: str = "model"


class ModelList(Struct):
    data: list[Model]
    object: str = "list"


class Feedback(Struct, forbid_unknown_fields=True):
    """guard's ``POST /v1/guard/feedback``: a label on the captured request ``id`` for ``policy``."""

    id: str
    policy: str
    label: int
    note: str = ""


class ErrorBody(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    content_filter_results: dict[str, Verdict] | UnsetType = UNSET


class ErrorResponse(Struct):
    error: ErrorBody


encoder = msgspec.json.Encoder()
