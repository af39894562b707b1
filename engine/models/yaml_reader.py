"""Config files as plain data, never running anything: the one YAML reader of the engine
(cosyvoice.yaml of the speech decoder, the Paraformer's config.yaml).

The CosyVoice file is written for hyperpyyaml: `!new:pkg.Class` builds an object, `!name:pkg.fn` a
partial, `!ref <key>` points at another entry, `!apply:fn` calls a function at load time. Here a
SafeLoader turns every tag into inert data instead:

  !new:X  mapping -> {"__class__": "X", **mapping}      (a sequence goes to "__args__")
  !name:X mapping -> {"__function__": "X", **mapping}
  !ref <a.b>      -> the referenced value (resolved after parsing; text around refs is kept as text)
  any other tag   -> {"__tag__": "!apply", "__target__": "fn", "__value__": ...}  (never executed)

Classes named in a file are never imported.
"""
from __future__ import annotations

import ast
import operator
import os
import re

import yaml

from ..errors import ConfigError


MAX_YAML_BYTES = 1 << 20        # the released configs are a few KB
MAX_YAML_ALIASES = 100          # they use !ref, not YAML aliases
MAX_YAML_DEPTH = 64             # they nest ~6 deep
MAX_YAML_NODES = 100_000        # nodes visited while resolving; they visit a few hundred
MAX_REF_TEXT = 1 << 16          # characters produced by !ref inside text (paths, names)
_MAX_ARITH_CHARS = 256          # longer "!ref <a> * <b>" text is left as text (bounds big-int work)


class _Budget:
    """What one parse may spend; every refusal names the limit (and the argument that sets it)."""

    def __init__(self, source: str, max_aliases: int, max_depth: int, max_nodes: int, max_ref_text: int):
        self.source = source
        self.max_aliases, self.max_depth, self.max_nodes, self.max_ref_text = \
            max_aliases, max_depth, max_nodes, max_ref_text
        self.aliases = self.nodes = self.ref_text = 0

    def alias(self) -> None:
        self.aliases += 1
        if self.aliases > self.max_aliases:
            raise ConfigError(f"{self.source}: more than {self.max_aliases} YAML aliases (max_aliases)")

    def depth(self, depth: int) -> None:
        if depth > self.max_depth:
            raise ConfigError(f"{self.source}: nested deeper than {self.max_depth} levels (max_depth)")

    def visit(self) -> None:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise ConfigError(f"{self.source}: resolving aliases and !ref visits more than {self.max_nodes} "
                              "nodes (max_nodes): an alias or reference bomb?")

    def text(self, chars: int) -> None:
        self.ref_text += chars
        if self.ref_text > self.max_ref_text:
            raise ConfigError(f"{self.source}: !ref inside text produces more than {self.max_ref_text} "
                              "characters (max_ref_text)")


class _InertLoader(yaml.SafeLoader):
    """SafeLoader that keeps hyperpyyaml tags as plain dicts and counts aliases and depth."""

    def __init__(self, stream, budget: _Budget):
        super().__init__(stream)
        self.budget = budget
        self.depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.budget.alias()
        self.depth += 1
        self.budget.depth(self.depth)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


# YAML 1.1 needs a dot in a float ("1e-06" would stay a string); hyperpyyaml (YAML 1.2) reads it as
# a float, so accept exponent-only numbers too.
_InertLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _node_value(loader, node):
    if isinstance(node, yaml.MappingNode):
        return "mapping", loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return "sequence", loader.construct_sequence(node, deep=True)
    return "scalar", loader.construct_scalar(node)


def _tagged(tag_key: str, suffix: str, kind: str, value, scalar_is_arg: bool) -> dict:
    out = {tag_key: suffix}
    if kind == "mapping":
        out.update(value)
    elif kind == "sequence":
        out["__args__"] = value
    elif scalar_is_arg and value not in ("", None):
        out["__args__"] = [value]
    return out


def _construct_new(loader, suffix, node):
    return _tagged("__class__", suffix, *_node_value(loader, node), scalar_is_arg=True)


def _construct_name(loader, suffix, node):
    return _tagged("__function__", suffix, *_node_value(loader, node), scalar_is_arg=False)


class _Ref:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


def _construct_ref(loader, node):
    return _Ref(str(loader.construct_scalar(node)))


def _construct_other(loader, suffix, node):
    tag, _, target = ("!" + suffix).partition(":")
    _, value = _node_value(loader, node)
    return {"__tag__": tag, "__target__": target, "__value__": value}


_InertLoader.add_multi_constructor("!new:", _construct_new)
_InertLoader.add_multi_constructor("!name:", _construct_name)
_InertLoader.add_constructor("!ref", _construct_ref)
_InertLoader.add_constructor("!copy", _construct_ref)
_InertLoader.add_multi_constructor("!", _construct_other)

_REF_KEY = re.compile(r"<([^<>]+)>")
_ARITH = re.compile(r"^[\d\s.eE+\-*/()]+$")


def _lookup(root: dict, key: str, source: str):
    node = root
    for part in re.split(r"\.|\[|\]", key):
        if part == "":
            continue
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ConfigError(f"{source}: !ref <{key}> points at nothing")
    return node


def _safe_arith(text: str):
    """Evaluate + - * / on number literals only (hyperpyyaml allows `!ref <a> * 2`)."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos}

    def ev(n):
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            return ops[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and type(n.op) in ops:
            return ops[type(n.op)](ev(n.operand))
        raise ValueError(text)

    return ev(ast.parse(text, mode="eval").body)


def _interpolated(value, key: str, budget: _Budget) -> str:
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{budget.source}: !ref <{key}> inside text must point at a scalar, it points at a "
                          f"{type(value).__name__}")
    try:
        piece = str(value)
    except ValueError as exc:          # an integer past Python's digit limit
        raise ConfigError(f"{budget.source}: !ref <{key}>: {exc}") from None
    budget.text(len(piece))
    return piece


def _resolve_refs(node, root, budget: _Budget, hops: int = 0, level: int = 0):
    """A copy of `node` with every !ref replaced by its value. `hops` counts the chain of refs
    being followed, `level` the nesting; every node visited is charged to the budget."""
    budget.visit()
    if hops > 64:
        raise ConfigError(f"{budget.source}: !ref chain too deep (cycle?)")
    budget.depth(level)
    if isinstance(node, _Ref):
        whole = _REF_KEY.fullmatch(node.text.strip())
        if whole:
            return _resolve_refs(_lookup(root, whole.group(1), budget.source), root, budget, hops + 1, level)
        text = _REF_KEY.sub(lambda m: _interpolated(
            _resolve_refs(_lookup(root, m.group(1), budget.source), root, budget, hops + 1, level),
            m.group(1), budget), node.text)
        budget.text(len(text))
        if len(text) <= _MAX_ARITH_CHARS and _ARITH.match(text):
            try:
                return _safe_arith(text)
            except (ValueError, SyntaxError, ZeroDivisionError, OverflowError):
                pass
        return text
    if isinstance(node, dict):
        return {k: _resolve_refs(v, root, budget, hops, level + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_refs(v, root, budget, hops, level + 1) for v in node]
    return node


def parse_inert_yaml(text: str, source: str = "<yaml>", *, max_bytes: int = MAX_YAML_BYTES,
                     max_aliases: int = MAX_YAML_ALIASES, max_depth: int = MAX_YAML_DEPTH,
                     max_nodes: int = MAX_YAML_NODES, max_ref_text: int = MAX_REF_TEXT) -> dict:
    """Parse (hyper)YAML text into plain dicts/lists/scalars; tags become inert dicts. ConfigError
    (naming `source`) when the text is not YAML, not a mapping at the top, or exceeds a limit:
    `max_bytes` of UTF-8 text, `max_aliases` YAML aliases, `max_depth` nesting levels,
    `max_nodes` nodes visited while resolving aliases and !ref, `max_ref_text` characters made
    by !ref inside text. The limits bound the time and memory of any input (an alias bomb is
    refused in milliseconds)."""
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ConfigError(f"{source}: larger than {max_bytes} bytes (max_bytes)")
    budget = _Budget(source, max_aliases, max_depth, max_nodes, max_ref_text)
    loader = _InertLoader(text, budget)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    return _resolve_refs(data, data, budget)


def read_yaml(path: str | os.PathLike, *, max_bytes: int = MAX_YAML_BYTES, **limits) -> dict:
    """parse_inert_yaml of a file (same limits; a file over `max_bytes` is refused from its size,
    unread); ConfigError when it is missing or unreadable."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_size > max_bytes:
                raise ConfigError(f"{path}: larger than {max_bytes} bytes (max_bytes)")
            text = f.read(max_bytes + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    return parse_inert_yaml(text, path, max_bytes=max_bytes, **limits)


# ---------------------------------------------------------------- typed fields of a parsed config
def mapping_field(data: dict, key: str, where: str) -> dict:
    """`data[key]` as a mapping ({} when absent); ConfigError naming the key otherwise."""
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: `{key}` must be a mapping, got {value!r}")
    return value


def int_field(node: dict, section: str, key: str, default: int, where: str, minimum: int = 1) -> int:
    """`node[key]` (default when absent) as an integer >= minimum; ConfigError naming section.key."""
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: `{section}.{key}` must be an integer >= {minimum}, got {value!r}")
    return value


def number_field(node: dict, section: str, key: str, default: float, where: str, low: float, high: float) -> float:
    """`node[key]` (default when absent) as a float in [low, high]; ConfigError naming section.key."""
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{where}: `{section}.{key}` must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)
