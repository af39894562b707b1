"""Every kernel op `stepvox bench kernels` can check and time, by name."""
from __future__ import annotations

from .bench_cases import KernelOp
from .bench_cases_audio import AUDIO_OPS
from .bench_cases_llm import LLM_OPS


def _by_name(ops: list[KernelOp]) -> dict[str, KernelOp]:
    table: dict[str, KernelOp] = {}
    for op in ops:
        if op.name in table:
            raise ValueError(f"kernel op {op.name!r} is listed twice")
        if set(op.small_shape) != set(op.default_shape):
            raise ValueError(f"{op.name}: small_shape and default_shape must name the same parameters")
        table[op.name] = op
    return dict(sorted(table.items()))


OPS: dict[str, KernelOp] = _by_name(LLM_OPS + AUDIO_OPS)


def get_op(name: str) -> KernelOp:
    if name not in OPS:
        raise KeyError(f"no kernel op {name!r}; the ops are {', '.join(OPS)}")
    return OPS[name]
