"""Stop-string matching over streamed text.

Text arrives in arbitrary chunks, and a stop string may straddle chunks ("...\\n\\nUs" +
"er:"). ``StopStringMatcher`` emits text as soon as it is known not to be part of a stop
string, holds back only the tail that could still grow into one, and never emits a stop
string or anything after it. The result equals the one-shot
``text[:min(text.find(s) for s in stops if s in text)]`` however the text is split.
"""

from __future__ import annotations

from typing import Iterable, Optional

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    """Apply stop strings to a stream of text deltas.

    ``feed(delta)`` returns ``(text safe to emit now, stopped)``. Once stopped, every later
    feed returns ``("", True)`` and ``matched`` names the stop string that fired (the one
    starting earliest; the longest one if several start at the same place). ``flush()``
    returns the held-back tail when the stream ends.

    Because the *earliest-starting* stop string wins, a complete match may be held (not yet
    reported) while a longer stop string that starts before it could still complete; such
    a wait is at most one stop string long.
    """

    def __init__(self, stop: Iterable[str]) -> None:
        # Empty strings are dropped: they would match everywhere.
        self.stop: list[str] = list(dict.fromkeys(s for s in stop if s))
        self._max_hold = max((len(s) - 1 for s in self.stop), default=0)
        self._held = ""
        self.stopped = False
        self.matched: Optional[str] = None

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stop:
            return delta, False
        buf = self._held + delta
        match = self._earliest_match(buf)
        # Start of the longest tail of buf that could still grow into a stop string.
        hold_from = len(buf) - self._partial_match_len(buf)
        if match is not None and match[0] <= hold_from:
            # Nothing can start earlier than this complete match: stop here.
            return self._stop_at(buf, *match), True
        # Either no match yet, or a longer stop string starting before the match may still
        # complete (and would win as the earliest): emit only what precedes the doubt.
        self._held = buf[hold_from:]
        return buf[:hold_from], False

    def flush(self) -> str:
        """End of stream: return the held-back text.

        If the held text contains a complete stop string that was only waiting for an
        earlier-starting, longer one to be ruled out, the text before it is returned and
        ``stopped`` becomes True (so check ``stopped`` after flushing for finish_reason).
        """
        if self.stopped:
            return ""
        buf, self._held = self._held, ""
        match = self._earliest_match(buf)
        if match is not None:
            self.stopped = True
            return self._stop_at(buf, *match)
        return buf

    def _stop_at(self, buf: str, index: int, stop: str) -> str:
        self.stopped, self.matched, self._held = True, stop, ""
        return buf[:index]

    def _earliest_match(self, buf: str) -> Optional[tuple[int, str]]:
        """(start, stop string) of the complete match starting first (longest on ties)."""
        best: Optional[tuple[int, str]] = None
        for s in self.stop:
            i = buf.find(s)
            if i != -1 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
                best = (i, s)
        return best

    def _partial_match_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string.

        A stop string starting before that suffix either lies wholly inside ``buf`` (and is
        found by ``_earliest_match``) or would make a longer suffix such a prefix.
        """
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(len(s) > k and s.startswith(tail) for s in self.stop):
                return k
        return 0
