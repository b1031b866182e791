"""TokenSigner: what it seals opens again, and every token it cannot use says why.

A token is base64url(JSON body + 16-byte HMAC tag); the body names its kind and deployment.
Each refusal is a TokenError whose text the service passes on as INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.tokens import TAG_BYTES, TokenError, TokenSigner

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
DEPLOYMENT = "3f1c2b9e-0000-4000-8000-000000000001"
OTHER_DEPLOYMENT = "9a8b7c6d-0000-4000-8000-000000000002"

GARBLED = "is garbled"
ALTERED = "was altered or forged"


def signer(key: bytes = KEY, deployment: str = DEPLOYMENT) -> TokenSigner:
    return TokenSigner(key, deployment)


def raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(body: bytes, key: bytes = KEY) -> str:
    """A token of exactly `body`, tagged as TokenSigner tags it."""
    return encode(body + hmac.new(key, body, hashlib.sha256).digest()[:TAG_BYTES])


def refusal(token: str, kind: str = "page", by: TokenSigner | None = None) -> str:
    with pytest.raises(TokenError) as caught:
        (by or signer()).open(kind, token)
    return str(caught.value)


# --- what opens -------------------------------------------------------------------------------


def test_what_is_sealed_opens_to_the_same_payload() -> None:
    payload = {"request": {"order_by": "url", "is_active": None}, "key": ["https://x.test/1"]}
    token = signer().seal("page", payload)

    assert signer().open("page", token) == payload
    # Another signer with the same key and deployment (another gateway) opens it too.
    assert TokenSigner(KEY, DEPLOYMENT).open("page", token) == payload


def test_a_token_is_url_safe_text_without_padding() -> None:
    token = signer().seal("cursor", {"revision": 12, "id": 345, "text": "?&/+=" * 10})

    assert token.isascii()
    assert not set(token) & set("+/= \n")


# --- garbled ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("", id="empty"),
        pytest.param("!!!not*base64!!!", id="not-base64-alphabet"),
        pytest.param("abcde", id="impossible-length"),
        pytest.param("ünïcödé", id="not-ascii"),
        pytest.param(encode(b"this is not json" + b"\0" * TAG_BYTES), id="not-json"),
        pytest.param(encode(b"\xff\xfe\x00garbage" * 3), id="binary"),
        pytest.param(signed(b'["k", "d", "p"]'), id="json-not-an-object"),
        pytest.param(signed(b'"a string"'), id="json-a-string"),
        pytest.param(signed(b'{"k": "page", "d": "x"}'), id="json-missing-payload"),
    ],
)
def test_a_garbled_token_is_refused_as_garbled(token: str) -> None:
    assert GARBLED in refusal(token)


@pytest.mark.parametrize("cut", [1, 2, 5, TAG_BYTES, TAG_BYTES + 3])
def test_a_truncated_token_is_refused_as_garbled(cut: int) -> None:
    token = signer().seal("page", {"key": ["2026-01-01T00:00:00+00:00", 7]})

    assert GARBLED in refusal(token[:-cut])


def test_a_token_cut_at_the_front_is_refused_as_garbled() -> None:
    token = signer().seal("page", {"key": [1]})
    # Four characters are three whole bytes: what is left still decodes, to a body without "{".
    assert GARBLED in refusal(token[4:])


# --- another kind, another deployment ---------------------------------------------------------


def test_a_token_of_another_kind_is_refused_by_name() -> None:
    cursor = signer().seal("cursor", {"revision": 1, "id": 2})

    assert refusal(cursor, kind="page") == "is not a page"
    assert refusal(signer().seal("page", {}), kind="cursor") == "is not a cursor"


def test_a_payload_that_is_not_an_object_is_not_a_token_of_the_kind() -> None:
    body = json.dumps({"k": "page", "d": DEPLOYMENT, "p": [1, 2]}, separators=(",", ":"))

    assert refusal(signed(body.encode())) == "is not a page"


@pytest.mark.parametrize("key", [KEY, OTHER_KEY], ids=["same-key", "other-key"])
def test_a_token_from_another_deployment_says_so_and_names_both(key: bytes) -> None:
    theirs = signer(key, OTHER_DEPLOYMENT).seal("cursor", {"revision": 1, "id": 2})

    message = refusal(theirs, kind="cursor")

    assert "another deployment" in message
    assert OTHER_DEPLOYMENT in message
    assert DEPLOYMENT in message
    assert message.index(OTHER_DEPLOYMENT) < message.index(DEPLOYMENT)


# --- altered or forged ------------------------------------------------------------------------


def test_a_payload_with_one_byte_changed_is_refused_as_altered() -> None:
    token = signer().seal("cursor", {"revision": 12345, "id": 6})
    data = raw(token)
    assert data.count(b"12345") == 1

    altered = encode(data.replace(b"12345", b"12346"))  # still valid JSON, the same kind

    assert refusal(altered, kind="cursor") == (
        "was altered or forged: pass it back exactly as the service gave it"
    )


@pytest.mark.parametrize("position", [0, TAG_BYTES // 2, TAG_BYTES - 1])
def test_a_tag_with_one_bit_flipped_is_refused_as_altered(position: int) -> None:
    data = bytearray(raw(signer().seal("page", {"key": [1]})))
    data[-TAG_BYTES + position] ^= 0x01

    assert ALTERED in refusal(encode(bytes(data)))


def test_a_payload_sealed_again_with_another_key_is_refused_as_altered() -> None:
    """The same body, re-encoded and tagged by someone without this deployment's key."""
    forged = signer(OTHER_KEY).seal("page", {"request": {"order_by": "url"}, "key": ["z"]})
    honest = signer().seal("page", {"request": {"order_by": "url"}, "key": ["z"]})

    assert raw(forged)[:-TAG_BYTES] == raw(honest)[:-TAG_BYTES]
    assert ALTERED in refusal(forged)


def test_a_body_rewritten_without_the_key_is_refused_as_altered() -> None:
    token = signer().seal("page", {"key": ["a"]})
    body, tag = raw(token)[:-TAG_BYTES], raw(token)[-TAG_BYTES:]
    sealed = json.loads(body)
    sealed["p"]["key"] = ["b"]

    assert ALTERED in refusal(encode(json.dumps(sealed).encode() + tag))


# --- any payload ------------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)
PAYLOADS = st.dictionaries(st.text(), JSON_VALUES, max_size=6)


@given(
    payload=PAYLOADS,
    kind=st.text(min_size=1, max_size=20),
    deployment=st.text(max_size=40),
    key=st.binary(min_size=1, max_size=64),
)
def test_any_json_payload_round_trips(
    payload: dict[str, Any], kind: str, deployment: str, key: bytes
) -> None:
    token = TokenSigner(key, deployment).seal(kind, payload)

    assert token.isascii()
    assert TokenSigner(key, deployment).open(kind, token) == payload
