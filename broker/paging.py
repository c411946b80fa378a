"""Page sizes and page tokens for the list RPCs (ListKeys, GetUsage), Google AIP-158 style.

A page token is opaque to callers: the URL-safe base64 of a small JSON document holding the
last row's sort key and a digest over that position and the request's filters. The next
page starts after that position (keyset paging), so rows added or removed between two
calls neither repeat nor skip the rows that stayed. A token presented with other filters,
to another RPC, altered or made up is INVALID_ARGUMENT. Tokens are not secret and not
signed with a broker secret (every replica and worker must accept every other's): a caller
who forges one only chooses where its listing starts, and access control applies to every
page anyway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import InvalidArgument

__all__ = ["MAX_TOKEN_CHARS", "Page", "decode_token", "encode_token", "page_size"]

T = TypeVar("T")

MAX_TOKEN_CHARS = 8192
"""Longest page_token accepted; this broker's tokens are far shorter."""
_VERSION = 1


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing and the token of the next (empty on the last page)."""

    items: list[T]
    next_page_token: str = ""


def page_size(requested: int, *, default: int, maximum: int) -> int:
    """The page size to serve: ``default`` for 0, at most ``maximum``; negative is refused."""
    if requested < 0:
        raise InvalidArgument("page_size", f"must be 0 (the default, {default}) or more; "
                                           f"at most {maximum} are returned")
    return min(requested or default, maximum)


def _digest(scope: Sequence[object], after: Sequence[str]) -> str:
    blob = json.dumps([_VERSION, list(scope), list(after)], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def encode_token(scope: Sequence[object], after: Sequence[str]) -> str:
    """The token of the page after the row whose sort key is ``after``, for requests with
    these filters (``scope``: the RPC name and every filter field)."""
    doc = {"v": _VERSION, "after": list(after), "d": _digest(scope, after)}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, scope: Sequence[object], width: int) -> tuple[str, ...] | None:
    """The sort key a token continues after (None for no token, the first page).

    Raises InvalidArgument (field ``page_token``) for anything but a token this broker
    issued for the same RPC and filters, with a sort key of ``width`` strings.
    """
    if not token:
        return None
    bad = InvalidArgument("page_token", "is not a next_page_token of this request: pass back "
                                        "the token unchanged, with the same filters")
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):  # RecursionError: deep nesting
        raise bad from None
    # Only the canonical encoding of what encode_token wrote: no second spelling of a token.
    if base64.urlsafe_b64encode(raw).decode().rstrip("=") != token:
        raise bad
    if not isinstance(doc, dict) or set(doc) != {"v", "after", "d"} or doc["v"] != _VERSION:
        raise bad
    after = doc["after"]
    if (not isinstance(after, list) or len(after) != width
            or not all(isinstance(v, str) for v in after)):
        raise bad
    if not isinstance(doc["d"], str) or doc["d"] != _digest(scope, after):
        raise bad
    return tuple(after)
