"""YAML job files: PyYAML that keeps values as written and remembers every line."""

from __future__ import annotations

from typing import Any

import yaml

from jobfleet.errors import SpecError
from jobfleet.spec.loaders import Located, LocatedList, _Problem

_NULL, _MERGE = "tag:yaml.org,2002:null", "tag:yaml.org,2002:merge"
_YamlBase: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _YamlLoader(_YamlBase):  # type: ignore[misc, valid-type]
    """SafeLoader that keeps scalars as written and builds Located mappings."""


_YamlLoader.yaml_implicit_resolvers = {
    first: kept
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    if (kept := [(tag, rx) for tag, rx in resolvers if tag in (_NULL, _MERGE)])
}


def _yaml_map(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Located:
    own = sum(1 for k, _ in node.value if k.tag != _MERGE)
    loader.flatten_mapping(node)
    merged = len(node.value) - own  # merged pairs come first and may be overridden
    out = Located()
    out.line = node.start_mark.line + 1
    own_keys: set[str] = set()
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        key_line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise _Problem(f"the key {key!r} is not text", key_line)
        if i >= merged:
            if key in own_keys:
                raise _Problem(f"the key '{key}' appears twice in this mapping", key_line)
            own_keys.add(key)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_line
    return out


def _yaml_seq(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> LocatedList:
    items = [loader.construct_object(child, deep=True) for child in node.value]
    return LocatedList(items, [child.start_mark.line + 1 for child in node.value])


_YamlLoader.add_constructor("tag:yaml.org,2002:map", _yaml_map)
_YamlLoader.add_constructor("tag:yaml.org,2002:seq", _yaml_seq)


def load_yaml(text: str, *, source: str) -> Any:
    """Parse one YAML document; SpecError with the line of any problem."""
    loader = _YamlLoader(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(p for p in (e.context, e.problem) if p)
        raise SpecError(f"not valid YAML: {problem}", source=source,
                        line=mark.line + 1 if mark else None,
                        hint="check the indentation, and quote values containing ': ' or '#'",
                        ) from None
    except yaml.YAMLError as e:
        raise SpecError(f"not valid YAML: {e}", source=source) from None
    except _Problem as e:
        raise SpecError(e.message, source=source, line=e.line) from None
    except RecursionError:
        raise SpecError("the YAML is nested too deeply", source=source) from None
    finally:
        loader.dispose()
