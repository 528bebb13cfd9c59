"""Turning a row (a user text, or a prompt and the assistant's reply) into token ids and the span probes read.

Features are pooled over the text's own tokens inside the chat template, never over the template:
pooling over system prompt and role markers gives texts of different lengths different template
shares, a length confound. The server renders conversations with the same
function, so the tokens it scores are the tokens the probes were trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

_MARK = "\x00GUARD-{}\x00"  # stands for message i's content while the template renders


@dataclass(frozen=True)
class Encoded:
    """Token ids of a rendered conversation and the half-open token span ``[start, end)`` of the scored text."""

    ids: tuple[int, ...]
    start: int
    end: int


def render_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    *,
    span_message: int,
    add_generation_prompt: bool = False,
) -> Encoded:
    """Render ``messages`` with the tokenizer's chat template; the span covers ``messages[span_message]``'s content.

    Message contents are text, never control tokens: a content holding the text of a special token
    (``<|im_start|>``, ``<|im_end|>``, ...) is tokenized as those characters, so no one can close a turn
    or forge another one. Without a chat template, messages are joined by blank lines (base models
    such as GPT-2).
    """
    contents = [m["content"] for m in messages]
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
    else:
        text = "\n\n".join(m["content"] for m in marked) + ("\n\n" if add_generation_prompt else "")
    pieces = []  # template text and message contents, alternating: (text, is_content, message index)
    for i, content in enumerate(contents):
        mark = _MARK.format(i)
        if text.count(mark) != 1:
            raise ValueError("the chat template altered or repeated a message's content; cannot locate it")
        head, text = text.split(mark)
        pieces += [(head, False, i), (content, True, i)]
    pieces.append((text, False, len(contents)))
    specials = [t.content for t in tokenizer.added_tokens_decoder.values()]
    if any(token in content for content in contents for token in specials):
        return _encode_pieces(tokenizer, pieces, span_message)
    return _encode_whole(tokenizer, pieces, span_message)


def _encode_whole(tokenizer: PreTrainedTokenizerBase, pieces: list[tuple[str, bool, int]], span: int) -> Encoded:
    """The rendered text tokenized in one call; the span is the tokens that overlap the scored content."""
    full, char_start, char_end = "", 0, 0
    for piece, is_content, index in pieces:
        if is_content and index == span:
            char_start, char_end = len(full), len(full) + len(piece)
        full += piece
    enc = tokenizer(full, add_special_tokens=not tokenizer.chat_template, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < char_end and b > char_start and b > a]
    if not inside:
        raise ValueError("the scored text is empty after tokenisation")
    return Encoded(tuple(enc["input_ids"]), inside[0], inside[-1] + 1)


def _encode_pieces(tokenizer: PreTrainedTokenizerBase, pieces: list[tuple[str, bool, int]], span: int) -> Encoded:
    """Piece by piece, contents with special-token text split into ordinary tokens; the span is the scored
    content's own tokens."""
    ids: list[int] = []
    start = end = 0
    for n, (piece, is_content, index) in enumerate(pieces):
        first = n == 0 and not tokenizer.chat_template  # where a base model's tokenizer adds its BOS
        before = len(ids)
        if piece or first:
            ids += tokenizer(piece, add_special_tokens=first, split_special_tokens=is_content)["input_ids"]
        if is_content and index == span:
            start, end = before, len(ids)
    if end <= start:
        raise ValueError("the scored text is empty after tokenisation")
    return Encoded(tuple(ids), start, end)


def encode_row(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    prompt: str | None = None,
    *,
    max_text_tokens: int = 256,
    generation_prompt: bool = False,
) -> Encoded:
    """A user text (``prompt is None``) or an assistant reply to ``prompt``; the span is cut at ``max_text_tokens``.

    ``generation_prompt`` (user texts only): the ids go on after the text with the rest of the
    template up to the assistant's turn, as the server's prefill does; otherwise they end with the text.
    """
    if prompt is None:
        messages = [{"role": "user", "content": text}]
        encoded = render_messages(tokenizer, messages, span_message=0, add_generation_prompt=generation_prompt)
    elif generation_prompt:
        raise ValueError("generation_prompt applies to a user text, not to a reply")
    else:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        encoded = render_messages(tokenizer, messages, span_message=1)
    end = min(encoded.end, encoded.start + max_text_tokens)
    tail = encoded.ids[encoded.end :] if generation_prompt else ()
    return Encoded(encoded.ids[:end] + tail, encoded.start, end)
