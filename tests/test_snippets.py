"""Every usage snippet of README.md and docs/*.md runs against a live dev stack.

A fenced block preceded by ``<!-- snippet: run expect="TEXT" -->`` is run (``python``
as a script, ``js`` as an ``.mjs`` module with the Node client, ``sh`` with bash) from a
folder whose ``.keybroker/`` is a running DevStack's (OpenBao, emulator, broker), with
``.keybroker/env`` sourced into its environment; it must exit 0 and print TEXT. Python
and JavaScript blocks are always usage, so each of them must be marked; shell and
config blocks that are not marked (``make run``, TOML fragments) are not run.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from broker.testing import DevStack

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NODE = shutil.which("node")
NODE_CLIENT = ROOT / "clients" / "node"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARK = re.compile(r'<!--\s*snippet:\s*run(?:\s+expect="([^"]*)")?\s*-->\s*$')
LANG = {"python": ".py", "py": ".py", "js": ".mjs", "javascript": ".mjs", "mjs": ".mjs",
        "sh": ".sh", "bash": ".sh", "shell": ".sh"}
ALWAYS_USAGE = {".py", ".mjs"}


@dataclass(frozen=True)
class Snippet:
    where: str          # file:line, the test id
    suffix: str         # .py, .mjs, .sh or "" (not runnable)
    code: str
    run: bool
    expect: str


def snippets() -> list[Snippet]:
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = MARK.search(before)
            found.append(Snippet(f"{path.relative_to(ROOT)}:{line}", LANG.get(m.group(1), ""),
                                 m.group(2), mark is not None,
                                 (mark.group(1) or "") if mark else ""))
    return found


RUNNABLE = [s for s in snippets() if s.run]
on_stack = pytest.mark.asyncio(loop_scope="module")


def test_every_python_and_javascript_block_is_run():
    """Each Python or JavaScript block in README.md and docs/ is marked to run with an expectation."""
    unmarked = [s.where for s in snippets() if s.suffix in ALWAYS_USAGE and not s.run]
    assert not unmarked, f"mark these <!-- snippet: run expect=\"...\" -->: {unmarked}"
    assert all(s.expect for s in RUNNABLE), [s.where for s in RUNNABLE if not s.expect]
    assert {s.suffix for s in RUNNABLE} >= {".py", ".mjs", ".sh"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevStack]:
    home = tmp_path_factory.mktemp("snippets")
    async with DevStack(home / ".keybroker", probe_interval=0.0, tracing=False,
                        stop_grace=0.0) as s:
        await s.wait_ready()
        s.write_env_file()
        # `import ... from '@keybroker/client'` resolves as after `npm install ./clients/node`.
        scope = home / "node_modules" / "@keybroker"
        scope.mkdir(parents=True)
        (scope / "client").symlink_to(NODE_CLIENT, target_is_directory=True)
        yield s


@on_stack
@pytest.mark.parametrize("snippet", RUNNABLE, ids=[s.where for s in RUNNABLE])
async def test_snippet_runs(stack: DevStack, snippet: Snippet) -> None:
    """The snippet exits 0 against the dev stack and prints what its marker expects."""
    if snippet.suffix == ".mjs" and NODE is None:
        pytest.skip("node is not installed")
    home = stack.state_dir.parent
    file = home / f"snippet{snippet.suffix}"
    file.write_text(snippet.code, encoding="utf-8")
    command = {".py": [sys.executable, str(file)], ".mjs": [str(NODE), str(file)],
               ".sh": ["bash", "-e", str(file)]}[snippet.suffix]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYBROKER_", "VAULT_"))}
    env.update(stack.environment(), NODE_OPTIONS="",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=home, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    assert proc.returncode == 0, f"{snippet.where} exited {proc.returncode}:\n{stdout}\n{stderr}"
    assert snippet.expect in stdout, f"{snippet.where}: {snippet.expect!r} not in:\n{stdout}"


def test_every_relative_link_in_readme_and_docs_points_at_a_file():
    """Each relative Markdown link (and backticked *.md name) in README.md and docs/ exists."""
    broken = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
        for name in re.findall(r"`([\w./-]+\.md)`", text):
            if not any((base / name).exists() for base in (ROOT, ROOT / "docs", path.parent)):
                broken.append(f"{path.relative_to(ROOT)} -> {name}")
    assert not broken, broken
