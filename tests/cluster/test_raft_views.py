"""Dumps unpacked with their large bins as views (cluster/raft/views.py): the same values
as msgpack gives, never a copy of a large bin, and every malformed buffer refused."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.raft.storage import DumpHeader, decode_dump, encode_dump
from cluster.raft.views import unpack

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=40),
    st.binary(max_size=40),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=20),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-5, 300)), inner, max_size=20),
    ),
    max_leaves=60,
)


def _plain(value: object) -> object:
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(_values, st.sampled_from([0, 3, 1 << 16]))
def test_it_reads_what_msgpack_writes(value: object, min_view: int) -> None:
    packed = msgpack.packb(value, use_bin_type=True)
    got = unpack(packed, min_view=min_view)
    assert _plain(got) == msgpack.unpackb(packed, raw=False, strict_map_key=False)


def test_a_large_bin_is_a_view_of_the_buffer_and_a_small_one_a_copy() -> None:
    big, small = bytes(range(256)) * 300, b"abc"
    buf = msgpack.packb({"big": big, "small": [small]}, use_bin_type=True)
    got = unpack(buf)
    assert isinstance(got, dict)
    assert isinstance(got["big"], memoryview) and got["big"].obj is buf and got["big"] == big
    assert got["small"] == [small] and type(got["small"][0]) is bytes


@pytest.mark.parametrize(
    "buf",
    [
        msgpack.packb(1.5),
        msgpack.packb(msgpack.ExtType(1, b"x")),
        msgpack.packb([1, 2]) + b"\x00",
        msgpack.packb({(1, 2): 3}, use_bin_type=True),
        msgpack.packb({b"k": 3}, use_bin_type=True),
        b"",
    ],
)
def test_what_this_build_does_not_write_is_refused(buf: bytes) -> None:
    with pytest.raises(ValueError):
        unpack(buf)


def test_every_truncation_is_refused() -> None:
    buf = msgpack.packb(
        {"a": [1, -1, 300, -300, 2**40, "xyz" * 20, b"q" * 70_000, None, True]},
        use_bin_type=True,
    )
    for length in range(len(buf)):
        with pytest.raises(ValueError):
            unpack(buf[:length])


def test_a_dump_decodes_the_same_with_views() -> None:
    machine = bytes(range(256)) * 1000
    header = DumpHeader(last=(b"\x01", 9, 2), prev=(b"\x02", 8, 2), cluster=("a:1", "b:2"))
    raw = encode_dump(header, machine)
    copied = decode_dump(raw, source="test")
    viewed = decode_dump(raw, source="test", views=True)
    assert copied == (header, machine) and type(copied[1]) is bytes
    assert viewed[0] == header and isinstance(viewed[1], memoryview) and viewed[1] == machine
