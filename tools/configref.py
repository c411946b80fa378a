"""Render docs/configuration.md, the configuration reference, from broker/config.py.

broker/config.py is parsed with ``ast`` (not imported), so the reference is built
from the source text alone: each settings dataclass, each field's name, type,
default and the docstring literal that follows it, the ``_SECTIONS`` table that
names the TOML sections and their environment variables, the ``_FALLBACK_ENV``
table of conventional variables, and the ``envvar=`` options of broker/cli.py.

    python tools/configref.py            # write docs/configuration.md (``make docs``)
    python tools/configref.py --check    # exit 1 when docs/configuration.md is stale

tests/test_deploy.py fails when the committed file differs from what this renders,
so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "broker" / "config.py"
CLI = ROOT / "broker" / "cli.py"
SHELL = ROOT / "broker" / "shell.py"
OUTPUT = ROOT / "docs" / "configuration.md"

_SCALARS = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}


@dataclass(frozen=True)
class Setting:
    """One field of a settings dataclass."""

    name: str
    type: str  # as written in config.py, e.g. "int | None"
    default: Any  # the Python value; _NO_DEFAULT when the field has none
    doc: str
    env: str = ""  # KEYBROKER_* variable; "" for file-only tables
    fallback_env: str = ""  # conventional variable read when env is unset (VAULT_ADDR)
    choices: tuple[str, ...] = ()  # enum values, for enum-typed fields


@dataclass(frozen=True)
class Section:
    """A group of settings: the top level, a ``[section]`` or a ``[table.<name>]``."""

    title: str  # "top level", "store", "pools.<name>"
    cls: str  # the dataclass name
    doc: str
    settings: tuple[Setting, ...]
    file_only: bool = False


@dataclass(frozen=True)
class CliVariable:
    """An environment variable read by a ``keybroker`` command-line option."""

    name: str
    option: str
    help: str


@dataclass(frozen=True)
class Reference:
    sections: tuple[Section, ...]
    cli: tuple[CliVariable, ...] = field(default=())
    fallbacks: dict[str, str] = field(default_factory=dict)

    def env_vars(self) -> dict[str, Setting]:
        """Every KEYBROKER_* variable the settings loader reads, mapped to its setting."""
        out = {s.env: s for sec in self.sections for s in sec.settings if s.env}
        return out

    def all_env_names(self) -> set[str]:
        """Every variable the reference documents (settings, fallbacks and CLI options)."""
        return set(self.env_vars()) | set(self.fallbacks.values()) | {v.name for v in self.cli}


class _NoDefault:
    def __repr__(self) -> str:
        return "<no default>"


_NO_DEFAULT = _NoDefault()


def _literal_dict(node: ast.AST) -> dict[str, ast.expr]:
    if not isinstance(node, ast.Dict):
        raise ValueError(f"expected a dict literal at line {node.lineno}")
    out = {}
    for key, value in zip(node.keys, node.values, strict=True):
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            raise ValueError(f"expected string keys at line {node.lineno}")
        out[key.value] = value
    return out


def _is_dataclass(cls: ast.ClassDef) -> bool:
    for dec in cls.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if (isinstance(target, ast.Name) and target.id == "dataclass") or (
                isinstance(target, ast.Attribute) and target.attr == "dataclass"):
            return True
    return False


def _is_enum(cls: ast.ClassDef) -> bool:
    return any(ast.unparse(base).split(".")[-1] in ("Enum", "StrEnum", "IntEnum")
               for base in cls.bases)


def _clean(doc: str) -> str:
    """One line of Markdown from a docstring: ``code`` -> `code`, whitespace collapsed."""
    return " ".join(doc.split()).replace("``", "`")


class _Parser:
    def __init__(self, source: str) -> None:
        self.tree = ast.parse(source)
        self.classes = {n.name: n for n in self.tree.body if isinstance(n, ast.ClassDef)}
        self.enums = {name: self._enum_values(cls) for name, cls in self.classes.items()
                      if _is_enum(cls)}
        self.dataclasses = {name: cls for name, cls in self.classes.items() if _is_dataclass(cls)}
        self.assigns = {t.id: n.value for n in self.tree.body if isinstance(n, ast.Assign)
                        for t in n.targets if isinstance(t, ast.Name)}

    @staticmethod
    def _enum_values(cls: ast.ClassDef) -> dict[str, str]:
        out = {}
        for stmt in cls.body:
            if (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.targets[0], ast.Name)):
                out[stmt.targets[0].id] = stmt.value.value
        return out

    def default(self, node: ast.expr | None) -> Any:
        if node is None:
            return _NO_DEFAULT
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("field", "dataclasses.field"):
            for kw in node.keywords:
                if kw.arg == "default":
                    return self.default(kw.value)
            return _NO_DEFAULT  # default_factory: a table, not a scalar
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in self.enums):
            return self.enums[node.value.id][node.attr]
        try:
            return ast.literal_eval(node)
        except ValueError:
            return ast.unparse(node)

    def fields(self, cls_name: str) -> list[tuple[str, ast.expr, ast.expr | None, str | None]]:
        """(name, annotation, default node, docstring or None) for each field of a dataclass."""
        body = self.dataclasses[cls_name].body
        out = []
        for i, stmt in enumerate(body):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            doc = None
            nxt = body[i + 1] if i + 1 < len(body) else None
            if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                doc = nxt.value.value
            out.append((stmt.target.id, stmt.annotation, stmt.value, doc))
        return out

    def class_doc(self, cls_name: str) -> str:
        return _clean(ast.get_docstring(self.dataclasses[cls_name]) or "")


def _mapping_value_class(annotation: ast.expr) -> str | None:
    """``Mapping[str, PoolSettings]`` -> "PoolSettings"."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value).split(".")[-1] in (
            "Mapping", "dict", "Dict", "MutableMapping"):
        sl = annotation.slice
        if isinstance(sl, ast.Tuple) and len(sl.elts) == 2 and isinstance(sl.elts[1], ast.Name):
            return sl.elts[1].id
    return None


def _setting(p: _Parser, cls_name: str, name: str, annotation: ast.expr, value: ast.expr | None,
             doc: str | None, env: str, fallbacks: dict[str, str]) -> Setting:
    if doc is None:
        raise ValueError(f"broker/config.py: {cls_name}.{name} has no docstring: "
                         "write one string literal on the line after the field")
    type_text = ast.unparse(annotation)
    enum_name = next((part.strip() for part in type_text.split("|")
                      if part.strip() in p.enums), None)
    choices = tuple(p.enums[enum_name].values()) if enum_name else ()
    return Setting(name=name, type=type_text, default=p.default(value), doc=_clean(doc), env=env,
                   fallback_env=fallbacks.get(env, ""), choices=choices)


def _cli_variables(source: str) -> tuple[CliVariable, ...]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        kws = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        env = kws.get("envvar")
        if isinstance(env, ast.List | ast.Tuple):  # several names: each is documented
            names = [e.value for e in env.elts
                     if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        elif isinstance(env, ast.Constant) and isinstance(env.value, str):
            names = [env.value]
        else:
            continue
        option = next((a.value for a in node.args
                       if isinstance(a, ast.Constant) and str(a.value).startswith("--")), "")
        help_node = kws.get("help")
        help_text = ""
        if help_node is not None:
            help_value = ast.literal_eval(help_node) if not isinstance(help_node, ast.JoinedStr) else ""
            help_text = _clean(str(help_value))
        out.extend(CliVariable(name=name, option=f"`{option}`", help=help_text) for name in names)
    return _merged(out)


def _client_variables(source: str) -> list[CliVariable]:
    """The ``CLIENT_VARIABLES`` table of broker/shell.py: variables read without an option."""
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
                and any(isinstance(t, ast.Name) and t.id == "CLIENT_VARIABLES"
                        for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))):
            table = ast.literal_eval(node.value)
            return [CliVariable(name=k, option="", help=_clean(v)) for k, v in table.items()]
    return []


def _merged(variables: list[CliVariable]) -> tuple[CliVariable, ...]:
    merged: dict[str, CliVariable] = {}
    for v in variables:  # one row per variable; several options may read it
        seen = merged.get(v.name)
        if seen is None:
            merged[v.name] = v
        elif v.option:
            options = ", ".join(o for o in (seen.option, v.option) if o)
            merged[v.name] = CliVariable(name=v.name, option=options, help=seen.help or v.help)
    return tuple(sorted(merged.values(), key=lambda v: v.name))


def build_reference(config_source: str | None = None, cli_source: str | None = None) -> Reference:
    """The settings model of broker/config.py (and the CLI's variables), from source text."""
    p = _Parser(CONFIG.read_text() if config_source is None else config_source)
    sections_node = p.assigns.get("_SECTIONS")
    if sections_node is None:
        raise ValueError("broker/config.py: no _SECTIONS table")
    section_classes = {name: ast.unparse(v) for name, v in _literal_dict(sections_node).items()}
    fallbacks: dict[str, str] = {}
    if "_FALLBACK_ENV" in p.assigns:
        fallbacks = {k: ast.literal_eval(v) for k, v in _literal_dict(p.assigns["_FALLBACK_ENV"]).items()}

    top: list[Setting] = []
    tables: list[tuple[str, str]] = []
    for name, annotation, value, doc in p.fields("Settings"):
        type_name = ast.unparse(annotation)
        if type_name in section_classes.values():
            continue  # a [section]: listed below in _SECTIONS order
        table_cls = _mapping_value_class(annotation)
        if table_cls is not None:
            tables.append((name, table_cls))
            continue
        top.append(_setting(p, "Settings", name, annotation, value, doc,
                            f"KEYBROKER_{name.upper()}", fallbacks))

    sections = [Section("top level", "Settings", p.class_doc("Settings"), tuple(top))]
    for sec, cls_name in section_classes.items():
        settings = tuple(
            _setting(p, cls_name, name, annotation, value, doc,
                     f"KEYBROKER_{sec.upper()}_{name.upper()}", fallbacks)
            for name, annotation, value, doc in p.fields(cls_name))
        sections.append(Section(sec, cls_name, p.class_doc(cls_name), settings))
    for table, cls_name in tables:
        settings = tuple(_setting(p, cls_name, name, annotation, value, doc, "", fallbacks)
                         for name, annotation, value, doc in p.fields(cls_name))
        sections.append(Section(f"{table}.<name>", cls_name, p.class_doc(cls_name), settings,
                                file_only=True))
    cli = _merged([*_cli_variables(CLI.read_text() if cli_source is None else cli_source),
                   *_client_variables(SHELL.read_text())])
    return Reference(tuple(sections), cli, fallbacks)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type(s: Setting) -> str:
    if s.choices:
        text = "one of " + ", ".join(f"`{c}`" for c in s.choices)
    else:
        parts = [part.strip() for part in s.type.split("|")]
        optional = "None" in parts
        kept = [_SCALARS.get(part, part) for part in parts if part != "None"]
        text = " or ".join(kept) + (" (optional)" if optional else "")
    return _cell(text)


def _default(s: Setting) -> str:
    value = s.default
    if value is _NO_DEFAULT:
        return "(none)"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return "empty" if value == "" else _cell(f'`"{value}"`')
    return _cell(f"`{value!r}`")


def _env(s: Setting) -> str:
    text = f"`{s.env}`"
    if s.fallback_env:
        text += f" (else `{s.fallback_env}`)"
    return text


HEADER = """\
# Configuration reference

<!-- Generated by tools/configref.py from broker/config.py: run `make docs`, do not
     edit by hand. tests/test_deploy.py fails when this file is stale. -->

keybroker reads its settings once, at start-up, from an optional TOML file plus
environment variables:

- The file: `keybroker serve --config FILE` (or `KEYBROKER_CONFIG=FILE`). Scalar
  settings sit at the top level or in a `[section]`; per-pool and per-account
  limits are tables such as `[pools.free]` and `[accounts.acct-a]`.
- The environment: every scalar setting `<section>.<field>` is overridden by
  `KEYBROKER_<SECTION>_<FIELD>` (top-level fields: `KEYBROKER_<FIELD>`). Per-pool
  and per-account tables come from the file only.
- Precedence: the `KEYBROKER_*` variable, then the file, then the conventional
  `VAULT_ADDR`/`VAULT_TOKEN` (for `vault.addr` and `vault.token` only), then the
  default below.
- Booleans accept `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`; choices are
  case-insensitive. A bad value or an unknown name in the file stops the broker
  with a message naming the setting.

```toml
listen = "0.0.0.0:50051"
policy_file = "/etc/keybroker/policy.toml"

[tls]                               # a non-loopback listen needs TLS (or insecure_plaintext)
cert_file = "/etc/keybroker/tls/tls.crt"
key_file = "/etc/keybroker/tls/tls.key"

[vault]
addr = "https://vault.example.internal:8200"
auth = "approle"
role_id = "..."                     # secret_id from KEYBROKER_VAULT_SECRET_ID_FILE

[quota]
daily_limit = 50

[pools.free]
minute_limit = 10

[accounts.acct-a]
daily_limit = 1000                  # this account bought credits
```
"""


def render(ref: Reference | None = None) -> str:
    """The Markdown text of docs/configuration.md."""
    ref = build_reference() if ref is None else ref
    out = [HEADER]
    for sec in ref.sections:
        if sec.title == "top level":
            out.append("\n## Top level\n")
        elif sec.file_only:
            out.append(f"\n## `[{sec.title}]` (file only)\n")
        else:
            out.append(f"\n## `[{sec.title}]`\n")
        if sec.doc:
            out.append(f"\n{sec.doc}\n")
        if sec.file_only:
            out.append("\n| Setting | Type | Default | Meaning |\n| --- | --- | --- | --- |\n")
            for s in sec.settings:
                out.append(f"| `{s.name}` | {_type(s)} | {_default(s)} | {_cell(s.doc)} |\n")
        else:
            out.append("\n| Setting | Environment variable | Type | Default | Meaning |\n"
                       "| --- | --- | --- | --- | --- |\n")
            for s in sec.settings:
                out.append(f"| `{s.name}` | {_env(s)} | {_type(s)} | {_default(s)} | "
                           f"{_cell(s.doc)} |\n")
    if ref.cli:
        out.append("\n## Command line\n\nRead by `keybroker` commands, not by the settings loader.\n")
        out.append("\n| Environment variable | Option | Meaning |\n| --- | --- | --- |\n")
        for v in ref.cli:
            out.append(f"| `{v.name}` | {v.option or '(none)'} | {_cell(v.help)} |\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 (with a diff) when the output file is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current == text:
            return 0
        sys.stdout.writelines(difflib.unified_diff(
            current.splitlines(keepends=True), text.splitlines(keepends=True),
            str(args.output), "rendered"))
        print(f"{args.output} is stale: run `make docs`", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
