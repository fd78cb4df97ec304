"""Tests for router.stop: chunked matching must equal one-shot truncation."""

from __future__ import annotations

import random
from typing import Optional

import pytest

from router.stop import StopStringMatcher


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def run_chunks(stops: list[str], chunks: list[str]) -> tuple[str, bool, Optional[StopStringMatcher]]:
    m = StopStringMatcher(stops)
    out, stopped = [], False
    for c in chunks:
        safe, stopped = m.feed(c)
        out.append(safe)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
        stopped = m.stopped  # a match held back while a longer stop could still complete
    return "".join(out), stopped, m


def random_split(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text) + 1, 8))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_exhaustive_small_alphabet():
    # Tiny alphabet => many overlapping partial matches (the hard cases).
    rng = random.Random(0)
    for _ in range(20000):
        alphabet = rng.choice(["ab", "abc", "a\n"])
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
        chunks = random_split(rng, text)
        got, stopped, _ = run_chunks(stops, chunks)
        assert (got, stopped) == reference(text, stops), (text, stops, chunks)


def test_all_splits_of_one_text():
    text = "abaababcabxabcab"
    stops = ["abc", "bab", "cabx"]
    expected = reference(text, stops)
    # Every way of cutting the text at up to 3 positions.
    n = len(text)
    for i in range(n + 1):
        for j in range(i, n + 1):
            for k in range(j, n + 1):
                chunks = [text[:i], text[i:j], text[j:k], text[k:]]
                assert run_chunks(stops, chunks)[:2] == expected


def test_character_by_character_unicode():
    rng = random.Random(1)
    words = ["你好", "😀", "\n\nUser:", "END", "é", " ", "ab", "<|im_end|>"]
    for _ in range(2000):
        text = "".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        stops = rng.sample(["\n\nUser:", "END", "😀你", "<|im_end|>", "éé", "User"], rng.randint(1, 3))
        assert run_chunks(stops, list(text))[:2] == reference(text, stops)
        assert run_chunks(stops, random_split(rng, text))[:2] == reference(text, stops)


def test_holds_back_possible_prefix_then_releases():
    m = StopStringMatcher(["\n\nUser:"])
    assert m.feed("Hello\n") == ("Hello", False)
    assert m.feed("\nUs") == ("", False)
    assert m.feed("ing") == ("\n\nUsing", False)
    assert m.flush() == ""


def test_stop_across_chunks_and_after_stop():
    m = StopStringMatcher(["STOP"])
    assert m.feed("abcST") == ("abc", False)
    assert m.feed("OPxyz") == ("", True)
    assert m.matched == "STOP" and m.stopped
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_earliest_match_wins():
    m = StopStringMatcher(["world", "lo w"])
    assert m.feed("hello world") == ("hel", True)
    assert m.matched == "lo w"
    # Same start: the text is the same either way; the longer string is reported.
    m = StopStringMatcher(["ab", "abc"])
    assert m.feed("xabcd") == ("x", True)
    assert m.matched == "abc"


def test_flush_returns_held_text():
    m = StopStringMatcher(["</s>"])
    assert m.feed("the end </") == ("the end ", False)
    assert m.flush() == "</"
    assert m.flush() == ""


@pytest.mark.parametrize("stops", [[], [""], ["", ""]])
def test_no_stops_passes_through(stops):
    m = StopStringMatcher(stops)
    assert m.feed("abc") == ("abc", False)
    assert m.feed("") == ("", False)
    assert m.flush() == ""


def test_earlier_longer_stop_is_awaited():
    # "a" is complete, but "cabc" starts before it and might still complete.
    m = StopStringMatcher(["a", "cabc"])
    assert m.feed("xcab") == ("x", False)
    assert m.feed("c!") == ("", True)
    assert m.matched == "cabc"
    m = StopStringMatcher(["a", "cabc"])
    assert m.feed("xcab") == ("x", False)
    assert m.feed("d") == ("c", True)
    assert m.matched == "a"
    # Stream ends while waiting: the complete match still applies.
    m = StopStringMatcher(["a", "cabc"])
    assert m.feed("xcab") == ("x", False)
    assert m.flush() == "c"
    assert m.stopped and m.matched == "a"


def test_emits_eagerly():
    # Text that cannot start a stop string is never held back.
    m = StopStringMatcher(["xyz"])
    assert m.feed("abc") == ("abc", False)
    assert m.feed("ax") == ("a", False)
    assert m.feed("a") == ("xa", False)
