"""Incremental detokenisation with stop strings: text is released only once it can no longer change.

A piece is held back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD) or while its
tail could still be the start of a stop string.

Each token decodes a short window, not the whole reply: the tokens since the previous piece, after
the previous piece's tokens as context (a tokenizer may decode a token differently at the start of
a text; as in vLLM's incremental detokeniser), so a token costs the same at any reply length
(``tests/bench/bench_detokenize.py``, docs/benchmarks.md).
"""

from __future__ import annotations

from transformers.tokenization_utils_base import PreTrainedTokenizerBase


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # the reply decoded so far, up to its last complete character
        self.emitted = ""
        self.stopped = False
        self._context = 0  # ids[_context:_decoded]: the tokens of the last piece, decoded again as context
        self._decoded = 0  # ids[:_decoded] are in ``text``

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now final (possibly empty). Sets ``stopped`` on a stop string."""
        self.ids.append(token_id)
        self.text += self._decode_new()
        text = self.text
        for stop in self.stop:
            at = text.find(stop, max(0, len(self.emitted) - len(stop)))
            if at != -1:
                self.stopped = True
                return self._release(text[:at])
        return self._release(text[: len(text) - self._held(text)])

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (not after a stop string)."""
        if self.stopped:
            return ""
        return self._release(self.text + self._decode_new(final=True))

    def _decode_new(self, final: bool = False) -> str:
        """The text of the tokens not yet in ``text``; nothing while it ends in an incomplete character."""
        before = self.tokenizer.decode(self.ids[self._context : self._decoded], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._context :], skip_special_tokens=True)
        if final:
            return after[len(before) :].rstrip("\ufffd")
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._context, self._decoded = self._decoded, len(self.ids)
        return after[len(before) :]

    def _held(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, text: str) -> str:
        piece = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += piece
        return piece
