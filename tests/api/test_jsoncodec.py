"""api/sdk/codec.py answers exactly as the standard library would, only faster."""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from api.sdk.codec import dumps, loads

# As the other property tests: the same examples every run (CI is reproducible), no example
# database, no per-example deadline (a loaded machine is not a failure).
SETTINGS = settings(derandomize=True, database=None, deadline=None, max_examples=300)

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@SETTINGS
@given(values)
def test_dumps_reads_back_as_the_standard_library_reads_it(value) -> None:
    assert json.loads(dumps(value)) == value
    assert loads(dumps(value)) == value


@SETTINGS
@given(st.text() | st.binary())
@example("NaN")  # json.loads reads NaN and the infinities; NaN never equals itself
@example('[Infinity, {"a": -Infinity}, NaN]')
def test_loads_accepts_and_refuses_what_the_standard_library_does(raw) -> None:
    try:
        expected = json.loads(raw)
    except ValueError:
        try:
            loads(raw)
        except ValueError:
            return
        raise AssertionError(f"accepted {raw!r}, which json.loads refuses") from None
    assert repr(loads(raw)) == repr(expected)  # repr: NaN reads as NaN, and types must match


def test_integers_beyond_64_bits_and_lone_surrogates() -> None:
    assert loads(dumps({"qty": 2**70})) == {"qty": 2**70}
    assert loads(b'{"qty": 123456789012345678901234567890}') == {
        "qty": 123456789012345678901234567890
    }
    assert loads('"\\ud800"') == "\ud800"


@SETTINGS
@given(st.from_regex(r"\A-?[0-9]{1,40}(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?\Z"))
def test_numbers_read_as_the_standard_library_reads_them(text) -> None:
    try:
        expected = json.loads(text)
    except ValueError:  # a leading zero, say
        return
    got = loads(text.encode())
    assert (type(got), got) == (type(expected), expected)
