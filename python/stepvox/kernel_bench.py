"""`stepvox bench kernels`: check and time any kernel op on its own (kernels/catalog.py lists them).

For each op: its case at the chosen shape and dtype; the Triton result against the reference
(max abs error, within the case's tolerance or not); on a GPU, the median time of one call
(triton.testing.do_bench: warm L2, each call after the last), the achieved TF/s and GB/s and their
fractions of this card's peaks measured in the same run (a bf16 cuBLAS product of 8192^3 and a
device-to-device copy of 2 GiB, bytes read + written), and the board power and SM clock sampled
through NVML while the op runs. Each op's calls sit in an NVTX range named `stepvox.<op>`, so
`nsys profile` / `ncu --nvtx --nvtx-include "stepvox.<op>/"` can target one op. On the CPU only the
check runs (the Triton interpreter: set TRITON_INTERPRET=1 before starting).
"""
from __future__ import annotations

import dataclasses
import threading
import time

import pynvml
import torch
import triton.testing

from stepvox.kernels.bench_cases import KernelOp
from stepvox.kernels.catalog import OPS, get_op

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_shape(text: str | None) -> dict[str, int]:
    """"batch=16,context=4096" -> {"batch": 16, "context": 4096}."""
    shape: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            shape[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--shape takes name=integer pairs separated by commas, got {part!r}") from None
    return shape


@dataclasses.dataclass
class Peaks:
    matmul_tflops: float
    copy_gbs: float


def matmul_tflops(device: torch.device) -> float:
    """This card's bf16 rate on an 8192^3 cuBLAS product (median of timed repeats)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / (triton.testing.do_bench(lambda: a @ b, return_mode="median") * 1e-3) / 1e12


def copy_bandwidth_gbs(device: torch.device) -> float:
    """This card's device-to-device copy of 2 GiB, bytes read + written counted (median)."""
    src = torch.empty(1 << 30, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    seconds = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def measure_peaks(device: torch.device) -> Peaks:
    return Peaks(matmul_tflops=matmul_tflops(device), copy_gbs=copy_bandwidth_gbs(device))


class NvmlSampler:
    """Board power (W) and SM clock (MHz) sampled every `period` s in a thread while in the block;
    `summary()` gives their medians (None where NVML is missing or refuses)."""

    def __init__(self, device: torch.device, period: float = 0.01):
        self.period, self.power, self.clock = period, [], []
        self.handle = None
        if device.type == "cuda":
            try:
                pynvml.nvmlInit()
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception:  # noqa: BLE001 - no NVML (driver, container): report no samples
                self.handle = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.power.append(pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3)
                self.clock.append(pynvml.nvmlDeviceGetClockInfo(self.handle, pynvml.NVML_CLOCK_SM))
            except Exception:  # noqa: BLE001 - a failed read skips this sample
                pass
            time.sleep(self.period)

    def __enter__(self):
        if self.handle is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict[str, float | None]:
        def median(xs):
            return float(sorted(xs)[len(xs) // 2]) if xs else None
        return {"power_w": median(self.power), "sm_clock_mhz": median(self.clock)}


def bench_op(op: KernelOp, shape: dict[str, int], dtype: torch.dtype, device: torch.device, peaks: Peaks | None,
             seed: int = 0) -> dict:
    """One op's row: check, and on a GPU its time, rates, fractions of the peaks, power and clock."""
    if dtype not in op.dtypes:
        raise ValueError(f"{op.name} runs in {', '.join(str(d).removeprefix('torch.') for d in op.dtypes)}, "
                         f"not {str(dtype).removeprefix('torch.')}")
    case = op.make(shape, device, dtype, torch.Generator().manual_seed(seed))
    got, want = case.compare()
    diff = (got.float() - want.float()).abs()
    row = dict(op=op.name, module=op.module, dtype=str(dtype).removeprefix("torch."), shape=shape,
               max_abs_err=float(diff.max()) if diff.numel() else 0.0,
               ok=bool(torch.allclose(got.float(), want.float(), atol=case.atol, rtol=case.rtol)),
               flops=case.flops, bytes=case.bytes)
    if device.type != "cuda":
        return row
    with torch.cuda.nvtx.range(f"stepvox.{op.name}"), NvmlSampler(device) as nvml:
        seconds = triton.testing.do_bench(case.run, return_mode="median") * 1e-3
    row.update(us=seconds * 1e6, tflops=case.flops / seconds / 1e12, gbs=case.bytes / seconds / 1e9, **nvml.summary())
    if peaks is not None:
        row.update(tflops_of_peak=row["tflops"] / peaks.matmul_tflops, gbs_of_peak=row["gbs"] / peaks.copy_gbs)
    return row


def run(names: list[str] | None, shape_text: str | None, dtype_name: str, device: torch.device,
        small: bool) -> dict:
    """Rows for the named ops (all when None) and the peaks they are measured against."""
    ops = [get_op(n) for n in names] if names else list(OPS.values())
    overrides = parse_shape(shape_text)
    if overrides and len(ops) != 1:
        raise ValueError("--shape applies to one --op")
    dtype = DTYPES[dtype_name]
    peaks = measure_peaks(device) if device.type == "cuda" else None
    rows = []
    for op in ops:
        use = dtype if dtype in op.dtypes else op.dtypes[0]      # an op without this dtype runs in its first
        rows.append(bench_op(op, op.shape(overrides, small=small), use, device, peaks))
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "peaks": dataclasses.asdict(peaks) if peaks else None, "rows": rows}


def format_rows(rows: list[dict]) -> str:
    cols = ["op", "dtype", "ok", "max_abs_err", "us", "tflops", "gbs", "tflops_of_peak", "gbs_of_peak", "power_w",
            "sm_clock_mhz"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)
    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
