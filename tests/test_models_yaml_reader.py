"""The one YAML reader (engine/models/yaml_reader.py): hyperpyyaml tags become inert data, !ref is
resolved, nothing is imported or executed, bad text gives ConfigError."""
from __future__ import annotations

import sys
import time

import pytest

from stepvox.engine.errors import ConfigError
from stepvox.engine.models.yaml_reader import parse_inert_yaml, read_yaml
from stepvox.testing.cosyvoice import FULL_SIZES, TINY_SIZES, yaml_text


def test_tags_are_inert_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    text = (f"a: !apply:os.system ['touch {marker}']\n"
            f"b: !new:os.system\n    command: touch {marker}\n"
            "c: !name:subprocess.run {args: [ls]}\n"
            "d: !ref <e.f>\n"
            "e: {f: 3}\n"
            "g: !ref <e.f> * 2 + 1\n"
            "h: !ref <e.f>/path\n"
            "eps: 1e-06\n")
    data = parse_inert_yaml(text)
    assert not marker.exists()
    assert data["a"] == {"__tag__": "!apply", "__target__": "os.system", "__value__": [f"touch {marker}"]}
    assert data["b"] == {"__class__": "os.system", "command": f"touch {marker}"}
    assert data["c"]["__function__"] == "subprocess.run"
    assert data["d"] == 3 and data["g"] == 7 and data["h"] == "3/path"
    assert isinstance(data["eps"], float) and data["eps"] == 1e-6


@pytest.mark.parametrize("text,message", [
    ("flow: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "top level must be a mapping, got list"),
    ("a: !ref <missing>\n", "!ref <missing> points at nothing"),
    ("flow: {a: 1}\n  b: 2", "not valid YAML"),
])
def test_malformed_yaml(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_inert_yaml(text)


def test_tag_forms():
    data = parse_inert_yaml("a: !new:pkg.mod.Cls [1, 2]\n"
                            "b: !new:pkg.mod.Cls\n"
                            "c: !new:pkg.mod.Cls 5\n"
                            "d: !name:pkg.fn\n"
                            "e: !name:pkg.fn {x: 1}\n"
                            "f: !apply:random.seed [1986]\n")
    assert data["a"] == {"__class__": "pkg.mod.Cls", "__args__": [1, 2]}
    assert data["b"] == {"__class__": "pkg.mod.Cls"}
    assert data["c"] == {"__class__": "pkg.mod.Cls", "__args__": ["5"]}
    assert data["d"] == {"__function__": "pkg.fn"}
    assert data["e"] == {"__function__": "pkg.fn", "x": 1}
    assert data["f"] == {"__tag__": "!apply", "__target__": "random.seed", "__value__": [1986]}


def test_refs_resolve_through_chains_lists_and_copies():
    data = parse_inert_yaml("a: !ref <b>\n"
                            "b: !ref <c>\n"
                            "c: [1, 2, {d: 5}]\n"
                            "e: !ref <c[2].d>\n"
                            "f: !copy <c>\n"
                            "g: !ref <c[0]>\n"
                            "h: !new:pkg.Cls {size: !ref <e>}\n"
                            "i: !ref (<e> - 1) / 2\n"
                            "j: !ref <e>_<g>.txt\n")
    assert data["a"] == data["b"] == data["c"] == data["f"] == [1, 2, {"d": 5}]
    assert data["e"] == 5 and data["g"] == 1 and data["h"] == {"__class__": "pkg.Cls", "size": 5}
    assert data["i"] == 2 and data["j"] == "5_1.txt"
    with pytest.raises(ConfigError, match="cycle"):
        parse_inert_yaml("a: !ref <b>\nb: !ref <a>\n")
    with pytest.raises(ConfigError, match=r"!ref <c\[7\]> points at nothing"):
        parse_inert_yaml("c: [1]\nd: !ref <c[7]>\n")


def test_nothing_is_imported_or_evaluated(tmp_path):
    marker = tmp_path / "ran"
    name = "stepvox_yaml_probe_module"
    data = parse_inert_yaml(f"e: 3\n"
                            f"a: !ref <e> + __import__('os').system('touch {marker}')\n"
                            f"b: !new:{name}.Cls [1]\n"
                            f"c: !name:{name}.fn\n")
    assert data["a"] == f"3 + __import__('os').system('touch {marker}')"      # text, not evaluated
    assert data["b"]["__class__"] == f"{name}.Cls" and name not in sys.modules
    assert not marker.exists()
    # PyYAML's own python tags are not constructed either: the SafeLoader refuses them
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_inert_yaml(f"a: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_inert_yaml("a: !!python/name:os.system ''\n")
    assert not marker.exists()


def test_read_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("size: 4\ndouble: !ref <size> * 2\n", encoding="utf-8")
    assert read_yaml(path) == {"size": 4, "double": 8} == read_yaml(str(path))
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        read_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="bin.yaml: cannot read"):
        read_yaml(tmp_path / "bin.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="list.yaml: top level must be a mapping"):
        read_yaml(tmp_path / "list.yaml")
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- budgets: every input has a bounded cost
def _alias_bomb(depth: int = 9, fan: int = 9) -> str:
    """Billion laughs: each anchor a list of `fan` aliases of the one before (fan**depth leaves)."""
    lines = ["a0: &a0 [" + ", ".join([f'"{"lol" * 30}"'] * fan) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_fast():
    text = _alias_bomb()
    assert 1000 < len(text) < 4000           # ~3 KB that expands to 9**9 strings
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"visits more than 100000 nodes \(max_nodes\)"):
        parse_inert_yaml(text)
    assert time.perf_counter() - start < 0.5
    # the same shape through !ref instead of YAML aliases
    refs = "a0: [1, 2, 3, 4, 5, 6, 7, 8, 9]\n" + "".join(
        f"a{i}: [" + ", ".join([f"!ref <a{i - 1}>"] * 9) + "]\n" for i in range(1, 9))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="max_nodes"):
        parse_inert_yaml(refs)
    assert time.perf_counter() - start < 0.5
    # a small bomb fits a larger budget and expands as YAML says
    data = parse_inert_yaml(_alias_bomb(depth=3, fan=3), max_nodes=100)
    assert data["a2"] == [data["a1"]] * 3 and data["a1"] == [data["a0"]] * 3


@pytest.mark.parametrize("text,limits,message", [
    (_alias_bomb(depth=12, fan=10), {}, r"more than 100 YAML aliases \(max_aliases\)"),
    ("a: &x [1]\nb: [*x, *x, *x]\n", {"max_aliases": 2}, r"more than 2 YAML aliases \(max_aliases\)"),
    ("a: &a [*a]\n", {}, r"nested deeper than 64 levels \(max_depth\)"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", {}, r"nested deeper than 64 levels \(max_depth\)"),
    ("a: {b: {c: 1}}\n", {"max_depth": 2}, r"nested deeper than 2 levels \(max_depth\)"),
    ("a: " + "x" * 2000 + "\n", {"max_bytes": 1000}, r"larger than 1000 bytes \(max_bytes\)"),
    ("s: " + "x" * 1000 + "\n" + "".join(f"t{i}: !ref " + f"<t{i - 1}>" * 8 + "\n" for i in range(1, 8)).replace(
        "<t0>", "<s>"), {}, r"produces more than 65536 characters \(max_ref_text\)"),
    ("a: [1, 2]\nb: !ref <a>/x\n", {}, "!ref <a> inside text must point at a scalar, it points at a list"),
])
def test_limits_are_typed_errors_naming_the_limit(text, limits, message):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        parse_inert_yaml(text, "cfg.yaml", **limits)
    assert time.perf_counter() - start < 1.0


def test_released_configs_fit_the_default_budget(tmp_path):
    for sizes in (FULL_SIZES, TINY_SIZES):
        data = parse_inert_yaml(yaml_text(sizes))
        assert data["hift"]["sampling_rate"] == 22050 and data["flow"]["spk_embed_dim"] == 192
    # big-integer arithmetic in refs stays bounded: long products are left as text
    data = parse_inert_yaml("a: 99999\nb: !ref <a> * <a>\nc: !ref <b> * <b> * <b>\n")
    assert data["b"] == 99999 ** 2 and data["c"] == 99999 ** 6
    path = tmp_path / "big.yaml"
    path.write_text("a: 1\n" + "#" * 3000 + "\n")
    with pytest.raises(ConfigError, match=r"big.yaml: larger than 2000 bytes \(max_bytes\)"):
        read_yaml(path, max_bytes=2000)
    assert read_yaml(path) == {"a": 1}
    assert read_yaml(path, max_nodes=5) == {"a": 1}
