"""Pure tests: percentile math, latency summaries, Pusher signatures."""

from __future__ import annotations

import math

import pytest

from vask.bench.signing import hmac_hex, presence_auth, private_auth, sign_query
from vask.bench.stats import latency_summary_us, median, percentile, safe_div

KEY = "278d425bdf160c739803"
SECRET = "7ad3773142a6692b25b8"


def test_percentile_nearest_rank() -> None:
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.0], 99) == 7.0
    # nearest rank: p50 of 4 samples is the 2nd, p51 the 3rd
    assert percentile([1, 2, 3, 4], 50) == 2
    assert percentile([1, 2, 3, 4], 51) == 3
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_latency_summary_ms() -> None:
    s = latency_summary_us([1000, 2000, 3000, 4000, -5])
    assert s["count"] == 5
    assert s["p50"] == 2.0
    assert s["max"] == 4.0
    assert s["p99"] == 4.0
    assert s["mean"] == pytest.approx(2.0)
    assert math.isnan(latency_summary_us([])["p50"])


def test_median_and_safe_div() -> None:
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 2, 3]) == 2.5
    assert math.isnan(median([]))
    assert safe_div(1, 0) != safe_div(1, 0)  # nan
    assert safe_div(6, 3) == 2


def test_http_signature_spec_vector() -> None:
    body = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
    q = sign_query("POST", "/apps/3/events", KEY, SECRET, body, timestamp=1353088179)
    params = dict(p.split("=", 1) for p in q.split("&"))
    assert params["body_md5"] == "ec365a775a4cd0599faeb73354201b6f"
    assert params["auth_version"] == "1.0"
    assert params["auth_signature"] == (
        "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
    )


def test_http_signature_get_without_body() -> None:
    q = sign_query(
        "GET", "/apps/3/channels", KEY, SECRET, timestamp=1353088179,
        extra={"filter_by_prefix": "presence-", "info": "user_count"},
    )
    assert "body_md5" not in q
    assert q.endswith(
        "auth_signature=16819168891cb5dfd72b5c7a5d3d602605b26c6ba1930033b5e2eeeb65010291"
    )


def test_channel_auth_vectors() -> None:
    assert private_auth(KEY, SECRET, "1234.1234", "private-foobar") == (
        f"{KEY}:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
    )
    cd = '{"user_id":"10","user_info":{"name":"Mr. Channels"}}'
    assert presence_auth(KEY, SECRET, "1234.1234", "presence-foobar", cd) == (
        f"{KEY}:4c6d8fc42a207ba96a0779844171b0bb819d96ffceef9609f5cce596ab17a800"
    )
    assert hmac_hex(SECRET, '1234.1234::user::{"id":"12345"}') == (
        "4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba"
    )
