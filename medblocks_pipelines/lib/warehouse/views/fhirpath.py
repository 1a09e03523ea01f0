"""A parser for the FHIRPath subset that SQL on FHIR ViewDefinitions use.

FHIRPath (https://hl7.org/fhirpath/N1/) is parsed into a small AST that the view compiler turns
into DuckDB SQL. The grammar follows the normative ANTLR grammar's precedence table (section
"Operator precedence"), from tightest to loosest::

    . [] (invocation, indexer)   unary + -   * / div mod   + - &   is as   |
    < > <= >=   = ~ != !~   in contains   and   xor or   implies

Quantities with units, ``$total`` and aggregates are not part of the subset; they fail with a
clear :class:`~medblocks_pipelines.lib.errors.ViewDefinitionError` rather than a wrong answer.
"""

import re
from dataclasses import dataclass, field

from medblocks_pipelines.lib.errors import ViewDefinitionError

__all__ = [
    "Binary",
    "Call",
    "Index",
    "Literal",
    "Member",
    "Node",
    "This",
    "TypeOp",
    "Unary",
    "Var",
    "parse",
]


@dataclass(frozen=True)
class Node:
    """Base class of the FHIRPath AST."""


@dataclass(frozen=True)
class Literal(Node):
    """A literal: ``kind`` is string, integer, decimal, boolean, date, dateTime, time or empty."""

    value: object
    kind: str


@dataclass(frozen=True)
class This(Node):
    """``$this`` (also the implicit focus at the start of a path)."""


@dataclass(frozen=True)
class Var(Node):
    """An environment variable or ViewDefinition constant: ``%name``."""

    name: str


@dataclass(frozen=True)
class Member(Node):
    """Member navigation ``base.name``; ``base`` None means the current focus."""

    base: Node | None
    name: str


@dataclass(frozen=True)
class Call(Node):
    """A function invocation ``base.name(args)``; ``base`` None means the current focus."""

    base: Node | None
    name: str
    args: tuple[Node, ...] = field(default=())


@dataclass(frozen=True)
class Index(Node):
    """An indexer ``base[index]``."""

    base: Node
    index: Node


@dataclass(frozen=True)
class Binary(Node):
    """A binary operator."""

    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Unary(Node):
    """Unary ``+`` or ``-``."""

    op: str
    operand: Node


@dataclass(frozen=True)
class TypeOp(Node):
    """``operand is Type`` or ``operand as Type``."""

    op: str
    operand: Node
    type_name: str


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<empty>\{\s*\})
  | (?P<datetime>@T?[0-9][0-9:\-T.+Z]*)
  | (?P<number>[0-9]+(?:\.[0-9]+)?)
  | (?P<string>'(?:[^'\\]|\\.)*')
  | (?P<delimited>`(?:[^`\\]|\\.)*`)
  | (?P<special>\$[A-Za-z]+)
  | (?P<ext>%(?:[A-Za-z_][A-Za-z0-9_]*|`(?:[^`\\]|\\.)*`|'(?:[^'\\]|\\.)*'))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|!=|!~|[.\[\](),+\-*/&|=~<>])
    """,
    re.VERBOSE | re.DOTALL,
)

_ESCAPES = {
    "'": "'",
    '"': '"',
    "`": "`",
    "\\": "\\",
    "/": "/",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}


def _unescape(body: str) -> str:
    """Resolve FHIRPath string escapes (section "String")."""
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if (
                nxt == "u"
                and i + 5 < len(body) + 0
                and re.fullmatch(r"[0-9a-fA-F]{4}", body[i + 2 : i + 6])
            ):
                out.append(chr(int(body[i + 2 : i + 6], 16)))
                i += 6
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


def _tokenize(src: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if m is None:
            raise ViewDefinitionError(
                f"FHIRPath syntax error at position {pos} in {src!r}: unexpected {src[pos]!r}"
            )
        kind = m.lastgroup or ""
        if kind != "ws":
            tokens.append(_Tok(kind, m.group(), pos))
        pos = m.end()
    tokens.append(_Tok("eof", "", len(src)))
    return tokens


# Binary operators by precedence level, loosest first.
_LEVELS: list[tuple[str, ...]] = [
    ("implies",),
    ("or", "xor"),
    ("and",),
    ("in", "contains"),
    ("=", "~", "!=", "!~"),
    ("<", ">", "<=", ">="),
    ("|",),
    ("is", "as"),
    ("+", "-", "&"),
    ("*", "/", "div", "mod"),
]
_WORD_OPS = {"implies", "or", "xor", "and", "in", "contains", "is", "as", "div", "mod"}


class _Parser:
    def __init__(self, src: str) -> None:
        self.src = src
        self.toks = _tokenize(src)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def error(self, message: str) -> ViewDefinitionError:
        tok = self.peek()
        return ViewDefinitionError(
            f"FHIRPath syntax error at position {tok.pos} in {self.src!r}: {message}"
        )

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text or tok.kind not in ("op", "ident"):
            self.i -= 1
            raise self.error(f"expected {text!r}, found {tok.text or 'end of input'!r}")

    def is_op(self, ops: tuple[str, ...]) -> str | None:
        tok = self.peek()
        if tok.kind == "op" and tok.text in ops:
            return tok.text
        if tok.kind == "ident" and tok.text in ops and tok.text in _WORD_OPS:
            return tok.text
        return None

    def parse(self) -> Node:
        node = self.binary(0)
        if self.peek().kind != "eof":
            raise self.error(f"unexpected {self.peek().text!r}")
        return node

    def binary(self, level: int) -> Node:
        if level == len(_LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while (op := self.is_op(_LEVELS[level])) is not None:
            self.take()
            if op in ("is", "as"):
                left = TypeOp(op, left, self.type_specifier())
                continue
            right = self.binary(level + 1)
            left = Binary(op, left, right)
        return left

    def type_specifier(self) -> str:
        parts = [self.identifier()]
        while self.peek().text == "." and self.peek().kind == "op":
            self.take()
            parts.append(self.identifier())
        return ".".join(parts)

    def identifier(self) -> str:
        tok = self.take()
        if tok.kind == "ident":
            return tok.text
        if tok.kind == "delimited":
            return _unescape(tok.text[1:-1])
        self.i -= 1
        raise self.error(f"expected an identifier, found {tok.text or 'end of input'!r}")

    def unary(self) -> Node:
        op = self.is_op(("+", "-"))
        if op is not None:
            self.take()
            return Unary(op, self.unary())
        return self.postfix()

    def postfix(self) -> Node:
        node = self.term()
        while True:
            tok = self.peek()
            if tok.kind == "op" and tok.text == ".":
                self.take()
                node = self.invocation(node)
            elif tok.kind == "op" and tok.text == "[":
                self.take()
                index = self.binary(0)
                self.expect("]")
                node = Index(node, index)
            else:
                return node

    def invocation(self, base: Node | None) -> Node:
        tok = self.peek()
        if tok.kind == "special":
            self.take()
            if tok.text == "$this":
                return This()
            raise ViewDefinitionError(f"unsupported FHIRPath variable {tok.text!r}")
        name = self.identifier()
        if self.peek().kind == "op" and self.peek().text == "(":
            self.take()
            args: list[Node] = []
            if not (self.peek().kind == "op" and self.peek().text == ")"):
                args.append(self.binary(0))
                while self.peek().kind == "op" and self.peek().text == ",":
                    self.take()
                    args.append(self.binary(0))
            self.expect(")")
            return Call(base, name, tuple(args))
        return Member(base, name)

    def term(self) -> Node:
        tok = self.peek()
        if tok.kind == "string":
            self.take()
            return Literal(_unescape(tok.text[1:-1]), "string")
        if tok.kind == "number":
            self.take()
            if self.peek().kind == "string" or (
                self.peek().kind == "ident" and self.peek().text not in _WORD_OPS
            ):
                raise self.error("quantity literals are not supported")
            if "." in tok.text:
                return Literal(tok.text, "decimal")
            return Literal(int(tok.text), "integer")
        if tok.kind == "datetime":
            self.take()
            text = tok.text[1:]
            if text.startswith("T"):
                return Literal(text[1:], "time")
            return Literal(text, "dateTime" if "T" in text else "date")
        if tok.kind == "ext":
            self.take()
            body = tok.text[1:]
            if body[0] in "`'":
                body = _unescape(body[1:-1])
            return Var(body)
        if tok.kind == "special":
            self.take()
            if tok.text == "$this":
                return This()
            raise ViewDefinitionError(f"unsupported FHIRPath variable {tok.text!r}")
        if tok.kind == "op" and tok.text == "(":
            self.take()
            node = self.binary(0)
            self.expect(")")
            return node
        if tok.kind == "empty":
            self.take()
            return Literal(None, "empty")
        if tok.kind == "ident" and tok.text in ("true", "false"):
            self.take()
            return Literal(tok.text == "true", "boolean")
        if tok.kind in ("ident", "delimited"):
            return self.invocation(None)
        raise self.error(f"unexpected {tok.text or 'end of input'!r}")


def parse(expression: str) -> Node:
    """Parse a FHIRPath expression; raise ViewDefinitionError on a syntax error."""
    if not isinstance(expression, str):
        raise ViewDefinitionError(
            f"a FHIRPath expression must be a string, got {type(expression).__name__}"
        )
    if not expression.strip():
        raise ViewDefinitionError("empty FHIRPath expression")
    return _Parser(expression).parse()
