"""AIP-158 pagination, as every List call of the gateway does it: sizes and bound page tokens.

A page token carries the request it was made for (its filters, its order) and the key of the
last row of its page, sealed by `gateway.tokens`. Sent back with another request, it is
refused naming the field that differs; garbled, altered or foreign, it is refused saying so.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidArgument
from gateway.tokens import TokenError, TokenSigner

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
GARBLED = "is garbled: pass it back as given"


def page_size(requested: int) -> int:
    """0 is the default size, above the maximum is the maximum, negative is refused."""
    if requested < 0:
        raise InvalidArgument("page_size", f"must not be negative; got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def seal_page_token(signer: TokenSigner, kind: str, request: dict[str, Any], key: list[Any]) -> str:
    """The token of the page after the row whose (JSON-able) key is `key`."""
    return signer.seal(kind, {"request": request, "key": key})


def open_page_token(
    signer: TokenSigner, kind: str, token: str, request: dict[str, Any]
) -> list[Any]:
    """The key a page token continues after, if it was made for `request`."""
    try:
        payload = signer.open(kind, token)
        made_for, key = payload["request"], payload["key"]
    except TokenError as exc:
        raise InvalidArgument("page_token", str(exc)) from exc
    except KeyError as exc:
        raise InvalidArgument("page_token", GARBLED) from exc
    if not isinstance(made_for, dict) or not isinstance(key, list):
        raise InvalidArgument("page_token", GARBLED)
    for field, value in request.items():
        if made_for.get(field) != value:
            raise InvalidArgument(
                "page_token",
                f"was made for {field} {made_for.get(field)!r}, not {value!r}: send the same "
                "filters and order_by as the first page, or no token",
            )
    return key
