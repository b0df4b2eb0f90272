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


def test_requests_another_node_accepted_are_refused_as_replays() -> None:
    """What a node learns from applied log entries ([signature, ts_ms]) counts as seen here."""
    verifier = Verifier([KEY], window_ms=5_000)
    now = 2_000_000
    accepted_elsewhere = headers(now - 1_000, b"a")
    stale = headers(now - 9_000, b"b")  # outside the window: not worth remembering
    verifier.remember_many([[accepted_elsewhere["X-QB-Signature"], now - 1_000],
                            [stale["X-QB-Signature"], now - 9_000],
                            ["not", "a pair", "at all"], [123, now]], now_ms=now)
    assert list(verifier._seen) == [accepted_elsewhere["X-QB-Signature"]]
    with pytest.raises(AuthError) as replay:
        verifier.verify(accepted_elsewhere, "POST", "/v1/orders", b"a", now_ms=now)
    assert replay.value.code == "replayed"
    verifier.remember_many([[accepted_elsewhere["X-QB-Signature"], now - 1_000]], now_ms=now)
    assert len(verifier._expiry) == 1  # learnt once, however often it is applied
