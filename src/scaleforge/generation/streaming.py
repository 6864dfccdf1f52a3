"""Text as tokens arrive: token bytes decoded into text without ever splitting a UTF-8 character, and stop strings
found in that text even when they span tokens."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class StreamingDetokenizer:
    """Tokens to text pieces: the bytes of a character that a token leaves unfinished wait for the next token;
    bytes that can never be UTF-8 become U+FFFD, as `Tokenizer.decode` makes them."""

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self.token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """The text that `token` completes ('' while a character waits for its last bytes)."""
        return str(self._utf8.decode(self.token_bytes[token]))

    def flush(self) -> str:
        """The end of the text: U+FFFD for the bytes of a character the tokens never finished."""
        return str(self._utf8.decode(b"", final=True))


class StopStrings:
    """Text pieces in, the same text out, cut before the first of `stops` to appear (`stopped` then turns True).
    Text that could be the start of a stop string is held back until the next piece says whether it is."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.stopped = False
        self._held = ""

    def push(self, piece: str) -> str:
        """The text of `piece` (and of what was held) that is certainly not part of a stop string."""
        text = self._held + piece
        found = [index for index in (text.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self.stopped, self._held = True, ""
            return text[: min(found)]
        keep = max((_overlap(text, stop) for stop in self.stops), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back: the text ended before it could become a stop string."""
        held, self._held = self._held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (shorter than `stop`)."""
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0


class TextOutput:
    """A sequence's sampled tokens in, its text out: decoded without splitting a character (`StreamingDetokenizer`)
    and cut before the first of `stops` (`StopStrings`); `stopped` turns True when a stop string appears."""

    def __init__(self, token_bytes: Sequence[bytes], stops: Sequence[str]) -> None:
        self._text = StreamingDetokenizer(token_bytes)
        self._stops = StopStrings(stops)

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def push(self, token: int) -> str:
        """The text that `token` adds for certain ('' while a character or a possible stop string is unfinished)."""
        return self._stops.push(self._text.push(token))

    def finish(self) -> str:
        """The rest of the text once the tokens have ended: what was held back, unless it completes a stop string."""
        piece = self._stops.push(self._text.flush())
        return piece if self._stops.stopped else piece + self._stops.flush()
