"""The `stepvox` command end to end, as the README runs it: no model given -> a tiny random
checkpoint is written, generation runs and throughput is reported; `stepvox plan` prints the table."""
import os
import re
import subprocess
import sys


def _run(args, tmp_path):
    # a fresh shell has no TRITON_INTERPRET (conftest sets it for this process): "auto" picks the
    # reference kernels on the CPU, as on a machine without a GPU
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "stepvox.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_generate_on_the_embedded_default(tmp_path):
    proc = _run(["generate", "--device", "cpu", "--max-tokens", "6", "--batch", "2", "--ignore-eos"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "tiny random-weight Step1 checkpoint written to" in out
    assert os.path.isfile(tmp_path / "stepvox-tiny-step1" / "model.safetensors.index.json")
    assert out.count("-> 6 tokens (length)") == 2
    rate = re.search(r"([\d.]+) generated tokens/s", out)
    assert rate and float(rate.group(1)) > 0


def test_plan_prints_the_chat_model_table(tmp_path):
    proc = _run(["plan", "--tp", "4", "8"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| 4 | 61.4 GiB |" in proc.stdout and "| 8 | 30.7 GiB |" in proc.stdout
