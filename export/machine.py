"""What machine a figure came from: CPU model, vector extensions, cores.

Timings and even accuracies (float32 reduction order, oneDNN kernel choice) depend on the CPU, so every report and
every benchmark prints this block beside its numbers, and the README names the machine of each figure. Read from
``/proc/cpuinfo`` on Linux (the flags line lists the instruction-set extensions the kernel saw); elsewhere from
:mod:`platform`, with the extensions left empty rather than guessed.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["VECTOR_EXTENSIONS", "describe_machine", "machine_info"]

#: The SIMD extensions that decide which kernels oneDNN, XNNPACK, MLAS and ATen pick, widest last per family.
VECTOR_EXTENSIONS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",  # aarch64 NEON
    "asimddp",
    "sve",
    "sve2",
)


def _cpuinfo(path: Path) -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as a dict (later blocks repeat it on every machine we target)."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def machine_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """``{"cpu_model", "vector_extensions", "logical_cpus", "usable_cpus", "machine", "system"}``, JSON-ready."""
    fields = _cpuinfo(cpuinfo)
    model = fields.get("model name") or fields.get("cpu model") or fields.get("hardware") or platform.processor()
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu_model": model or "unknown",
        "vector_extensions": [ext for ext in VECTOR_EXTENSIONS if ext in flags],
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "machine": platform.machine(),
        "system": platform.system(),
    }


def describe_machine(info: dict[str, Any] | None = None) -> str:
    """One line for logs and benchmark headers, e.g. ``AMD EPYC 7B13 (x86_64, 2 CPUs; sse4_2 avx avx2 fma f16c)``."""
    info = info if info is not None else machine_info()
    extensions = " ".join(info["vector_extensions"]) or "extensions unknown"
    return f"{info['cpu_model']} ({info['machine']}, {info['usable_cpus']} CPUs; {extensions})"
