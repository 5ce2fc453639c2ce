"""A bounded, safe YAML loader for the shard map.

``yaml.safe_load`` already refuses tags that construct Python objects, but it recurses once per
nesting level (5,000 nested lists end in a RecursionError), lets an alias bomb ("billion laughs")
expand into an exponential tree for whoever walks it next, and keeps the last of two duplicate
keys without a word. :func:`load` composes the document with :class:`BoundedLoader`, which

- refuses nesting deeper than :data:`MAX_DEPTH` while composing (before Python's stack is at risk);
- refuses more than :data:`MAX_ALIASES` aliases, and a document whose tree, with every alias
  expanded, would hold more than :data:`MAX_NODES` nodes (counted on the composed graph, with each
  node's expanded size computed once, so the check itself is linear in the file);
- refuses a duplicate key in a mapping, naming its path and both lines;
- accepts only the tags of YAML's core schema that produce plain data (str, int, float, bool,
  null, list, dict; ``!!binary``, ``!!timestamp``, ``!!set``, ``!!omap`` and every ``!custom`` or
  ``!!python/...`` tag are refused by name).

Every refusal is a :class:`YamlLimit` (a ``yaml.YAMLError``) with a one-line message that names
the key path and the line.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_DEPTH = 64
MAX_ALIASES = 1000
MAX_NODES = 200_000
MAX_BYTES = 4 * 1024 * 1024

_PLAIN_TAGS = frozenset("tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "seq", "map",
                                                            "merge"))

#: keys of a shard map are names: a key YAML reads as a number, boolean or null is refused
_NOT_NAMES = frozenset("tag:yaml.org,2002:" + t for t in ("int", "float", "bool", "null"))


class YamlLimit(yaml.YAMLError):
    """A document refused before it is turned into Python data; ``str()`` is one line."""


def _where(node: Node) -> str:
    return f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"


def _key_text(node: ScalarNode | SequenceNode | MappingNode) -> str:
    return str(node.value) if isinstance(node, ScalarNode) else f"<{node.id} key>"


_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that bounds nesting depth and aliases while composing. A plain scalar that
    looks like a date (``2026-01-01``) stays a string: no key of the map takes a date."""

    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _TIMESTAMP]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    # index: what types-PyYAML declares (PyYAML passes a mapping's key node too; it is only passed on)
    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise YamlLimit(f"more than {MAX_ALIASES} aliases (line {mark.line + 1}): refused")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlLimit(f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1}, column "
                                f"{mark.column + 1}): refused")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def check_graph(root: Node, loader: yaml.SafeLoader) -> None:
    """Refuse unknown tags, bad scalars, duplicate keys, cycles, and a tree too big or too deep
    once aliases are expanded. Each node is looked at once (its expanded size and height are
    remembered), so an alias bomb is refused in time linear in the file."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values below, height), once complete
    active: set[int] = set()

    def visit(node: Node, path: str) -> tuple[int, int]:
        if id(node) in done:
            return done[id(node)]
        where = path or "<top>"
        if id(node) in active:
            raise YamlLimit(f"{where}: an alias refers to a node that contains it ({_where(node)}): refused")
        if node.tag not in _PLAIN_TAGS:
            raise YamlLimit(f"{where}: tag {node.tag!r} ({_where(node)}) is not allowed in a shard map "
                            "(only plain strings, numbers, booleans, null, lists and mappings)")
        size, height = 1, 0
        active.add(id(node))
        if isinstance(node, ScalarNode):
            if node.tag.endswith(":merge"):
                pass  # `<<`: SafeLoader folds the merged mappings in while constructing
            else:
                try:
                    loader.construct_object(node)
                except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
                    raise YamlLimit(f"{where}: cannot read {node.value[:40]!r} as {node.tag.rsplit(':', 1)[-1]} "
                                    f"({_where(node)}): {str(exc)[:100]}") from None
        elif isinstance(node, SequenceNode):
            for i, child in enumerate(node.value):
                s, h = visit(child, f"{path}[{i}]")
                size, height = size + s, max(height, h + 1)
        elif isinstance(node, MappingNode):
            seen: dict[str, Node] = {}
            for key, value in node.value:
                text = _key_text(key)
                if isinstance(key, ScalarNode) and key.tag in _NOT_NAMES:
                    raise YamlLimit(f"{_join(path, text)}: the key {text!r} ({_where(key)}) reads as "
                                    f"{key.tag.rsplit(':', 1)[-1]}, not as a name (quote it if it is one)")
                if not key.tag.endswith(":merge"):
                    if text in seen:
                        raise YamlLimit(f"{_join(path, text)}: duplicate key {text!r} ({_where(key)}; "
                                        f"first at {_where(seen[text])})")
                    seen[text] = key
                ks, kh = visit(key, path)
                vs, vh = visit(value, _join(path, text))
                size, height = size + ks + vs, max(height, kh + 1, vh + 1)
        active.discard(id(node))
        if size > MAX_NODES:
            raise YamlLimit(f"{where}: expands to more than {MAX_NODES:,} values through aliases "
                            f"({_where(node)}): refused")
        if height > MAX_DEPTH:
            raise YamlLimit(f"{where}: nested deeper than {MAX_DEPTH} levels once aliases are expanded "
                            f"({_where(node)}): refused")
        done[id(node)] = (size, height)
        return size, height

    visit(root, "")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def load(text: str) -> Any:
    """One YAML document as plain data, within the limits above. Raises ``yaml.YAMLError``."""
    if len(text) > MAX_BYTES:
        raise YamlLimit(f"larger than {MAX_BYTES // (1024 * 1024)} MiB: refused")
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_graph(node, loader)
        return loader.construct_document(node)
    finally:
        loader.dispose()
