"""What ``--dtype auto`` means, for both engines: one pure rule plus the two facts it reads.

On a GPU ``auto`` keeps the checkpoint's dtype. On a CPU it is bfloat16 when the CPU has bf16
units (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo) and the checkpoint's weights are
bfloat16, else float32 (exact, and faster than emulated bf16). Measured on this machine's CPU
(docs/benchmarks.md, "node-dtype"): see ``choose_dtype``'s notes.
"""

from __future__ import annotations

import json
from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The bf16 unit flags this CPU reports (``cpuinfo``: the text of /proc/cpuinfo, for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return [f for f in BF16_CPU_FLAGS if f in flags]


def checkpoint_dtype(path: str) -> str | None:
    """The weights' dtype a local model folder's config.json states (None: unknown, e.g. a hub id)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


def choose_dtype(requested: str, *, on_cpu: bool, cpu_flags: list[str] | tuple[str, ...],
                 weights: str | None) -> str:
    """The dtype to load with: ``requested`` unless it is ``auto``; ``auto`` is the checkpoint's
    own on a GPU (returned as ``auto``), and on a CPU bfloat16 only when the CPU has bf16 units
    AND the weights are bfloat16 (no precision is lost that the checkpoint has), else float32."""
    if requested != "auto":
        return requested
    if not on_cpu:
        return "auto"
    if weights == "bfloat16" and any(f in BF16_CPU_FLAGS for f in cpu_flags):
        return "bfloat16"
    return "float32"


def resolve_dtype(requested: str, model_path: str, *, on_cpu: bool) -> str:
    """``choose_dtype`` on this machine's CPU flags and the model folder's stated weights dtype."""
    if requested != "auto" or not on_cpu:
        return choose_dtype(requested, on_cpu=on_cpu, cpu_flags=(), weights=None)
    return choose_dtype(requested, on_cpu=True, cpu_flags=cpu_bf16_flags(), weights=checkpoint_dtype(model_path))
