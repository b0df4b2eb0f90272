"""Request signatures: the replay window forgets what can no longer be replayed; hostile
headers are definite refusals."""

from __future__ import annotations

import pytest

from api.auth import AuthError, Verifier, new_credentials, sign
from api.sdk.signing import Signer

KEY = new_credentials("trader", "alice")


def headers(ts: int, body: bytes) -> dict[str, str]:
    return {
        "X-QB-Key": KEY.key_id,
        "X-QB-Timestamp": str(ts),
        "X-QB-Signature": sign(KEY.secret, ts, "POST", "/v1/orders", body),
    }


def test_replays_are_refused_and_old_signatures_forgotten() -> None:
    verifier = Verifier([KEY], window_ms=5_000)
    start = 1_000_000
    for i in range(3000):  # 3000 requests within one window: all remembered
        verifier.verify(
            headers(start + i, b"%d" % i), "POST", "/v1/orders", b"%d" % i, now_ms=start + i
        )
    with pytest.raises(AuthError) as replay:
        verifier.verify(
            headers(start + 10, b"10"), "POST", "/v1/orders", b"10", now_ms=start + 3000
        )
    assert replay.value.code == "replayed"
    # Past the window: the old request is refused as expired, and its signature forgotten.
    later = start + 3000 + 5_000
    with pytest.raises(AuthError) as expired:
        verifier.verify(headers(start + 10, b"10"), "POST", "/v1/orders", b"10", now_ms=later)
    assert expired.value.code == "expired"
    verifier.verify(headers(later, b"new"), "POST", "/v1/orders", b"new", now_ms=later)
    assert len(verifier._seen) == len(verifier._expiry) == 1  # only the new one


def test_a_request_the_cluster_applied_is_refused_before_the_log() -> None:
    """`applied` (the replicated replay window's look-up) makes a request this node never saw
    a replay, if the cluster applied it; it is asked only about well-signed requests."""
    asked: list[str] = []
    applied_elsewhere = headers(2_000_000, b"a")["X-QB-Signature"]

    def applied(signature: str) -> bool:
        asked.append(signature)
        return signature == applied_elsewhere

    verifier = Verifier([KEY], window_ms=5_000, applied=applied)
    now = 2_000_000
    with pytest.raises(AuthError) as replay:
        verifier.verify(headers(now, b"a"), "POST", "/v1/orders", b"a", now_ms=now)
    assert replay.value.code == "replayed"
    fresh = headers(now, b"b")
    assert verifier.verify(fresh, "POST", "/v1/orders", b"b", now_ms=now) == KEY
    with pytest.raises(AuthError):
        verifier.verify(
            {**fresh, "X-QB-Signature": "0" * 64}, "POST", "/v1/orders", b"b", now_ms=now
        )
    assert asked == [applied_elsewhere, fresh["X-QB-Signature"]]


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-QB-Timestamp", "\u00b2"),  # latin-1 superscript two: isdigit() is true, int() raises
        ("X-QB-Timestamp", "\u0661\u0662"),  # Arabic-Indic digits: int() would read them as 12
        ("X-QB-Timestamp", "+1000"),
        ("X-QB-Signature", "\u00e9" * 64),  # non-ASCII: hmac.compare_digest raises TypeError
        ("X-QB-Signature", "not hex"),
    ],
    ids=[
        "superscript-digit",
        "arabic-indic-digits",
        "plus-sign",
        "non-ascii-signature",
        "non-hex-signature",
    ],
)
def test_a_non_ascii_timestamp_or_signature_is_a_definite_refusal(header: str, value: str) -> None:
    """Only a key id is needed to reach these checks: each must be an AuthError (401), never
    an exception the server would answer with a 500."""
    verifier = Verifier([KEY], window_ms=5_000)
    now = 3_000_000
    signed = {**headers(now, b"x"), header: value}
    with pytest.raises(AuthError) as refused:
        verifier.verify(signed, "POST", "/v1/orders", b"x", now_ms=now)
    assert refused.value.code == "unauthenticated"


def test_the_sdk_never_signs_twice_alike_and_forgets_at_the_window_s_rate() -> None:
    """The SDK's signer bumps the timestamp of an identical request in the same millisecond,
    and forgets what left its window as it goes: what it remembers is the last window's
    signatures, never a pile it rebuilds on every request once large (which cost O(window)
    of CPU per request for a client above 410 requests/s)."""
    now = [5_000_000 * 1_000_000]  # ns
    signer = Signer(window_ms=1_000, clock_ns=lambda: now[0])
    stamps = {signer.headers(KEY, "POST", "/v1/orders", b"{}")["X-QB-Timestamp"] for _ in range(50)}
    assert len(stamps) == 50 and len(signer) == 50  # all in one millisecond, all distinct
    for _ in range(3):  # 1.5 windows at 10,000 requests/s: the oldest leave as new ones come
        for i in range(5000):
            now[0] += 100_000
            signer.headers(KEY, "POST", "/v1/orders", b"%d" % i)
        assert len(signer) <= 50 + 10 * 1_000 + 1
    assert len(signer) == 10 * 1_000 + 1  # the last window's (both ends in), nothing older
    now[0] += 2_000 * 1_000_000
    signer.headers(KEY, "POST", "/v1/orders", b"{}")
    assert len(signer) == 1
