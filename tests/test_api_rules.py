"""Tests of vask.api_rules: signatures (known vectors), app lookup, event bodies,
``info`` rules and the backend token bucket. No sockets, no broker."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from vask.api_rules import (
    CHANNEL_INFO,
    CHANNELS_INFO,
    EMPTY_BODY_MD5,
    TRIGGER_INFO,
    ApiError,
    TokenBucket,
    app_for_auth_key,
    app_for_segment,
    check_channel_info,
    check_channel_name,
    check_channels_info,
    check_user_id,
    decode_segment,
    load_json_object,
    parse_batch,
    parse_event,
    parse_info,
    parse_query,
    retry_after_seconds,
    verify_signature,
)
from vask.config import App, Settings

# Credentials of a worked signing example.
KEY = "278d425bdf160c739803"
SECRET = "7ad3773142a6692b25b8"
TS = 1353088179
APP = App(id="3", key=KEY, secret=SECRET)
OTHER = App(id="77", key="other-key", secret="other-secret")
SETTINGS = Settings(apps=(APP, OTHER))

SPEC_BODY = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'


def hmac_hex(secret: str, text: str) -> str:
    """An independent signer, so the tests do not trust vask.signing."""
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def signed_params(
    method: str,
    path: str,
    body: bytes = b"",
    extra: dict[str, str] | None = None,
    *,
    ts: int = TS,
    key: str = KEY,
    secret: str = SECRET,
    md5: bool | None = None,
) -> list[tuple[str, str]]:
    """Query pairs signed the Pusher way; ``md5`` None = only when there is a body."""
    params = {"auth_key": key, "auth_timestamp": str(ts), "auth_version": "1.0"}
    params.update(extra or {})
    if md5 or (md5 is None and body):
        params["body_md5"] = hashlib.md5(body).hexdigest()
    text = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
    params["auth_signature"] = hmac_hex(secret, f"{method}\n{path}\n{text}")
    return list(params.items())


def error_of(excinfo: pytest.ExceptionInfo[ApiError]) -> tuple[int, str]:
    return excinfo.value.status, excinfo.value.message


# --- signing vectors -------------------------------------------------------------------


def test_spec_post_events_vector() -> None:
    assert hashlib.md5(SPEC_BODY).hexdigest() == "ec365a775a4cd0599faeb73354201b6f"
    query = (
        f"auth_key={KEY}&auth_timestamp={TS}&auth_version=1.0"
        "&body_md5=ec365a775a4cd0599faeb73354201b6f"
        "&auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
    )
    verify_signature(APP, "POST", "/apps/3/events", parse_query(query), SPEC_BODY, TS)


def test_spec_get_channels_vector() -> None:
    query = (
        f"auth_key={KEY}&auth_timestamp={TS}&auth_version=1.0"
        "&filter_by_prefix=presence-&info=user_count"
        "&auth_signature=16819168891cb5dfd72b5c7a5d3d602605b26c6ba1930033b5e2eeeb65010291"
    )
    verify_signature(APP, "GET", "/apps/3/channels", parse_query(query), b"", TS)


def test_spec_get_channels_vector_python_style_with_empty_body_md5() -> None:
    # pusher-http-python signs body_md5 of the empty body even on GET.
    query = (
        f"auth_key={KEY}&auth_timestamp={TS}&auth_version=1.0"
        "&body_md5=d41d8cd98f00b204e9800998ecf8427e"
        "&filter_by_prefix=presence-&info=user_count"
        "&auth_signature=f3f17c61ae491cc9085db68b22076e9b772e3bcb301659d655153ee3f9782aba"
    )
    assert EMPTY_BODY_MD5 == "d41d8cd98f00b204e9800998ecf8427e"
    verify_signature(APP, "GET", "/apps/3/channels", parse_query(query), b"", TS)


def test_spec_terminate_connections_vector() -> None:
    query = (
        f"auth_key={KEY}&auth_timestamp={TS}&auth_version=1.0"
        "&body_md5=99914b932bd37a50b983c5e7c90ae93b"
        "&auth_signature=01fa634edeb0cae84115307cad5c23f65a46cd286461b1c89637a3b5871a8f0e"
    )
    path = "/apps/3/users/12345/terminate_connections"
    verify_signature(APP, "POST", path, parse_query(query), b"{}", TS)


def test_spec_vector_rejected_with_one_byte_changed() -> None:
    query = (
        f"auth_key={KEY}&auth_timestamp={TS}&auth_version=1.0"
        "&body_md5=ec365a775a4cd0599faeb73354201b6f"
        "&auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
    )
    with pytest.raises(ApiError) as excinfo:
        verify_signature(APP, "POST", "/apps/3/event", parse_query(query), SPEC_BODY, TS)
    status, message = error_of(excinfo)
    assert status == 401
    assert message.startswith("Invalid signature: you should have sent HmacSHA256Hex(")
    assert "POST\\n/apps/3/event\\nauth_key=" in message
    assert 'but you sent "da454824' in message


# --- verify_signature: each failure ---------------------------------------------------


def test_signature_accepts_upper_case_hex() -> None:
    params = [(k, v.upper() if k == "auth_signature" else v)
              for k, v in signed_params("GET", "/apps/3/channels")]
    verify_signature(APP, "GET", "/apps/3/channels", params, b"", TS)


def test_signature_secret_matters() -> None:
    params = signed_params("GET", "/apps/3/channels", secret="wrong")
    with pytest.raises(ApiError) as excinfo:
        verify_signature(APP, "GET", "/apps/3/channels", params, b"", TS)
    assert excinfo.value.status == 401


def test_signature_method_matters() -> None:
    params = signed_params("GET", "/apps/3/channels")
    with pytest.raises(ApiError):
        verify_signature(APP, "POST", "/apps/3/channels", params, b"", TS)


@pytest.mark.parametrize("missing", ["auth_key", "auth_timestamp", "auth_version",
                                     "auth_signature"])
def test_missing_auth_parameter(missing: str) -> None:
    params = [(k, v) for k, v in signed_params("GET", "/apps/3/channels") if k != missing]
    with pytest.raises(ApiError) as excinfo:
        verify_signature(APP, "GET", "/apps/3/channels", params, b"", TS)
    status, message = error_of(excinfo)
    assert status == 401
    assert "Missing authentication" in message and missing in message


def test_auth_key_must_be_the_apps_key() -> None:
    params = signed_params("GET", "/apps/3/channels", key="other-key")
    with pytest.raises(ApiError) as excinfo:
        verify_signature(APP, "GET", "/apps/3/channels", params, b"", TS)
    assert error_of(excinfo) == (401, "auth_key 'other-key' is not the key of this app.")


def test_auth_version_must_be_1_0() -> None:
    params = [(k, "2.0" if k == "auth_version" else v)
              for k, v in signed_params("GET", "/apps/3/channels")]
    with pytest.raises(ApiError) as excinfo:
        verify_signature(APP, "GET", "/apps/3/channels", params, b"", TS)
    assert error_of(excinfo) == (401, "Unsupported auth_version '2.0'; only 1.0 is accepted.")


def test_timestamp_not_a_number() -> None:
    params = [(k, "yesterday" if k == "auth_timestamp" else v)
              for k, v in signed_params("GET", "/apps/3/channels")]
    with pytest.raises(ApiError) as excinfo:
        verify_signature(APP, "GET", "/apps/3/channels", params, b"", TS)
    status, message = error_of(excinfo)
    assert status == 401 and "not a whole number of seconds" in message


@pytest.mark.parametrize("skew", [-600, 0, 600])
def test_timestamp_inside_window(skew: int) -> None:
    params = signed_params("GET", "/apps/3/channels", ts=TS + skew)
    verify_signature(APP, "GET", "/apps/3/channels", params, b"", TS)


@pytest.mark.parametrize("skew", [-601, 601, -100_000])
def test_timestamp_outside_window(skew: int) -> None:
    params = signed_params("GET", "/apps/3/channels", ts=TS + skew)
    with pytest.raises(ApiError) as excinfo:
        verify_signature(APP, "GET", "/apps/3/channels", params, b"", TS)
    status, message = error_of(excinfo)
    assert status == 401
    assert message.startswith("Timestamp expired: given timestamp (")
    assert "not within 600s of server time (2012-11-16T17:49:39Z)" in message


@pytest.mark.parametrize("ts", [10**14, 10**20, -(10**20), 10**400])
def test_timestamp_far_outside_any_clock_is_401_not_a_crash(ts: int) -> None:
    # Such timestamps used to overflow float arithmetic or gmtime, turning an
    # unauthenticated request into a 500 with a logged traceback.
    params = signed_params("GET", "/apps/3/channels", ts=ts)
    with pytest.raises(ApiError) as excinfo:
        verify_signature(APP, "GET", "/apps/3/channels", params, b"", TS)
    status, message = error_of(excinfo)
    assert status == 401 and message.startswith("Timestamp expired: given timestamp (")
    assert "of server time (2012-11-16T17:49:39Z)" in message


def test_body_requires_body_md5() -> None:
    params = signed_params("POST", "/apps/3/events", SPEC_BODY, md5=False)
    with pytest.raises(ApiError) as excinfo:
        verify_signature(APP, "POST", "/apps/3/events", params, SPEC_BODY, TS)
    assert error_of(excinfo) == (401, "Missing body_md5 query parameter for a request with a body.")


def test_body_md5_must_match_body() -> None:
    params = signed_params("POST", "/apps/3/events", SPEC_BODY)
    with pytest.raises(ApiError) as excinfo:
        verify_signature(APP, "POST", "/apps/3/events", params, SPEC_BODY + b" ", TS)
    status, message = error_of(excinfo)
    assert status == 401 and "does not match the MD5 of the request body" in message


def test_empty_body_with_wrong_md5_rejected() -> None:
    params = signed_params("POST", "/apps/3/events", b"x", md5=True)  # md5 of b"x"
    with pytest.raises(ApiError) as excinfo:
        verify_signature(APP, "POST", "/apps/3/events", params, b"", TS)
    assert excinfo.value.status == 401


def test_duplicate_auth_parameter_rejected() -> None:
    params = signed_params("GET", "/apps/3/channels")
    params.append(("auth_timestamp", str(TS)))
    with pytest.raises(ApiError) as excinfo:
        verify_signature(APP, "GET", "/apps/3/channels", params, b"", TS)
    assert error_of(excinfo) == (401, "The auth_timestamp query parameter is given more than once.")


def test_query_values_are_signed_decoded() -> None:
    # pusher-http-php lets Guzzle encode ',' as %2C; the signature is over the decoded value.
    params = signed_params("GET", "/apps/3/channels",
                           extra={"info": "user_count,subscription_count",
                                  "filter_by_prefix": "presence-"})
    raw = "&".join(f"{k}={v}" for k, v in params).replace(",", "%2C")
    verify_signature(APP, "GET", "/apps/3/channels", parse_query(raw), b"", TS)


def test_raw_path_is_signed_as_received() -> None:
    path = "/apps/3/channels/presence-a%40b"
    verify_signature(APP, "GET", path, signed_params("GET", path), b"", TS)


def test_decoded_path_signature_is_tolerated() -> None:
    # A client that signs the path before its HTTP library escapes it.
    params = signed_params("GET", "/apps/3/channels/presence-a@b")
    verify_signature(APP, "GET", "/apps/3/channels/presence-a%40b", params, b"", TS)


# --- app resolution -----------------------------------------------------------------------


def test_app_by_key_or_id() -> None:
    assert app_for_segment(SETTINGS, KEY) is APP
    assert app_for_segment(SETTINGS, "3") is APP
    assert app_for_segment(SETTINGS, "other-key") is OTHER
    assert app_for_segment(SETTINGS, "%37%37") is OTHER  # percent-decoded "77"


def test_unknown_app_is_404() -> None:
    with pytest.raises(ApiError) as excinfo:
        app_for_segment(SETTINGS, "nope")
    assert error_of(excinfo) == (404, "Unknown app 'nope': no app has this key or id.")


def test_app_by_auth_key() -> None:
    assert app_for_auth_key(SETTINGS, [("auth_key", "other-key")]) is OTHER
    with pytest.raises(ApiError) as excinfo:
        app_for_auth_key(SETTINGS, [("auth_key", "3")])  # an id is not a key
    assert error_of(excinfo) == (404, "Unknown app key '3'.")
    with pytest.raises(ApiError) as excinfo:
        app_for_auth_key(SETTINGS, [])
    assert excinfo.value.status == 401


def test_decode_segment() -> None:
    assert decode_segment("presence-a%40b%3Bc") == "presence-a@b;c"
    assert decode_segment("%23server-to-user-1") == "#server-to-user-1"


# --- JSON bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "The request body is empty; expected a JSON object."),
        (b"[1]", "The request body must be a JSON object, not an array."),
        (b'"x"', "The request body must be a JSON object, not a string."),
        (b"null", "The request body must be a JSON object, not null."),
    ],
)
def test_load_json_object_refusals(body: bytes, message: str) -> None:
    with pytest.raises(ApiError) as excinfo:
        load_json_object(body)
    assert error_of(excinfo) == (400, message)


def test_load_json_object_malformed() -> None:
    with pytest.raises(ApiError) as excinfo:
        load_json_object(b'{"name": ')
    status, message = error_of(excinfo)
    assert status == 400 and message.startswith("The request body is not valid JSON")


# --- events ----------------------------------------------------------------------------------


def event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "my-event", "channel": "my-channel", "data": "{}"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def refused(raw: object, app: App = APP, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(ApiError) as excinfo:
        parse_event(app, raw, **kwargs)
    return error_of(excinfo)


def test_event_minimal() -> None:
    parsed = parse_event(APP, event())
    assert parsed.name == "my-event"
    assert parsed.channels == ("my-channel",)
    assert parsed.data == "{}"
    assert parsed.socket_id == ""
    assert parsed.info == frozenset()


def test_event_channels_preferred_and_deduplicated() -> None:
    parsed = parse_event(APP, event(channels=["b", "a", "b"], channel="ignored"))
    assert parsed.channels == ("b", "a")


def test_event_not_an_object() -> None:
    assert refused(["x"]) == (400, "Each event must be a JSON object, not an array.")


@pytest.mark.parametrize("name", [..., "", 5, None])
def test_event_name_missing_or_wrong(name: object) -> None:
    status, message = refused(event(name=name))
    assert status == 400 and "'name'" in message


def test_event_name_length_limit() -> None:
    parse_event(APP, event(name="e" * 200))
    assert refused(event(name="e" * 201)) == (
        400, "Event name is too long (201 characters). Maximum allowed size is 200.")
    short = App(id="9", key="k9", secret="s", max_event_name_length=5)
    assert refused(event(name="abcdef"), short)[0] == 400


def test_event_name_characters_not_validated() -> None:
    # Laravel event names carry dots and backslashes.
    assert parse_event(APP, event(name="App\\Events\\OrderShipped")).name.startswith("App")


def test_event_needs_a_channel() -> None:
    assert refused(event(channel=...)) == (
        400, "Missing 'channel' or 'channels': say where to send the event.")


@pytest.mark.parametrize(
    ("channels", "message"),
    [
        ("one", "'channels' must be an array of channel names."),
        ([], "'channels' is empty; give at least one channel."),
        ([1], "Channel names must be strings."),
    ],
)
def test_event_channels_shape(channels: object, message: str) -> None:
    assert refused(event(channels=channels)) == (400, message)


def test_event_channel_count_limit() -> None:
    parse_event(APP, event(channels=[f"c{i}" for i in range(100)]))
    assert refused(event(channels=[f"c{i}" for i in range(101)])) == (
        400, "Cannot broadcast to more than 100 channels at once (101 given).")


@pytest.mark.parametrize("channel", ["has space", "colon:no", "#other", "", "é"])
def test_event_invalid_channel_name(channel: str) -> None:
    status, message = refused(event(channel=channel))
    assert status == 400 and "channel name" in message


def test_event_channel_name_too_long() -> None:
    parse_event(APP, event(channel="c" * 200))
    status, message = refused(event(channel="c" * 201))
    assert status == 400 and "longer than the allowed 200" in message


def test_event_server_to_user_channel_allowed() -> None:
    parsed = parse_event(APP, event(channels=["#server-to-user-42", "#server-to-user-a@b"]))
    assert parsed.channels == ("#server-to-user-42", "#server-to-user-a@b")
    assert refused(event(channel="#server-to-user-"))[0] == 400


def test_event_encrypted_channel_only_alone() -> None:
    parse_event(APP, event(channel="private-encrypted-x"))
    parse_event(APP, event(channels=["private-encrypted-x"]))
    status, message = refused(event(channels=["private-encrypted-x", "public"]))
    assert status == 400 and "must be triggered alone" in message
    assert refused(event(channels=["a", "private-encrypted-cache-x"]))[0] == 400


@pytest.mark.parametrize("data", [..., {"a": 1}, 5, None, ["x"]])
def test_event_data_must_be_a_string(data: object) -> None:
    status, message = refused(event(data=data))
    assert status == 400 and ("string" in message or "missing" in message)


def test_event_data_limit_counts_utf8_bytes() -> None:
    parse_event(APP, event(data="x" * 10240))
    parse_event(APP, event(data="é" * 5120))  # 10240 bytes
    assert refused(event(data="x" * 10241)) == (
        413, "The event data is too large: 10241 bytes of UTF-8, the limit is 10240 bytes "
             "(10 KB).")
    status, message = refused(event(data="é" * 5121))  # 5121 chars, 10242 bytes
    assert status == 413 and "10242 bytes" in message


def test_event_data_limit_follows_app_setting() -> None:
    big = App(id="9", key="k9", secret="s", max_event_payload_kb=100)
    parse_event(big, event(data="x" * 100 * 1024))
    assert refused(event(data="x" * (100 * 1024 + 1)), big)[0] == 413


@pytest.mark.parametrize("socket_id", ["123.456", "1.2"])
def test_event_socket_id_valid(socket_id: str) -> None:
    assert parse_event(APP, event(socket_id=socket_id)).socket_id == socket_id


def test_event_socket_id_null_means_absent() -> None:
    assert parse_event(APP, event(socket_id=None)).socket_id == ""


@pytest.mark.parametrize("socket_id", ["", "123", "1.2.3", "a.b", " 1.2", "1.2\n", 1.2,
                                       "\u0661.\u0662"])  # Arabic-Indic digits
def test_event_socket_id_invalid(socket_id: object) -> None:
    status, message = refused(event(socket_id=socket_id))
    assert status == 400 and message.startswith("Invalid socket_id")


def test_event_info() -> None:
    parsed = parse_event(APP, event(info="user_count, subscription_count,"))
    assert parsed.info == frozenset({"user_count", "subscription_count"})
    assert refused(event(info="occupied")) == (
        400, "Unknown info attribute 'occupied'; allowed here: subscription_count, user_count.")
    assert refused(event(info=["user_count"]))[0] == 400


def test_event_fixed_channel() -> None:
    parsed = parse_event(APP, {"name": "e", "data": "d"}, fixed_channel="#server-to-user-1")
    assert parsed.channels == ("#server-to-user-1",)
    status, _ = refused({"name": "e", "data": "d", "channel": "x"},
                        fixed_channel="#server-to-user-1")
    assert status == 400


# --- batches ---------------------------------------------------------------------------------


def test_batch_ok() -> None:
    events = parse_batch(APP, {"batch": [event(), event(channels=["x"], info="user_count")]})
    assert [e.channels for e in events] == [("my-channel",), ("x",)]
    assert events[1].info == frozenset({"user_count"})


def test_batch_empty_is_fine() -> None:
    assert parse_batch(APP, {"batch": []}) == []


def test_batch_must_be_a_list() -> None:
    with pytest.raises(ApiError) as excinfo:
        parse_batch(APP, {"batch": {}})
    assert error_of(excinfo) == (400, "'batch' must be an array of events.")
    with pytest.raises(ApiError):
        parse_batch(APP, {})


def test_batch_size_limit() -> None:
    parse_batch(APP, {"batch": [event()] * 10})
    with pytest.raises(ApiError) as excinfo:
        parse_batch(APP, {"batch": [event()] * 11})
    assert error_of(excinfo) == (400, "Cannot batch-send more than 10 events at once (11 given).")


def test_batch_item_errors_name_the_item() -> None:
    with pytest.raises(ApiError) as excinfo:
        parse_batch(APP, {"batch": [event(), event(data="x" * 20000)]})
    status, message = error_of(excinfo)
    assert status == 413 and message.startswith("batch[1]: The event data is too large")
    with pytest.raises(ApiError) as excinfo:
        parse_batch(APP, {"batch": [event(channel="bad name")]})
    assert excinfo.value.message.startswith("batch[0]: ")


def test_batch_item_single_channel() -> None:
    with pytest.raises(ApiError) as excinfo:
        parse_batch(APP, {"batch": [event(channels=["a", "b"])]})
    assert error_of(excinfo) == (400, "batch[0]: a batch item takes exactly one channel.")


# --- info rules ------------------------------------------------------------------------------


def test_parse_info() -> None:
    assert parse_info(None, CHANNELS_INFO) == frozenset()
    assert parse_info("", CHANNELS_INFO) == frozenset()
    assert parse_info("cache,user_count", CHANNEL_INFO) == {"cache", "user_count"}
    with pytest.raises(ApiError) as excinfo:
        parse_info("cache", TRIGGER_INFO)
    assert excinfo.value.status == 400


def test_channels_user_count_needs_presence_prefix() -> None:
    check_channels_info(frozenset({"user_count"}), "presence-")
    check_channels_info(frozenset({"user_count"}), "presence-cache-room")
    check_channels_info(frozenset({"subscription_count"}), "")
    for prefix in ("", "private-", "pres"):
        with pytest.raises(ApiError) as excinfo:
            check_channels_info(frozenset({"user_count"}), prefix)
        status, message = error_of(excinfo)
        assert status == 400 and "filter_by_prefix=presence-" in message


def test_channel_info_attribute_per_kind() -> None:
    check_channel_info(frozenset({"user_count", "subscription_count"}), "presence-x")
    check_channel_info(frozenset({"cache"}), "private-encrypted-cache-x")
    check_channel_info(frozenset({"cache", "user_count"}), "presence-cache-x")
    check_channel_info(frozenset({"subscription_count"}), "anything")
    with pytest.raises(ApiError) as excinfo:
        check_channel_info(frozenset({"user_count"}), "private-x")
    assert excinfo.value.status == 400 and "presence" in excinfo.value.message
    with pytest.raises(ApiError) as excinfo:
        check_channel_info(frozenset({"cache"}), "my-cache-room")  # prefix, not substring
    assert excinfo.value.status == 400 and "cache channels" in excinfo.value.message


def test_check_channel_name_internal() -> None:
    check_channel_name(APP, "#server-to-user-1", internal_ok=True)
    with pytest.raises(ApiError) as excinfo:
        check_channel_name(APP, "#server-to-user-1")
    assert excinfo.value.status == 400


def test_check_user_id() -> None:
    assert check_user_id(APP, "user-1") == "#server-to-user-user-1"
    for bad in ("", "has space", "u" * 200):
        with pytest.raises(ApiError) as excinfo:
            check_user_id(APP, bad)
        assert excinfo.value.status == 400


# --- token bucket ---------------------------------------------------------------------------


def test_token_bucket_spends_and_refills() -> None:
    bucket = TokenBucket.full(10.0, now=100.0)
    assert bucket.take(6, 100.0) == 0.0
    assert bucket.take(4, 100.0) == 0.0
    wait = bucket.take(1, 100.0)
    assert wait == pytest.approx(0.1)
    assert bucket.take(1, 100.1) == 0.0  # refilled one token in 0.1 s
    assert bucket.take(5, 101.0) == 0.0
    assert bucket.take(5, 101.0) == pytest.approx(0.1)


def test_token_bucket_never_holds_more_than_rate() -> None:
    bucket = TokenBucket.full(2.0, now=0.0)
    assert bucket.take(2, 1000.0) == 0.0
    assert bucket.take(1, 1000.0) > 0


def test_token_bucket_oversized_request_goes_into_debt() -> None:
    bucket = TokenBucket.full(5.0, now=0.0)
    assert bucket.take(20, 0.0) == 0.0  # allowed once with a full bucket
    assert bucket.take(1, 0.0) == pytest.approx(3.2)  # 15 in debt + 1 needed, 5 per s


def test_token_bucket_clock_going_back() -> None:
    bucket = TokenBucket.full(1.0, now=10.0)
    assert bucket.take(1, 10.0) == 0.0
    # time going backwards refills nothing (and takes nothing away): one token short, at
    # one token per second
    assert bucket.take(1, 5.0) == pytest.approx(1.0)
    assert bucket.tokens == pytest.approx(0.0)


def test_retry_after_seconds() -> None:
    assert retry_after_seconds(0.01) == 1
    assert retry_after_seconds(1.0) == 1
    assert retry_after_seconds(2.5) == 3


def test_api_error_carries_status_and_message() -> None:
    exc = ApiError(429, "slow down", retry_after=2)
    assert (exc.status, exc.message, exc.retry_after) == (429, "slow down", 2)
    assert str(exc) == "429: slow down"
    assert exc.args == (429, "slow down")
    assert ApiError(400, "bad").retry_after is None
