"""Stop strings in a growing answer, in time linear in the stop strings' length per token: a
client's multi-megabyte stop string must not stall the decode loop (the naive "does the text end
with any prefix of the stop string" check is quadratic in its length)."""

from __future__ import annotations


def first_stop(text: str, stops: list[str], new_chars: int) -> int | None:
    """Where the earliest stop string starts in `text`, looking only where the last `new_chars`
    characters could have completed one; None when none has."""
    hits = []
    for stop in filter(None, stops):
        found = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if found >= 0:
            hits.append(found)
    return min(hits) if hits else None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could begin a stop string, and so must not be sent yet."""
    return max((_longest_prefix_at_end(text, stop) for stop in stops if len(stop) > 1), default=0)


def _longest_prefix_at_end(text: str, stop: str) -> int:
    """The longest proper prefix of `stop` that `text` ends with (Knuth–Morris–Pratt over the last
    len(stop) − 1 characters: O(len(stop)))."""
    failure = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = failure[k - 1]
        if stop[i] == stop[k]:
            k += 1
        failure[i] = k
    matched = 0
    for char in text[-(len(stop) - 1):]:
        while matched and char != stop[matched]:
            matched = failure[matched - 1]
        if char == stop[matched]:
            matched += 1
        if matched == len(stop):  # a whole stop string: first_stop ends the answer before this matters
            matched = failure[matched - 1]
    return matched
