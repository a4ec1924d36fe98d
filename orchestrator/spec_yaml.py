"""Reading a spec's YAML safely: :func:`load_yaml`.

PyYAML's ``SafeLoader`` never runs code, but on its own it still accepts three things a
spec must not have: a key repeated in one mapping (the last one silently wins), an
alias bomb (a few lines of ``&anchor`` / ``*alias`` that expand to billions of nodes)
and nesting deep enough to end its recursive composer in a ``RecursionError``. The
loader here refuses each with a one-line :class:`~orchestrator.errors.SpecError`, and
:func:`load_yaml` turns every YAML syntax error into one too.
"""

from __future__ import annotations

from typing import Any

import yaml

from orchestrator.errors import SpecError

__all__ = ["MAX_YAML_DEPTH", "MAX_YAML_NODES", "load_yaml"]

MAX_YAML_NODES = 100_000  # a real spec has hundreds; an alias bomb has billions
MAX_YAML_DEPTH = 50  # a real spec nests under 10 levels


def load_yaml(text: str) -> Any:
    """The document in *text* (None when it is empty), read with the bounds above.

    Raises :class:`SpecError` naming the line and column of a syntax error.
    """
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and cmark is not None and (mark is None or cmark.line != mark.line):
            problem += f" ({context} started at line {cmark.line + 1}, column {cmark.column + 1})"
        raise SpecError(f"spec is not valid YAML{where}: {' '.join(problem.split())} -- fix the syntax") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: SafeLoader reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once per mapping)", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # PyYAML composes recursively: thousands of nested '[' would end in a RecursionError
        # (an "internal error"), so the nesting is bounded while it is read.
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise SpecError(f"spec nests deeper than {MAX_YAML_DEPTH} levels (at line {mark.line + 1}, column "
                                f"{mark.column + 1}) -- a spec needs a few levels; flatten the structure")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise SpecError(f"spec expands to {size:,} YAML nodes through its aliases (&anchor / *alias), over "
                            f"{MAX_YAML_NODES:,} -- write the values out instead of nesting aliases")
        depth = _expanded_depth(node)
        if depth > MAX_YAML_DEPTH:
            raise SpecError(f"spec nests {depth} levels deep through its aliases (&anchor / *alias), over "
                            f"{MAX_YAML_DEPTH} -- write the values out instead of nesting aliases")
        return self.construct_document(node)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _expanded_depth(root: yaml.Node) -> int:
    """Nesting depth of *root* once every alias is expanded, computed iteratively (an
    alias chain can nest far deeper than the text does) without expanding anything."""
    memo: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            memo[id(node)] = 1 + max((memo.get(id(c), 1) for c in _children(node)), default=0)
        elif id(node) not in memo:
            memo[id(node)] = 1  # provisional: a recursive alias counts once rather than looping
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in memo)
    return memo[id(root)]


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes *node* stands for once every alias is expanded (shared nodes counted each
    time they are referenced), computed without expanding anything."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once rather than looping
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        total = 1
    memo[key] = min(total, 10 * MAX_YAML_NODES)
    return memo[key]
