"""Parsing JSON and YAML job files into mappings that remember the line they start on.

Both loaders return plain Python data in which every mapping is a :class:`Located` dict
(``.line``: where the mapping starts; ``.lines``: for YAML, the line of each key) and
duplicate keys are an error instead of silently keeping the last value. YAML scalars stay the
text that was written (``007`` stays ``007``, ``yes`` stays ``yes``); only null is resolved, so
parameters are never reinterpreted as numbers, booleans or dates.
"""

from __future__ import annotations

import json
from json.decoder import JSONObject  # type: ignore[attr-defined]
from json.scanner import py_make_scanner  # type: ignore[attr-defined]
from typing import Any

from jobfleet.errors import SpecError

__all__ = ["Located", "LocatedList", "load_json", "load_yaml"]


class Located(dict[str, Any]):
    """A mapping from a job file, with the line it starts on and the line of each key."""

    __slots__ = ("line", "lines")

    def __init__(self) -> None:
        super().__init__()
        self.line: int | None = None
        self.lines: dict[str, int] = {}


class LocatedList(list[Any]):
    """A YAML sequence with the line of each item."""

    __slots__ = ("lines",)

    def __init__(self, items: list[Any], lines: list[int]) -> None:
        super().__init__(items)
        self.lines = lines


class _Problem(Exception):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message, self.line = message, line


# --- JSON ---------------------------------------------------------------------------------


class _LineDecoder(json.JSONDecoder):
    """A JSONDecoder whose objects are Located: the pure-Python scanner with a hooked
    parse_object that notes where each ``{`` is (lines counted incrementally, so O(n))."""

    def __init__(self) -> None:
        super().__init__(object_pairs_hook=_json_pairs)
        self._pos, self._line = 0, 1
        self.parse_object = self._parse_object
        self.scan_once = py_make_scanner(self)

    def _parse_object(self, s_and_end: tuple[str, int], *args: Any) -> tuple[Located, int]:
        text, end = s_and_end
        self._line += text.count("\n", self._pos, end - 1)
        self._pos = end - 1
        line = self._line
        try:
            obj, end = JSONObject(s_and_end, *args)
        except _Problem as e:
            raise _Problem(e.message, e.line or line) from None
        obj.line = line
        return obj, end


def _json_pairs(pairs: list[tuple[str, Any]]) -> Located:
    out = Located()
    for key, value in pairs:
        if key in out:
            raise _Problem(f"the key '{key}' appears twice in one object", None)
        out[key] = value
    return out


def load_json(text: str, *, source: str) -> Any:
    """Parse a JSON document; SpecError with the line of any syntax error or duplicate key."""
    try:
        return _LineDecoder().decode(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"not valid JSON: {e.msg} (column {e.colno})", source=source,
                        line=e.lineno, hint="check for a missing comma, quote or bracket") from None
    except _Problem as e:
        raise SpecError(e.message, source=source, line=e.line) from None
    except RecursionError:
        raise SpecError("the JSON is nested too deeply", source=source) from None


def json_line(text: str, *, source: str, line: int) -> Any:
    """One line of a JSON Lines file."""
    try:
        return json.loads(text, object_pairs_hook=_json_pairs)
    except json.JSONDecodeError as e:
        raise SpecError(f"not valid JSON: {e.msg} (column {e.colno})", source=source,
                        line=line, hint="each line must be one complete JSON object") from None
    except _Problem as e:
        raise SpecError(e.message, source=source, line=line) from None
    except RecursionError:
        raise SpecError("the JSON is nested too deeply", source=source, line=line) from None


def load_yaml(text: str, *, source: str) -> Any:
    """Parse one YAML document; SpecError with the line of any problem.

    PyYAML loads only when a YAML file is read.
    """
    from jobfleet.spec.yamlfile import load_yaml as load

    return load(text, source=source)
