"""Fast JSON for the API's hot paths (orjson), shared by the node and the SDK.

`dumps` is compact; orjson refuses integers beyond 64 bits, and those go through the
standard library instead. `loads` gives exactly what `json.loads` gives (tested): orjson
would read an integer beyond 64 bits as a float, so text holding a run of 19 or more digits
(any integer that might not fit) is read by the standard library, as is text orjson refuses.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: an int beyond 64 bits
        return json.dumps(value, separators=(",", ":")).encode()


_LONG_DIGITS = re.compile(r"[0-9]{19}")
_LONG_DIGITS_B = re.compile(rb"[0-9]{19}")


def loads(raw: bytes | str) -> Any:
    long_digits = _LONG_DIGITS_B if isinstance(raw, bytes | bytearray) else _LONG_DIGITS
    if long_digits.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)  # the standard library's answer, or its ValueError
