"""Standard Webhooks signing (gateway.signing) and verification (gateway.verify). Pure, no I/O."""

from __future__ import annotations

import base64

import pytest

from gateway.errors import InvalidSecret
from gateway.signing import new_secret, secret_key, sign, signature_header
from gateway.verify import TOLERANCE_SECONDS, WebhookVerificationError, verify

# The test vector of the Standard Webhooks specification.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

OTHER_SECRET = "whsec_" + base64.b64encode(b"another key, 32 bytes long......").decode()


def headers(
    signature: str = SIGNATURE, *, msg_id: str = MSG_ID, timestamp: object = TIMESTAMP
) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


# --- signing -------------------------------------------------------------------------------


def test_sign_matches_the_standard_webhooks_vector() -> None:
    assert sign(secret_key(SECRET), MSG_ID, TIMESTAMP, BODY) == SIGNATURE


def test_secret_key_is_the_base64_decoded_part() -> None:
    assert secret_key(SECRET) == base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")


def test_signature_header_with_one_key_is_the_single_signature() -> None:
    assert signature_header((secret_key(SECRET),), MSG_ID, TIMESTAMP, BODY) == SIGNATURE


def test_signature_header_with_two_keys_holds_both_space_separated() -> None:
    keys = (secret_key(SECRET), secret_key(OTHER_SECRET))
    header = signature_header(keys, MSG_ID, TIMESTAMP, BODY)
    parts = header.split(" ")
    assert len(parts) == 2
    assert parts[0] == SIGNATURE
    assert parts[1] == sign(keys[1], MSG_ID, TIMESTAMP, BODY)
    assert parts[0] != parts[1]
    # A receiver holding either secret accepts the rotated header.
    verify(SECRET, headers(header), BODY, now=TIMESTAMP)
    verify(OTHER_SECRET, headers(header), BODY, now=TIMESTAMP)


def test_new_secret_is_whsec_and_32_random_bytes() -> None:
    secrets = {new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert secret.startswith("whsec_")
        raw = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        assert len(raw) == 32
        assert secret_key(secret) == raw


@pytest.mark.parametrize(
    "bad",
    [
        "whsec_not base64!!",
        "whsec_@@@@@@@@@@@@@@@@@@@@@@@@",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS",  # bad padding / length
        "whsec_" + base64.b64encode(b"fifteen bytes!!").decode(),  # 15 bytes: too short
        "whsec_" + base64.b64encode(b"x" * 8).decode(),
        "whsec_",
    ],
)
def test_secret_key_rejects_bad_secrets_without_showing_them(bad: str) -> None:
    with pytest.raises(InvalidSecret) as info:
        secret_key(bad)
    message = str(info.value)
    assert message
    encoded = bad.removeprefix("whsec_")
    assert bad not in message
    if encoded:
        assert encoded not in message


def test_secret_key_accepts_16_bytes() -> None:
    assert len(secret_key("whsec_" + base64.b64encode(b"k" * 16).decode())) == 16


def test_invalid_secret_is_a_value_error() -> None:
    assert issubclass(InvalidSecret, ValueError)


# --- verification --------------------------------------------------------------------------


def test_verify_accepts_the_vector() -> None:
    verify(SECRET, headers(), BODY, now=TIMESTAMP)


def test_verify_accepts_a_str_body_and_any_header_case() -> None:
    mixed = {
        "Webhook-Id": MSG_ID,
        "WEBHOOK-TIMESTAMP": str(TIMESTAMP),
        "Webhook-Signature": SIGNATURE,
    }
    verify(SECRET, mixed, BODY.decode(), now=TIMESTAMP)


def test_verify_accepts_within_tolerance() -> None:
    verify(SECRET, headers(), BODY, now=TIMESTAMP + TOLERANCE_SECONDS - 1)
    verify(SECRET, headers(), BODY, now=TIMESTAMP - TOLERANCE_SECONDS + 1)


def test_verify_rejects_a_tampered_body() -> None:
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(SECRET, headers(), b'{"test": 2432232315}', now=TIMESTAMP)


def test_verify_rejects_a_tampered_id() -> None:
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(SECRET, headers(msg_id="msg_other"), BODY, now=TIMESTAMP)


def test_verify_rejects_a_wrong_secret() -> None:
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(OTHER_SECRET, headers(), BODY, now=TIMESTAMP)


def test_verify_rejects_a_stale_timestamp() -> None:
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, headers(), BODY, now=TIMESTAMP + TOLERANCE_SECONDS + 1)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, headers(), BODY, now=TIMESTAMP + 3600)


def test_verify_rejects_a_future_timestamp() -> None:
    with pytest.raises(WebhookVerificationError, match="too new"):
        verify(SECRET, headers(), BODY, now=TIMESTAMP - TOLERANCE_SECONDS - 1)


def test_verify_rejects_a_stale_timestamp_even_when_correctly_signed() -> None:
    old = TIMESTAMP - 10 * 60
    signature = sign(secret_key(SECRET), MSG_ID, old, BODY)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, headers(signature, timestamp=old), BODY, now=TIMESTAMP)


def test_verify_uses_the_clock_when_now_is_not_given() -> None:
    # The vector is from 2021: far outside the tolerance of the real clock.
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, headers(), BODY)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_rejects_missing_headers(missing: str) -> None:
    partial = headers()
    del partial[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(SECRET, partial, BODY, now=TIMESTAMP)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_rejects_empty_headers(missing: str) -> None:
    partial = headers()
    partial[missing] = ""
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(SECRET, partial, BODY, now=TIMESTAMP)


def test_verify_rejects_no_headers_at_all() -> None:
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(SECRET, {}, BODY, now=TIMESTAMP)


@pytest.mark.parametrize("stamp", ["1614265330.5", "abc", "2021-02-25T15:02:10Z", "0x603"])
def test_verify_rejects_a_non_integer_timestamp(stamp: str) -> None:
    with pytest.raises(WebhookVerificationError, match="not a Unix time"):
        verify(SECRET, headers(timestamp=stamp), BODY, now=TIMESTAMP)


@pytest.mark.parametrize(
    "header",
    [
        f"v1,bm90IHRoZSBzaWduYXR1cmU= {SIGNATURE}",
        f"{SIGNATURE} v1,bm90IHRoZSBzaWduYXR1cmU=",
        f"v1,aaaa v1,bbbb {SIGNATURE} v1,cccc",
        f"v2,whatever {SIGNATURE}",
        f"{SIGNATURE} v2,{SIGNATURE.removeprefix('v1,')}",
    ],
)
def test_verify_accepts_when_any_signature_matches(header: str) -> None:
    verify(SECRET, headers(header), BODY, now=TIMESTAMP)


@pytest.mark.parametrize(
    "header",
    [
        "v1,bm90IHRoZSBzaWduYXR1cmU= v1,b3RoZXI=",
        # The right digest under another version is not a v1 signature.
        f"v2,{SIGNATURE.removeprefix('v1,')}",
        SIGNATURE.removeprefix("v1,"),
        "v1,",
    ],
)
def test_verify_rejects_when_no_v1_signature_matches(header: str) -> None:
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify(SECRET, headers(header), BODY, now=TIMESTAMP)


def test_verify_reports_a_bad_secret_as_a_verification_error_without_the_secret() -> None:
    bad = "whsec_###notbase64###"
    with pytest.raises(WebhookVerificationError) as info:
        verify(bad, headers(), BODY, now=TIMESTAMP)
    assert "###notbase64###" not in str(info.value)


def test_verification_error_is_a_value_error() -> None:
    assert issubclass(WebhookVerificationError, ValueError)
