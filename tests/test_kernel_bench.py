"""`stepvox bench kernels` (python/stepvox/kernel_bench.py) on the CPU: the catalogue lists every
kernel module's ops, each op's check runs under the interpreter and passes, shapes and names are
checked, and the command's exit code says whether every check passed. Timing, rates, peaks and NVML
samples are GPU work (rows on the CPU carry none)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from stepvox import kernel_bench
from stepvox.kernels.catalog import OPS


def _cli(args, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", TMPDIR=str(tmp_path))
    return subprocess.run([sys.executable, "-m", "stepvox.cli", "bench", "kernels", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_catalogue_covers_every_kernel_module():
    modules = {op.module for op in OPS.values()}
    kernel_dir = os.path.dirname(sys.modules["stepvox.kernels"].__file__)
    helpers = {"__init__", "backend", "pdl", "alibi", "attention_common", "fp8", "bench_cases", "bench_cases_llm",
               "bench_cases_audio", "catalog"}
    files = {f[:-3] for f in os.listdir(kernel_dir) if f.endswith(".py")} - helpers
    assert files <= modules, f"kernel modules without an op: {sorted(files - modules)}"


def test_parse_shape():
    assert kernel_bench.parse_shape("batch=16, context=4096") == {"batch": 16, "context": 4096}
    assert kernel_bench.parse_shape(None) == {}
    for bad in ("batch", "batch=x", "batch=1.5"):
        with pytest.raises(ValueError, match="name=integer"):
            kernel_bench.parse_shape(bad)


def test_run_checks_ops_on_the_cpu_without_timing_them():
    result = kernel_bench.run(["rms_norm", "attention_decode"], None, "fp32", torch.device("cpu"), small=True)
    assert result["device"] == "cpu" and result["peaks"] is None
    assert [r["op"] for r in result["rows"]] == ["rms_norm", "attention_decode"]
    for row in result["rows"]:
        assert row["ok"] and row["max_abs_err"] < 1e-3 and row["bytes"] > 0 and "us" not in row
    with kernel_bench.NvmlSampler(torch.device("cpu")) as nvml:
        pass
    assert nvml.summary() == {"power_w": None, "sm_clock_mhz": None}
    with pytest.raises(ValueError, match="--shape applies to one --op"):
        kernel_bench.run(["rms_norm", "argmax_rows"], "rows=3", "fp32", torch.device("cpu"), small=True)


def test_the_command_lists_checks_and_refuses(tmp_path):
    listed = _cli(["--list"], tmp_path)
    assert listed.returncode == 0 and len(listed.stdout.strip().splitlines()) == len(OPS)
    out = tmp_path / "rows.json"
    proc = _cli(["--op", "attention_decode", "--shape", "context=50,kv_fp8=1", "--dtype", "fp32",
                 "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["shape"]["context"] == 50 and rows[0]["shape"]["kv_fp8"] == 1 and rows[0]["ok"]
    assert "attention_decode | float32 | True" in proc.stdout
    bad = _cli(["--op", "nope"], tmp_path)
    assert bad.returncode == 2 and "no kernel op 'nope'; the ops are" in bad.stderr
    bad = _cli(["--op", "attention_decode", "--shape", "ctx=5"], tmp_path)
    assert bad.returncode == 2 and "has no shape parameter 'ctx'" in bad.stderr
