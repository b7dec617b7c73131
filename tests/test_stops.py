"""Stop strings: the linear checks agree with their definitions on every small case."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zspa.runtime.stops import first_stop, held_back

TEXT = st.text(alphabet="ab", max_size=24)  # two letters: many overlaps, the hard case for the prefix check
STOPS = st.lists(st.text(alphabet="ab", max_size=8), max_size=4)


def held_back_by_definition(text: str, stops: list[str]) -> int:
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@settings(max_examples=500, deadline=None)
@given(TEXT, STOPS)
def test_held_back_is_the_longest_proper_prefix_at_the_end(text, stops):
    assert held_back(text, stops) == held_back_by_definition(text, stops)


@settings(max_examples=500, deadline=None)
@given(TEXT, TEXT, STOPS)
def test_first_stop_finds_the_earliest_stop_the_new_text_completed(before, new, stops):
    """As the decode loop calls it: no stop string lay wholly in `before` (it would have ended the answer)."""
    if any(s and s in before for s in stops):
        return
    text = before + new
    hits = [text.find(s) for s in stops if s and s in text]
    assert first_stop(text, stops, len(new)) == (min(hits) if hits else None)


def test_a_long_stop_string_costs_its_length_not_its_square():
    """A 200,000-character stop string whose every prefix the text could end with: the definition
    would make 2·10^10 character comparisons; the linear check finishes at once (here, at all)."""
    stop = "a" * 200_000
    assert held_back("b" + "a" * 199_999, [stop]) == 199_999
    assert first_stop("a" * 200_000, [stop], 1) == 0
