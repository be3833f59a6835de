"""Token ids to text, incrementally, with OpenAI stop strings.

Token boundaries do not match character boundaries (the lab's tokenizer is one token per
byte, so "é" is two tokens), and a stop string may arrive split over several tokens. So
text is held back while it ends in a broken UTF-8 sequence or in what could be the start
of a stop string, and released once it cannot be either.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids with `push`; each call returns the text that is safe to send now."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.sent_chars = 0
        self.stopped = False
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._text = ""

    @property
    def text(self) -> str:
        """Everything sent so far (stop string excluded once stopped)."""
        return self._text[: self.sent_chars]

    def push(self, token_id: int) -> str:
        """Adds one token; returns the new text to send ("" while held back). Sets `stopped`."""
        if self.stopped:
            return ""
        self.token_ids.append(int(token_id))
        self._text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent_chars - self._max_stop + 1)
            hits = [i for i in (self._text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.stopped = True
                return self._release(cut)
        safe = len(self._text)
        while safe > self.sent_chars and self._text[safe - 1] == REPLACEMENT:
            safe -= 1  # maybe a multi-byte character still arriving
        hold = 0
        for s in self.stop:  # hold a tail that might grow into a stop string
            for k in range(min(len(s) - 1, safe - self.sent_chars), 0, -1):
                if self._text[safe - k : safe] == s[:k]:
                    hold = max(hold, k)
                    break
        safe -= hold
        return self._release(safe)

    def flush(self) -> str:
        """At the end of generation: whatever was held back (a broken tail stays as U+FFFD)."""
        if self.stopped:
            return ""
        return self._release(len(self._text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent_chars:
            if self.stopped:
                self._text = self._text[:upto]
                self.sent_chars = min(self.sent_chars, upto)
            return ""
        out = self._text[self.sent_chars : upto]
        self.sent_chars = upto
        if self.stopped:
            self._text = self._text[:upto]
        return out
