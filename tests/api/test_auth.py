"""Request signatures: the replay window forgets what can no longer be replayed."""

from __future__ import annotations

import pytest

from api.auth import AuthError, Verifier, new_credentials, sign

KEY = new_credentials("trader", "alice")


def headers(ts: int, body: bytes) -> dict[str, str]:
    return {"X-QB-Key": KEY.key_id, "X-QB-Timestamp": str(ts),
            "X-QB-Signature": sign(KEY.secret, ts, "POST", "/v1/orders", body)}


def test_replays_are_refused_and_old_signatures_forgotten() -> None:
    verifier = Verifier([KEY], window_ms=5_000)
    start = 1_000_000
    for i in range(3000):  # 3000 requests within one window: all remembered
        verifier.verify(headers(start + i, b"%d" % i), "POST", "/v1/orders", b"%d" % i,
                        now_ms=start + i)
    with pytest.raises(AuthError) as replay:
        verifier.verify(headers(start + 10, b"10"), "POST", "/v1/orders", b"10",
                        now_ms=start + 3000)
    assert replay.value.code == "replayed"
    # Past the window: the old request is refused as expired, and its signature forgotten.
    later = start + 3000 + 5_000
    with pytest.raises(AuthError) as expired:
        verifier.verify(headers(start + 10, b"10"), "POST", "/v1/orders", b"10", now_ms=later)
    assert expired.value.code == "expired"
    verifier.verify(headers(later, b"new"), "POST", "/v1/orders", b"new", now_ms=later)
    assert len(verifier._seen) == len(verifier._expiry) == 1  # only the new one
