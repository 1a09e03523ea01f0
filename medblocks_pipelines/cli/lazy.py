"""Lazy subcommands: `medblocks --help` imports no command module (no Dagster, DuckDB, Polars).

click's documented lazy-loading pattern ("Lazily Loading Subcommands"): a group keeps
``name -> "module:attribute"`` and imports the module only when the command is run or its own
help is asked for. A group's help lists its commands with their short help read from the command
function's docstring in the module's source (``ast``), so listing imports nothing either.
"""

import ast
import importlib
import importlib.util
from functools import cache
from pathlib import Path

import click


def _split(target: str) -> tuple[str, str]:
    module_name, _, attr = target.partition(":")
    return module_name, attr


@cache
def source_path(module_name: str) -> Path | None:
    """The file of ``module_name`` found without importing it or its parent packages."""
    top, _, rest = module_name.partition(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin else None
    for base in spec.submodule_search_locations or []:
        path = Path(base, *rest.split("."))
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _decorator_help(func: ast.FunctionDef) -> str | None:
    """``help=`` / ``short_help=`` of the ``@...command(...)`` / ``@...group(...)`` decorator."""
    for deco in func.decorator_list:
        if not isinstance(deco, ast.Call):
            continue
        called = deco.func
        name = called.attr if isinstance(called, ast.Attribute) else getattr(called, "id", "")
        if name in ("command", "group"):
            for kw in deco.keywords:
                if kw.arg in ("short_help", "help") and isinstance(kw.value, ast.Constant):
                    return str(kw.value.value)
    return None


@cache
def source_help(target: str) -> str:
    """The help text of the command function ``target`` names, read from its module's source."""
    module_name, attr = _split(target)
    path = source_path(module_name)
    if path is None:
        return ""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == attr:
            return _decorator_help(node) or ast.get_docstring(node) or ""
    return ""


def short_help(text: str, limit: int) -> str:
    """click's short help of a command whose help is ``text`` (click's own shortening)."""
    return click.Command(None, help=text).get_short_help_str(limit)


def load_command(target: str) -> click.Command | None:
    """Import the command ``target`` names; None when its module is not installed."""
    module_name, attr = _split(target)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # A pattern that is not installed yet; any other import error is a real bug.
        if exc.name != module_name:
            raise
        return None
    command = getattr(module, attr, None)
    return command if isinstance(command, click.Command) else None


class LazyGroup(click.Group):
    """A group whose subcommands named in ``lazy_subcommands`` are imported on first use."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        lazy = kwargs.pop("lazy_subcommands", None) or {}
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy_subcommands: dict[str, str] = dict(lazy)  # type: ignore[call-overload]

    def add_lazy(self, name: str, target: str) -> None:
        """Register ``name`` as the command at ``module:attribute``, imported when used."""
        self.lazy_subcommands[name] = target

    def _pending(self) -> dict[str, str]:
        return {
            name: target
            for name, target in self.lazy_subcommands.items()
            if name not in self.commands and source_path(_split(target)[0]) is not None
        }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._pending()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy_subcommands.get(cmd_name)
        if target is not None and cmd_name not in self.commands:
            command = load_command(target)
            if command is not None:
                self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing, with the short help of commands not imported yet read from source."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        pending = self._pending()
        rows: list[tuple[str, str]] = []
        for name in names:
            if name in pending:
                text = short_help(source_help(pending[name]), limit)
                rows.append((name, text))
                continue
            command = self.commands.get(name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
