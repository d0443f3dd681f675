"""Command templates: `{field}` substitution, shell-quoted for commands, compiled once per file.

Syntax: ``{name}`` is replaced by the parameter ``name``; ``{}`` is the parameter ``""`` (the
argument of ``jobfleet run --each``); ``{{`` and ``}}`` are literal braces. In a shell template
every value is quoted with :func:`shlex.quote`, so no value can inject commands. A field placed
where quoting cannot protect it (inside '...' or "...", after a backslash or ``$``, or in a
here-document) is refused when the template is compiled.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from operator import itemgetter
from shlex import quote

from jobfleet.errors import SpecError

__all__ = ["Template", "compile_template", "fields", "render"]

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_HEREDOC = re.compile(r"<<(-?)[ \t]*(['\"]?)([\w.-]+)\2")
_FIELD_LIKE = re.compile(r"[\w.-]*\Z")
_WORD_START = frozenset(" \t\n;&|()")
_BRACE_HINT = "to write a literal brace, double it: {{ gives {, }} gives }"


class _Bad(Exception):
    """A template syntax problem, located by the caller."""

    def __init__(self, message: str, hint: str = _BRACE_HINT) -> None:
        super().__init__(message)
        self.message, self.hint = message, hint


class Template:
    """A compiled template; call it with the parameters of one job."""

    __slots__ = ("text", "names", "shell", "_fmt", "_literal", "_quote", "_get", "_one")

    def __init__(self, text: str, names: tuple[str, ...], fmt: str, shell: bool,
                 occurrences: tuple[str, ...] = ()) -> None:
        """`fmt`: the literal text with '%' doubled and a `%s` per field occurrence, whose
        names are `occurrences` in order (`names`: each name once)."""
        self.text, self.names, self.shell, self._fmt = text, names, shell, fmt
        self._literal = None if names else fmt % ()
        self._quote: Callable[[str], str] = quote if shell else str
        self._get = itemgetter(*occurrences) if occurrences else None
        self._one = len(occurrences) == 1  # itemgetter returns the value itself, not a tuple

    def __call__(
        self,
        params: Mapping[str, str],
        *,
        source: str | None = None,
        line: int | None = None,
        column: str = "command",
    ) -> str:
        if self._literal is not None:
            return self._literal
        assert self._get is not None
        try:
            values = self._get(params)
        except KeyError as e:
            raise _unknown(e.args[0], params, source, line, column) from None
        if self._one:
            return self._fmt % self._quote(values)
        return self._fmt % tuple(map(self._quote, values))

    def __repr__(self) -> str:
        return f"Template({self.text!r}, shell={self.shell})"


def compile_template(
    template: str,
    *,
    shell: bool = True,
    source: str | None = None,
    line: int | None = None,
    column: str = "command",
) -> Template:
    """Parse `template` once; raise SpecError (at `source`:`line`, `column`) if it is malformed."""
    try:
        if not isinstance(template, str):
            raise _Bad(f"a template must be text, not {type(template).__name__}",
                       hint="write the command as one string")
        return _compile(template, shell)
    except _Bad as e:
        raise SpecError(e.message, source=source, line=line, column=column, hint=e.hint) from None


def render(
    template: str,
    params: Mapping[str, str],
    *,
    source: str | None = None,
    line: int | None = None,
    column: str = "command",
    shell: bool = True,
) -> str:
    """Fill `template` from `params`; values are shell-quoted unless ``shell=False``."""
    t = compile_template(template, shell=shell, source=source, line=line, column=column)
    return t(params, source=source, line=line, column=column)


def fields(template: str) -> set[str]:
    """The parameter names `template` uses (``""`` for ``{}``)."""
    return set(compile_template(template, shell=False).names)


def _unknown(
    name: str, params: Mapping[str, str], source: str | None, line: int | None, column: str
) -> SpecError:
    known = sorted(params)
    close = difflib.get_close_matches(name, known, n=1)
    guess = f"; did you mean {{{close[0]}}}?" if close else ""
    shown = ", ".join("{" + k + "}" for k in known[:30]) + (", ..." if len(known) > 30 else "")
    return SpecError(
        f"unknown field {{{name}}} in the template{guess}", source=source, line=line,
        column=column, hint=f"available: {shown or 'none'}; {_BRACE_HINT}",
    )


@lru_cache(maxsize=4096)
def _compile(template: str, shell: bool) -> Template:
    fmt: list[str] = []
    names: dict[str, int] = {}
    occurrences: list[str] = []
    pieces: list[tuple[str, str | None]] = []  # (literal text before, field name or None)
    literal: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        literal.append(template[pos:m.start()])
        pos = m.end()
        tok = m.group()
        if tok in ("{{", "}}"):
            literal.append(tok[0])
            continue
        if tok == "{":
            raise _Bad(f"unclosed '{{' at character {m.start() + 1}: {_excerpt(template, m)}")
        if tok == "}":
            raise _Bad(f"single '}}' at character {m.start() + 1}: {_excerpt(template, m)}")
        name = m.group(1)
        names.setdefault(name, len(names))
        occurrences.append(name)
        text = "".join(literal)
        literal.clear()
        pieces.append((text, name))
        fmt.append(_escape(text) + "%s")
    text = "".join(literal) + template[pos:]
    pieces.append((text, None))
    fmt.append(_escape(text))
    if shell and names:
        _check_shell_context(pieces)
    return Template(template, tuple(names), "".join(fmt), shell, tuple(occurrences))


def _escape(text: str) -> str:
    """Literal text for a %-format."""
    return text.replace("%", "%%")


def _excerpt(template: str, m: re.Match[str]) -> str:
    start = max(0, m.start() - 20)
    return repr(template[start:m.end() + 20])


def _check_shell_context(pieces: Iterable[tuple[str, str | None]]) -> None:
    """Refuse fields where a shell-quoted value would not stay one word of plain text."""
    lexer = _ShellLexer()
    for text, name in pieces:
        lexer.feed(text)
        if name is None:
            break
        where = lexer.unsafe()
        lexer.prev = "x"
        if where:
            shown = "{" + name + "}"
            if where == "after $":
                raise _Bad(
                    f"${shown} would be read by the shell as a variable",
                    hint=f"for a shell variable write ${{{shown}}}; to insert the field, "
                    f"drop the $",
                )
            hint = (f"values are quoted for you: write {shown} bare, outside quotes "
                    f"(e.g. echo {shown}, not echo \"{shown}\")")
            if not _FIELD_LIKE.match(name):
                hint = "if these braces are for the command itself (awk, find), " + _BRACE_HINT
            raise _Bad(f"{shown} is {where}, where shell quoting cannot protect its value", hint)


class _ShellLexer:
    """Just enough of POSIX shell quoting to know whether the next character is bare."""

    def __init__(self) -> None:
        self.stack = ["top"]  # top | dq | sq | ansi | cmd | paren | bt | heredoc | comment
        self.escaped = False  # the last character was an unconsumed backslash
        self.dollar = False  # the last character was a bare $
        self.heredocs: list[tuple[str, bool]] = []  # (delimiter, strip tabs) pending
        self.delim: tuple[str, bool] | None = None
        self.line = ""  # current line inside a here-document
        self.prev = "\n"  # the character before the next one fed (a field counts as a word)

    def unsafe(self) -> str | None:
        mode = self.stack[-1]
        if self.escaped:
            return "after a backslash"
        if mode in ("sq", "ansi"):
            return "inside '...' quotes"
        if mode == "dq":
            return 'inside "..." quotes'
        if mode == "heredoc":
            return "inside a here-document"
        return "after $" if self.dollar else None

    def feed(self, text: str) -> None:
        i, n, stack = 0, len(text), self.stack
        while i < n:
            c = text[i]
            mode = stack[-1]
            prev, self.prev = self.prev, c
            if self.escaped:
                self.escaped = False
                i += 1
                continue
            self.dollar = False
            if mode == "comment":
                if c == "\n":
                    stack.pop()
                    if self.heredocs:
                        self._start_heredoc()
            elif mode == "heredoc":
                self._heredoc_char(c)
            elif mode == "sq":
                if c == "'":
                    stack.pop()
            elif c == "\\":
                self.escaped = True
            elif mode == "ansi":
                if c == "'":
                    stack.pop()
            elif mode == "dq":
                if c == '"':
                    stack.pop()
                elif c == "`":
                    stack.append("bt")
                elif c == "$" and text.startswith("(", i + 1):
                    stack.append("cmd")
                    i += 1
            elif c == "#" and prev in _WORD_START:
                stack.append("comment")
            else:
                i = self._bare_char(text, i, c, mode)
            i += 1

    def _bare_char(self, text: str, i: int, c: str, mode: str) -> int:
        stack = self.stack
        if c == "'":
            stack.append("sq")
        elif c == '"':
            stack.append("dq")
        elif c == "`":
            if mode == "bt":
                stack.pop()
            else:
                stack.append("bt")
        elif c == "$":
            nxt = text[i + 1:i + 2]
            if nxt == "'":
                stack.append("ansi")
                return i + 1
            if nxt == "(":
                stack.append("cmd")
                return i + 1
            self.dollar = nxt == ""  # the field comes right after this $
        elif c == "(":
            stack.append("paren")
        elif c == ")" and mode in ("cmd", "paren"):
            stack.pop()
        elif c == "<" and text.startswith("<", i + 1) and not text.startswith("<", i + 2):
            m = _HEREDOC.match(text, i)
            if m:
                self.heredocs.append((m.group(3), bool(m.group(1))))
                return m.end() - 1
        elif c == "\n" and self.heredocs:
            self._start_heredoc()
        return i

    def _start_heredoc(self) -> None:
        self.delim = self.heredocs.pop(0)
        self.line = ""
        self.stack.append("heredoc")

    def _heredoc_char(self, c: str) -> None:
        if c != "\n":
            self.line += c
            return
        assert self.delim is not None
        word, strip_tabs = self.delim
        if (self.line.lstrip("\t") if strip_tabs else self.line) == word:
            self.stack.pop()
            if self.heredocs:
                self._start_heredoc()
        self.line = ""
