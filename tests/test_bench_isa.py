"""bench/_isa.py's ISA cap takes effect in each library and is recorded as a cap, never as another machine.

The oracles are the libraries' own reports of what they dispatched to: oneDNN's verbose log, ATen's
``get_cpu_capability`` and XLA's compiler log. Nothing here is timed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _isa import describe_isa, isa_environment, isa_record  # noqa: E402  (bench/_isa.py)

XEON = {"cpu_model": "Xeon", "vector_extensions": ["avx", "avx2", "fma", "avx512f", "amx_tile"]}
EPYC = {"cpu_model": "EPYC", "vector_extensions": ["avx", "avx2", "fma"]}

_PROBE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "bench")
    from _isa import apply_isa
    apply_isa("avx2")
    import torch
    print("ATEN", torch.backends.cpu.get_cpu_capability(), flush=True)
    import tensorflow as tf

    @tf.function
    def fused(x):  # oneDNN serves FusedBatchNormV3; 16 channels take its widest kernel (avx512_core uncapped)
        y, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=tf.ones([16]), offset=tf.zeros([16]), mean=tf.zeros([0]), variance=tf.zeros([0]),
            epsilon=1e-3, exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
        return y

    fused(tf.ones([2, 2, 2, 16]))
    print(float(tf.function(lambda x: tf.reduce_sum(x * x), jit_compile=True)(tf.ones([4, 4]))), flush=True)
    """
)


@pytest.fixture(scope="module")
def capped_process_log() -> str:
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the caps are x86 ISAs")
    pytest.importorskip("torch")
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "cpu_compiler=1"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.mark.slow  # one subprocess importing torch and TensorFlow and compiling with XLA: ~6-14 s
@pytest.mark.parametrize(
    "evidence",
    [
        pytest.param("onednn_verbose,v1,info,cpu,isa:Intel AVX2\n", id="oneDNN-max-isa"),
        pytest.param("batch_normalization,bnorm_tbb_jit:avx2,forward_training", id="oneDNN-fused-bn-kernel"),
        pytest.param("ATEN AVX2\n", id="ATen-cpu-capability"),
        pytest.param("Will not use features newer than: AVX2", id="XLA-cpu-max-isa"),
    ],
)
def test_the_avx2_cap_reaches_every_library_it_names(capped_process_log, evidence):
    assert evidence in capped_process_log


def test_the_cap_keeps_other_xla_flags_and_rejects_unknown_isas():
    env = isa_environment("avx2", {"XLA_FLAGS": "--xla_dump_to=/tmp/x", "PATH": "/bin"})
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_max_isa=AVX2"
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2" and env["ATEN_CPU_CAPABILITY"] == "avx2" and env["PATH"] == "/bin"
    assert isa_environment("native", {"PATH": "/bin"}) == {"PATH": "/bin"}
    with pytest.raises(ValueError, match="--isa must be one of native, avx2; got 'avx512'"):
        isa_environment("avx512", {})


@pytest.mark.parametrize(
    ("isa", "machine", "expected"),
    [
        pytest.param("native", XEON, "Xeon line, native ISA", id="native"),
        pytest.param(
            "avx2",
            XEON,
            "Xeon line capped to AVX2 by ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2, "
            "XLA_FLAGS=--xla_cpu_max_isa=AVX2 (TF's Eigen kernels keep their fixed build baseline (AVX); same cores, "
            "caches and memory bandwidth: not an AVX2 machine)",
            id="avx512-cpu-capped",
        ),
        pytest.param("avx2", EPYC, "EPYC line, which has nothing above AVX2: the cap (", id="avx2-cpu-unchanged"),
    ],
)
def test_a_capped_run_names_the_real_cpu_and_the_cap(isa, machine, expected):
    line = describe_isa(isa_record(isa, machine), f"{machine['cpu_model']} line")
    assert line.startswith(expected)
