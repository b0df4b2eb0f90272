"""Fast JSON for the API's hot paths (orjson): the wire format's codec, the SDK's and the node's.

It lives in the SDK because the SDK imports nothing of the server side; the node imports it
from here.

`dumps` is compact; orjson refuses integers beyond 64 bits, and those go through the
standard library instead. `loads` gives exactly what `json.loads` gives (tested): orjson
would read an integer beyond 64 bits as a float, so text holding a run of 19 or more digits
(any integer that might not fit) is read by the standard library, as is text orjson refuses.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: an int beyond 64 bits
        return json.dumps(value, separators=(",", ":")).encode()


# Every digit becomes "0": a run of 19 is then one C-speed substring search (a regex costs
# more than orjson's whole parse).
_DIGITS_TO_ZERO = bytes.maketrans(b"0123456789", b"0000000000")
_LONG_RUN = b"0" * 19


def loads(raw: bytes | str) -> Any:
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if _LONG_RUN not in data.translate(_DIGITS_TO_ZERO):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)  # the standard library's answer, or its ValueError
