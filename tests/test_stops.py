"""Tests for engine/stops.py (StopMatcher) and engine/textstream.py (TextStream)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from lowgear.errors import ConfigError, LowgearError
from lowgear.engine.stops import StopMatcher
from lowgear.engine.textstream import TextStream

# A small alphabet makes stop strings occur, overlap and almost-occur often.
small_text = st.text(alphabet="ab<|>é", max_size=60)
stop_lists = st.lists(st.text(alphabet="ab<|>é", min_size=1, max_size=6), max_size=4)


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    pieces, start = [], 0
    for p in points:
        pieces.append(text[start:p])
        start = p
    pieces.append(text[start:])
    return pieces


def expected(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut before the stop string completed first (earliest end; the longest of those ending there):
    what a reader of the stream sees, character by character, independent of chunking."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))], True
    return text, False


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[str, bool, list[str]]:
    m = StopMatcher(stops)
    out, stopped, emits = [], False, []
    for piece in pieces:
        emit, stopped = m.push(piece)
        emits.append(emit)
        out.append(emit)
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped, emits


@settings(max_examples=400, deadline=None)
@given(text=small_text, stops=stop_lists, cuts=st.lists(st.integers(0, 60), max_size=20))
def test_matcher_cuts_exactly_before_first_stop(text, stops, cuts):
    pieces = split(text, cuts)
    got, stopped, emits = run_matcher(stops, pieces)
    want, want_stopped = expected(text, stops)
    assert got == want
    assert stopped == want_stopped
    # Nothing past the cut is ever emitted, at any point of the stream.
    seen = ""
    for e in emits:
        seen += e
        assert want.startswith(seen)


@settings(max_examples=200, deadline=None)
@given(text=small_text, stops=stop_lists, cuts=st.lists(st.integers(0, 60), max_size=20))
def test_matcher_holds_back_only_possible_stop_prefixes(text, stops, cuts):
    m = StopMatcher(stops)
    seen = ""
    for piece in split(text, cuts):
        emit, stopped = m.push(piece)
        seen += piece
        if stopped:
            break
        # What is held is a proper prefix of some stop string, and a suffix of the text so far.
        held = m.held
        assert seen.endswith(held)
        assert held == "" or any(s.startswith(held) and s != held for s in stops)


def test_stop_spanning_many_pushes():
    m = StopMatcher(["<|im_end|>"])
    out = []
    for piece in ["Hello", " world", "<", "|", "im", "_e", "nd", "|>", " more"]:
        emit, stopped = m.push(piece)
        out.append(emit)
    assert "".join(out) == "Hello world" and stopped and m.matched == "<|im_end|>"
    assert m.push("again") == ("", True)


def test_false_start_is_released():
    m = StopMatcher(["STOP"])
    assert m.push("ST") == ("", False)
    assert m.push("OP") == ("", True)
    m = StopMatcher(["STOP"])
    assert m.push("STO") == ("", False)
    assert m.push("RM") == ("STORM", False)
    assert m.push("ST") == ("", False)
    assert m.flush() == "ST"


def test_earliest_stop_wins():
    m = StopMatcher(["world", "lo w"])
    assert m.push("hello world") == ("hel", True)
    assert m.matched == "lo w"


def test_no_stop_strings_passes_everything():
    m = StopMatcher([])
    assert m.push("anything") == ("anything", False)
    assert m.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ConfigError, match="non-empty"):
        StopMatcher(["ok", ""])
    assert issubclass(ConfigError, LowgearError)


# ---------------------------------------------------------------------------- TextStream


def stream_bytes(data: bytes, cuts: list[int]) -> str:
    """Decode `data` through a TextStream whose token table is the byte chunks cut at `cuts`."""
    points = sorted({min(c, len(data)) for c in cuts})
    chunks, start = [], 0
    for p in points:
        chunks.append(data[start:p])
        start = p
    chunks.append(data[start:])
    ts = TextStream(chunks)
    out = []
    for i in range(len(chunks)):
        piece = ts.push(i)
        assert "\ufffd" not in piece or "\ufffd" in data.decode("utf-8", "replace")
        out.append(piece)
    out.append(ts.flush())
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40), cuts=st.lists(st.integers(0, 200), max_size=30))
def test_textstream_reassembles_any_utf8(text, cuts):
    assert stream_bytes(text.encode("utf-8"), cuts) == text


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=40), cuts=st.lists(st.integers(0, 60), max_size=20))
def test_textstream_invalid_bytes_match_one_shot_decode(data, cuts):
    assert stream_bytes(data, cuts) == data.decode("utf-8", errors="replace")


def test_split_character_is_never_emitted_in_halves():
    emoji = "🦙".encode()  # 4 bytes
    ts = TextStream([b"llama ", emoji[:1], emoji[1:3], emoji[3:], b"!"])
    assert ts.push(0) == "llama "
    assert ts.push(1) == ""
    assert ts.push(2) == ""
    assert ts.push(3) == "🦙"
    assert ts.push(4) == "!"
    assert ts.flush() == ""


def test_definitely_invalid_bytes_become_replacement_at_once():
    ts = TextStream([b"\xff", b"a", b"\xe4\xb8", b""])
    assert ts.push(0) == "\ufffd"
    assert ts.push(1) == "a"
    assert ts.push(2) == ""  # could still become a CJK character
    assert ts.push(1) == "\ufffda"  # it did not
    assert ts.push(2) == ""
    assert ts.flush() == "\ufffd"  # incomplete at the end
    assert ts.push(1) == "a"  # flush resets


def test_token_outside_vocabulary():
    with pytest.raises(ValueError, match="outside"):
        TextStream([b"a"]).push(1)


def test_result_does_not_depend_on_chunking():
    # found by hypothesis: one push of "><<" used to cut at 0 (the longer stop starts earlier),
    # two pushes cut at 1; a stream has to stop where "<" completes, whatever the token boundaries.
    stops = ["<", "><<"]
    assert run_matcher(stops, ["><<"])[0] == run_matcher(stops, ["><", "<"])[0] == ">"
