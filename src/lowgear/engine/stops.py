"""Stop strings over streamed text.

A stop string can arrive split over many tokens ("<|im_" then "end|>"), so text that might be the
start of one cannot be shown yet. `StopMatcher.push()` emits only text that can no longer be part
of a stop string and holds back the longest tail that is a prefix of one. When a stop string is
completed it emits the text before it and reports the stop; the stop string and anything after it
are never emitted. Stop *tokens* (end-of-sequence ids) are the generator's business, not this one's.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError


class StopMatcher:
    def __init__(self, stop_strings: Sequence[str] = ()):
        stops = list(dict.fromkeys(stop_strings))
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty strings, got {s!r}; drop it from the stop list")
        self.stop_strings = stops
        self._by_length = sorted(stops, key=len, reverse=True)
        # Every proper prefix of a stop string: a tail equal to one of these must be held back.
        self._prefixes = {s[:i] for s in stops for i in range(1, len(s))}
        self._longest_prefix = max((len(s) - 1 for s in stops), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text now safe to show, whether a stop string has been reached)."""
        if self.stopped:
            return "", True
        buf = self._held + text
        # The stream stops where a stop string is first *completed* (the earliest end), whatever the
        # chunking: nothing in the held text completed one, so only ends inside the new text count.
        # Among stop strings ending at the same place the longest wins (it starts earliest).
        for end in range(len(self._held) + 1, len(buf) + 1):
            for stop in self._by_length:
                if end >= len(stop) and buf.startswith(stop, end - len(stop)):
                    self.stopped, self.matched, self._held = True, stop, ""
                    return buf[: end - len(stop)], True
        keep = 0
        for n in range(min(len(buf), self._longest_prefix), 0, -1):
            if buf[-n:] in self._prefixes:
                keep = n
                break
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    @property
    def held(self) -> str:
        return self._held

    def flush(self) -> str:
        """End of the text with no stop reached: return what was held back."""
        text, self._held = self._held, ""
        return text
