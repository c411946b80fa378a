"""``keybroker keys import FILE``: many keys in one run (TOML, JSON or CSV).

A file lists keys without their secrets; each secret comes from an environment variable
named in the row (``secret_env``) or from stdin, as lines ``POOL/NAME SECRET``. A
``secret`` field in the file is refused: secrets never sit in files or argv. Every row
is checked and every secret resolved before the first write, so a bad file writes
nothing.

TOML::

    [[keys]]
    pool = "free"
    name = "k1"
    account = "acct-a"
    base_url = "https://openrouter.ai/api/v1"
    models = ["meta-llama/llama-3.3-70b-instruct:free"]
    daily_limit = 50
    secret_env = "OR_KEY_1"

JSON: a list of such objects (or ``{"keys": [...]}``). CSV: a header row with those
column names; ``models`` separated by ``;``; empty cells mean unset.
"""

from __future__ import annotations

import csv
import io
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BrokerError
from .validate import check_name

__all__ = ["KeyFileError", "KeyRow", "parse_key_file", "parse_stdin_secrets", "resolve_secrets"]

FIELDS = ("pool", "name", "account", "base_url", "models", "daily_limit", "minute_limit",
          "enabled", "secret_env")


class KeyFileError(ValueError):
    """A bad key file or missing secret: one line naming the file, the row and the field."""


@dataclass(frozen=True)
class KeyRow:
    """One key to put; ``secret`` is filled by :func:`resolve_secrets`."""

    pool: str
    name: str
    account: str = ""
    base_url: str = ""
    models: tuple[str, ...] = ()
    daily_limit: int | None = None
    minute_limit: int | None = None
    enabled: bool = True
    secret_env: str = ""
    secret: str = field(default="", repr=False)

    @property
    def key_id(self) -> str:
        return f"{self.pool}/{self.name}"


def _rows_of(path: Path, text: str) -> list[Mapping[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text).get("keys", [])
        elif suffix == ".json":
            data = json.loads(text)
            data = data.get("keys", []) if isinstance(data, dict) else data
        elif suffix == ".csv":
            data = list(csv.DictReader(io.StringIO(text)))
        else:
            raise KeyFileError(f"{path}: use a .toml, .json or .csv file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise KeyFileError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise KeyFileError(f"{path}: expected a list of keys ([[keys]] tables in TOML)")
    if not data:
        raise KeyFileError(f"{path}: no keys in the file")
    return data


def _int(where: str, name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise KeyFileError(f"{where}: {name} must be a whole number, not {value!r}") from None
    if number < 0:
        raise KeyFileError(f"{where}: {name} must not be negative")
    return number


def _bool(where: str, value: Any) -> bool:
    if value is None or value == "":
        return True
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise KeyFileError(f"{where}: enabled must be true or false, not {value!r}")


def parse_key_file(path: str | Path) -> list[KeyRow]:
    """Read and check every row of ``path``; raise KeyFileError on the first problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from None
    rows = []
    seen: set[str] = set()
    for number, raw in enumerate(_rows_of(path, text), start=1):
        where = f"{path} key {number}"
        if "secret" in raw or "api_key" in raw:
            raise KeyFileError(f"{where}: secrets never go in the file; name an environment "
                               "variable in secret_env or pipe 'POOL/NAME SECRET' lines on stdin")
        unknown = sorted(set(raw) - set(FIELDS))
        if unknown:
            raise KeyFileError(f"{where}: unknown field(s) {unknown}; known: {', '.join(FIELDS)}")
        pool, name = str(raw.get("pool") or "").strip(), str(raw.get("name") or "").strip()
        if not pool or not name:
            raise KeyFileError(f"{where}: pool and name are required")
        models = raw.get("models") or ()
        if isinstance(models, str):
            models = [m for m in models.replace(",", ";").split(";")]
        row = KeyRow(pool=pool, name=name, account=str(raw.get("account") or "").strip(),
                     base_url=str(raw.get("base_url") or "").strip(),
                     models=tuple(str(m).strip() for m in models if str(m).strip()),
                     daily_limit=_int(where, "daily_limit", raw.get("daily_limit")),
                     minute_limit=_int(where, "minute_limit", raw.get("minute_limit")),
                     enabled=_bool(where, raw.get("enabled")),
                     secret_env=str(raw.get("secret_env") or "").strip())
        try:
            check_name("pool", row.pool)
            check_name("name", row.name)
            if row.account:
                check_name("account", row.account)
        except BrokerError as exc:
            raise KeyFileError(f"{where}: {exc.message}") from None
        if row.key_id in seen:
            raise KeyFileError(f"{where}: {row.key_id} is listed twice")
        seen.add(row.key_id)
        rows.append(row)
    return rows


def parse_stdin_secrets(lines: Iterable[str]) -> dict[str, str]:
    """``POOL/NAME SECRET`` lines (blank lines and ``#`` comments skipped) -> {key_id: secret}."""
    secrets: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key_id, _, secret = line.partition(" ")
        if "/" not in key_id or not secret.strip():
            # Never echo the line: it may hold a secret.
            raise KeyFileError(f"stdin line {number}: expected 'POOL/NAME SECRET'")
        secrets[key_id] = secret.strip()
    return secrets


def resolve_secrets(rows: list[KeyRow], env: Mapping[str, str],
                    stdin_secrets: Mapping[str, str]) -> list[KeyRow]:
    """Each row with its secret (from ``secret_env``, else stdin); every missing one is named."""
    missing, done = [], []
    for row in rows:
        secret = env.get(row.secret_env, "") if row.secret_env else stdin_secrets.get(row.key_id, "")
        if not secret:
            missing.append(f"${row.secret_env}" if row.secret_env else f"{row.key_id} on stdin")
        done.append(KeyRow(**{**row.__dict__, "secret": secret}))
    if missing:
        raise KeyFileError(f"no secret for {len(missing)} key(s): {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''}; nothing was written")
    unused = sorted(set(stdin_secrets) - {r.key_id for r in rows})
    if unused:
        raise KeyFileError(f"stdin has secrets for keys not in the file: {', '.join(unused[:5])}; "
                           "nothing was written")
    return done
