"""Incremental detokenisation with stop strings: text is released only once it can no longer change.

A piece is held back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD) or while its
tail could still be the start of a stop string.
"""

from __future__ import annotations

from transformers.tokenization_utils_base import PreTrainedTokenizerBase


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now final (possibly empty). Sets ``stopped`` on a stop string."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop, max(0, len(self.emitted) - len(stop)))
            if at != -1:
                self.stopped = True
                return self._release(text[:at])
        if text.endswith("\ufffd"):
            return ""
        return self._release(text[: len(text) - self._held(text)])

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (not after a stop string)."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd"))

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
