"""Every hint that names a `medblocks ...` command names one that exists (parsed from the source
and walked through the click command tree)."""

import ast
import re
from pathlib import Path

import click

import medblocks_pipelines
from medblocks_pipelines.cli import main

PACKAGE = Path(medblocks_pipelines.__file__).parent
COMMAND = re.compile(r"\bmedblocks((?: [a-z][a-z-]*)+)")
BACKTICKED = re.compile(r"`{1,2}medblocks((?: [a-z][a-z-]*)+)")


def _text(node: ast.expr) -> str:
    """The literal text of a string expression; formatted values become `X`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) if isinstance(v, ast.Constant) else "X" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text(node.left) + _text(node.right)
    if isinstance(node, ast.IfExp):
        return _text(node.body) + " | " + _text(node.orelse)
    return ""


def _hints() -> list[tuple[str, str]]:
    """(where, text) of every hint in the package: `hint=...` arguments, "hint: ..." strings,
    `listing=` arguments (owned_by's hint), string values of `*_HINTS` tables, and any
    backticked `medblocks ...` in a string or docstring."""
    out: list[tuple[str, str]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            texts: list[str] = []
            if isinstance(node, ast.keyword) and node.arg == "hint":
                texts = [_text(node.value)]
            elif isinstance(node, ast.keyword) and node.arg == "listing":
                texts = ["medblocks " + _text(node.value)]
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                if any(isinstance(t, ast.Name) and t.id.endswith("_HINTS") for t in node.targets):
                    texts = [_text(v) for v in node.value.values if v is not None]
            elif isinstance(node, ast.Call) and node.args:
                first = _text(node.args[0])
                texts = [first] if first.lstrip().startswith("hint:") else []
            elif isinstance(node, ast.Constant | ast.JoinedStr):
                texts = ["medblocks" + m for m in BACKTICKED.findall(_text(node))]
            where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', '?')}"
            out.extend((where, t) for t in texts if t)
    return out


def _resolve(words: list[str]) -> str | None:
    """None when `medblocks WORDS...` reaches a command; else what is missing."""
    node: click.Command = main
    ctx = click.Context(main)
    path = ["medblocks"]
    for word in words:
        if not isinstance(node, click.Group):
            return None  # the rest are the command's arguments
        sub = node.get_command(ctx, word)
        if sub is None:
            return f"`{' '.join(path)}` has no command {word!r}"
        node, path = sub, [*path, word]
    return None  # a command, or a group (naming a group is fine)


def test_hints_name_real_commands() -> None:
    hints = _hints()
    named = [(where, m.group(1).split()) for where, t in hints for m in COMMAND.finditer(t)]
    assert len(named) > 40  # the parse found them
    bad = [f"{where}: {problem}" for where, words in named if (problem := _resolve(words))]
    assert bad == []


def test_no_hint_sends_to_a_second_dagster_instance() -> None:
    # `dagster dev` with no DAGSTER_HOME opened a new, empty instance; `make ui` opens ours
    assert [w for w, t in _hints() if "dagster dev" in t] == []
