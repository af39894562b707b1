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


class _InertLoader(yaml.SafeLoader):
    """SafeLoader that keeps hyperpyyaml tags as plain dicts."""


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


def _resolve_refs(node, root, source: str, depth=0):
    if depth > 64:
        raise ConfigError(f"{source}: !ref chain too deep (cycle?)")
    if isinstance(node, _Ref):
        whole = _REF_KEY.fullmatch(node.text.strip())
        if whole:
            return _resolve_refs(_lookup(root, whole.group(1), source), root, source, depth + 1)
        text = _REF_KEY.sub(lambda m: str(_resolve_refs(_lookup(root, m.group(1), source), root, source, depth + 1)),
                            node.text)
        if _ARITH.match(text):
            try:
                return _safe_arith(text)
            except (ValueError, SyntaxError, ZeroDivisionError):
                pass
        return text
    if isinstance(node, dict):
        return {k: _resolve_refs(v, root, source, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_refs(v, root, source, depth) for v in node]
    return node


def parse_inert_yaml(text: str, source: str = "<yaml>") -> dict:
    """Parse (hyper)YAML text into plain dicts/lists/scalars; tags become inert dicts. ConfigError
    (naming `source`) when the text is not YAML or not a mapping at the top."""
    try:
        data = yaml.load(text, Loader=_InertLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    return _resolve_refs(data, data, source)


def read_yaml(path: str | os.PathLike) -> dict:
    """parse_inert_yaml of a file; ConfigError when it is missing or unreadable."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    return parse_inert_yaml(text, path)
