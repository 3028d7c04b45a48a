"""A second instruction set on one machine: cap the ISA the frameworks dispatch their kernels to (issue #14).

oneDNN, PyTorch's ATen and XLA:CPU pick their kernels at run time from the CPU's features, and each has a
documented cap, read once when the library first runs a kernel (so it is set before TF, torch or JAX import):

- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN 3.x (TF's fused BN kernel and convolutions, torch's mkldnn ops);
  ``ONEDNN_VERBOSE=1`` then prints ``isa:Intel AVX2`` and ``bnorm_tbb_jit:avx2`` where it printed ``avx512_core``.
- ``ATEN_CPU_CAPABILITY=avx2``: PyTorch's ATen kernels (``torch.nn`` BN); ``torch.backends.cpu.get_cpu_capability()``
  then says ``AVX2``.
- ``XLA_FLAGS=--xla_cpu_max_isa=AVX2``: XLA:CPU (TF ``jit_compile=True``, JAX); XLA logs "`xla_cpu_max_isa` is set.
  Will not use features newer than: AVX2".

TensorFlow's own (Eigen) kernels are compiled for a fixed baseline and ignore the cap: TF 2.21's startup message
lists AVX2 and FMA among the instructions it does *not* use "in other operations", so they run AVX code on every
machine. ``tests/test_bench_isa.py`` checks that each cap takes effect.

What a cap emulates: the kernels an AVX2-only x86 CPU gets (vector width 256 bits, no AVX-512 or AMX paths). What it
does not emulate: the cores (clock, ports, latencies), caches, memory bandwidth and core count stay this machine's.
So a capped run says how the *choice of kernels* moves a result, not how an AVX2 machine performs; it is always
described as "<this CPU> capped to AVX2 by ...", never as an AVX2 machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["ISAS", "apply_isa", "describe_isa", "isa_environment", "isa_record"]

#: ``--isa`` choice -> environment variables that cap each library at it ("native": no cap).
ISAS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"},
}
#: The widest extension per cap: a CPU without it is not capped by it (the run is then native).
_ABOVE_CAP = {"avx2": ("avx512f", "amx_tile")}
UNCAPPED_KERNELS = "TF's Eigen kernels keep their fixed build baseline (AVX)"
SAME_HARDWARE = "same cores, caches and memory bandwidth"


def isa_environment(isa: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) with the cap of ``isa`` added; an existing ``XLA_FLAGS`` is kept."""
    if isa not in ISAS:
        raise ValueError(f"--isa must be one of {', '.join(ISAS)}; got {isa!r}")
    env = dict(os.environ if environ is None else environ)
    for name, value in ISAS[isa].items():
        env[name] = f"{env[name]} {value}" if name == "XLA_FLAGS" and env.get(name) else value
    return env


def apply_isa(isa: str) -> None:
    """Cap this process at ``isa``; call it before TensorFlow, torch or JAX is imported (they read it once)."""
    os.environ.update(isa_environment(isa))


def isa_record(isa: str, machine: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready: the cap, its variables, whether the CPU had anything above it, and what it does not change."""
    extensions = set(machine.get("vector_extensions") or [])
    return {
        "isa": isa,
        "variables": dict(ISAS[isa]),
        "capped": bool(ISAS[isa]) and bool(extensions & set(_ABOVE_CAP.get(isa, ()))),
        "unchanged": f"{UNCAPPED_KERNELS}; {SAME_HARDWARE}",
    }


def describe_isa(record: Mapping[str, Any], machine_line: str) -> str:
    """``machine_line`` as run: native, or "capped to AVX2 by ..." (never presented as another machine)."""
    if not record["variables"]:
        return f"{machine_line}, native ISA"
    how = ", ".join(f"{name}={value}" for name, value in record["variables"].items())
    if not record["capped"]:
        return f"{machine_line}, which has nothing above {record['isa'].upper()}: the cap ({how}) changes nothing"
    return (
        f"{machine_line} capped to {record['isa'].upper()} by {how} ({record['unchanged']}: "
        f"not an {record['isa'].upper()} machine)"
    )
