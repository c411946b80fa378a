"""Input rules shared by every entry point. Each failure names its field."""

from __future__ import annotations

import re

from .errors import InvalidArgument

__all__ = ["check_key_id", "check_lease_id", "check_name", "check_request_id", "check_text"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LEASE_ID = re.compile(r"ls_[0-9a-f]{32}")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def check_name(field: str, value: str, *, required: bool = True) -> str:
    """A pool, key or account name: 1-64 of [A-Za-z0-9._-], not starting with a symbol."""
    if not value:
        if required:
            raise InvalidArgument(field, "is required")
        return value
    if not _NAME.fullmatch(value):
        raise InvalidArgument(field, "must be 1-64 characters of [A-Za-z0-9._-]")
    return value


def check_key_id(value: str) -> tuple[str, str]:
    """A key id ``<pool>/<name>``; returns (pool, name)."""
    pool, sep, name = value.partition("/")
    if not sep:
        raise InvalidArgument("key_id", "must be <pool>/<name>")
    return check_name("key_id", pool), check_name("key_id", name)


def check_lease_id(value: str) -> str:
    if not value:
        raise InvalidArgument("lease_id", "is required")
    if not _LEASE_ID.fullmatch(value):
        raise InvalidArgument("lease_id", "is not a lease id")
    return value


def check_request_id(value: str) -> str:
    if value and not _REQUEST_ID.fullmatch(value):
        raise InvalidArgument("request_id", "must be at most 128 printable ASCII characters")
    return value


def check_text(field: str, value: str, max_len: int) -> str:
    if len(value) > max_len:
        raise InvalidArgument(field, f"must be at most {max_len} characters")
    if any(ord(c) < 0x20 for c in value):
        raise InvalidArgument(field, "must not contain control characters")
    return value
