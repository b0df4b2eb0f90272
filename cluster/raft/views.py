"""msgpack unpacked with its large bins as views of the buffer, not copies (dumps).

A node loading its dump reads a state of tens of MB nested three msgpack levels deep (the
dump, its body, the node snapshot around the exchange's snapshot); `msgpack.unpackb` copies
every bin it returns, so a million-order state was copied three times more than read, each
copy fresh memory (page faults, which on a shared VM cost more than the copy).

`unpack` reads the subset of msgpack our own writers use (nil, booleans, integers, strings,
bins, arrays and maps) and returns what `msgpack.unpackb(buf, raw=False)` would, except that
a bin of at least `min_view` bytes is a `memoryview` of `buf`. Anything else (an ext type, a
float, a map key that is not a string or an integer, trailing bytes) raises `ValueError`,
as it does for a buffer that ends early. Views keep `buf` alive; callers that keep only what
they decode from them hold nothing.
"""

from __future__ import annotations

MIN_VIEW = 1 << 16


def unpack(buf: bytes | memoryview, *, min_view: int = MIN_VIEW) -> object:
    view = memoryview(buf)
    value, end = _read(view, 0, min_view)
    if end != len(view):
        raise ValueError(f"{len(view) - end} bytes after the msgpack object")
    return value


def bin_at(view: memoryview, at: int) -> tuple[memoryview, int]:
    """The msgpack bin that starts at `at` in `view`, as a view, and where it ends;
    ValueError if none starts there or it is cut short."""
    if at >= len(view) or not 0xC4 <= view[at] <= 0xC6:  # bin 8, 16, 32
        raise ValueError("no msgpack bin here")
    size, start = _size(view, at + 1, 1 << (view[at] - 0xC4))
    end = start + size
    if end > len(view):
        raise ValueError("msgpack bin truncated")
    return view[start:end], end


def _size(view: memoryview, at: int, width: int) -> tuple[int, int]:
    end = at + width
    if end > len(view):
        raise ValueError("msgpack object truncated")
    return int.from_bytes(view[at:end], "big"), end


def _read(view: memoryview, at: int, min_view: int) -> tuple[object, int]:
    if at >= len(view):
        raise ValueError("msgpack object truncated")
    code = view[at]
    at += 1
    if code <= 0x7F:
        return code, at
    if code >= 0xE0:
        return code - 0x100, at
    if 0xA0 <= code <= 0xBF:
        return _text(view, at, code & 0x1F)
    if 0x90 <= code <= 0x9F:
        return _array(view, at, code & 0x0F, min_view)
    if 0x80 <= code <= 0x8F:
        return _map(view, at, code & 0x0F, min_view)
    if code == 0xC0:
        return None, at
    if code in (0xC2, 0xC3):
        return code == 0xC3, at
    if code in (0xC4, 0xC5, 0xC6):
        data, end = bin_at(view, at - 1)
        return (data if len(data) >= min_view else data.tobytes()), end
    if 0xCC <= code <= 0xD3:  # uint 8-64, int 8-64
        width = 1 << ((code - 0xCC) % 4)
        if at + width > len(view):
            raise ValueError("msgpack integer truncated")
        return int.from_bytes(view[at : at + width], "big", signed=code >= 0xD0), at + width
    if code in (0xD9, 0xDA, 0xDB):  # str 8, 16, 32
        size, at = _size(view, at, 1 << (code - 0xD9))
        return _text(view, at, size)
    if code in (0xDC, 0xDD):  # array 16, 32
        size, at = _size(view, at, 2 << (code - 0xDC))
        return _array(view, at, size, min_view)
    if code in (0xDE, 0xDF):  # map 16, 32
        size, at = _size(view, at, 2 << (code - 0xDE))
        return _map(view, at, size, min_view)
    raise ValueError(f"msgpack type 0x{code:02x} is not one this build writes")


def _text(view: memoryview, at: int, size: int) -> tuple[str, int]:
    end = at + size
    if end > len(view):
        raise ValueError("msgpack string truncated")
    return str(view[at:end], "utf-8"), end


def _array(view: memoryview, at: int, size: int, min_view: int) -> tuple[list, int]:
    items = []
    for _ in range(size):
        item, at = _read(view, at, min_view)
        items.append(item)
    return items, at


def _map(view: memoryview, at: int, size: int, min_view: int) -> tuple[dict, int]:
    items = {}
    for _ in range(size):
        key, at = _read(view, at, min_view)
        if type(key) not in (str, int):
            raise ValueError("msgpack map key is not a string or an integer")
        items[key], at = _read(view, at, min_view)
    return items, at
