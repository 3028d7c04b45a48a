"""The generic path compiled by XLA (``jit_compile=True``; JAX): conditional refinement (SPEC.md §8.5).

Oracles: the float64 spec (``spec.batch_norm_train``) for values and statistics, and Keras' own layer compiled the
same way for the structure of the compiled program (x-sized passes counted in XLA's optimized HLO by
bench/xla_cost.py's ``passes``: load-independent, nothing is timed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from numerics import close, tolerance

import keras_bn
import spec

tf = pytest.importorskip("tensorflow")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from xla_cost import _compiled_train_step, _hlo_shape, _tf_dispatch, _tf_step, passes, program  # noqa: E402

OUT_TOL = tolerance("rerounded", "float32", "y")
STAT_TOL = tolerance("rerounded", "float32", "stats")
DATA = {"ordinary": (0.5, 1.0), "offset-1e4": (1e4, 1e-2)}  # (offset, std): |mean| / std 0.5 and 1e6


def _train_once(x, *, jit: bool, epsilon: float):
    """One training call of a fresh layer in ``tf.function(jit_compile=jit)``: (y, moving variance)."""
    layer = keras_bn.BatchNorm(momentum=0.0, epsilon=epsilon)  # momentum 0: moving variance = batch variance
    layer.build(x.shape)
    y = tf.function(lambda x: layer(x, training=True), jit_compile=jit)(x)
    return np.asarray(y), layer.moving_variance.numpy()


@pytest.mark.parametrize("data", DATA)
def test_compiled_statistics_match_the_spec(rng, data):
    """Ordinary data skip the refinement under XLA, large offsets take it; both as accurate as the graph path.

    The variance within 1e-4 relative of the float64 spec for the offset data (as test_layer_spec's large-offset
    test: measured <= 2e-5) and within rerounded float32 tolerances otherwise; y with eps = 1e-12 so that the
    normalization itself is seen (eps = 1e-3 would swamp a variance of 1e-4), O(1) values within 1e-3.
    """
    offset, std = DATA[data]
    x = (offset + std * rng.standard_normal((16, 6, 6, 3))).astype(np.float32)
    y_ref, _, var_ref = spec.batch_norm_train(x, np.ones(3), np.zeros(3), axis=-1, eps=1e-12)
    y, var = _train_once(tf.constant(x), jit=True, epsilon=1e-12)
    if data == "ordinary":
        close(var, var_ref, STAT_TOL)
        close(y, y_ref, OUT_TOL)
    else:
        np.testing.assert_allclose(var, var_ref, rtol=1e-4)
        np.testing.assert_allclose(y, y_ref, atol=1e-3)


def test_compiled_step_sums_rows_and_moves_no_more_data_than_keras_layer():
    """XLA's optimized program for the fwd+bwd step at LeNet conv1's shape (64x24x24x6, at least
    ``CONDITIONAL_REFINEMENT_VALUES``): ours reads and writes x-sized arrays no more often than Keras' layer (14
    passes each), the refinement sits in a conditional branch, and every sum XLA:CPU runs as a ``reduce-window`` tree
    windows ours' (rows, C) view along the rows alone, where Keras' layer windows three axes of the 4-D batch
    (``32x24x24x1``): the layout that made its layer step 3.5x slower at 64x56x56x64 (README, "Benchmarks").
    At 16x16x16x16 Keras' sums need no tree at all (10 passes to ours' 14) and ours is still the faster there
    (bench/xla_cost.py, bench_modes)."""
    shape = (64, 24, 24, 6)
    x = tf.constant(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    counted = {}
    for name, make in (("keras", keras.layers.BatchNormalization), ("ours", keras_bn.BatchNorm)):
        step = _tf_step(tf, make())
        step(x, x)
        counted[name] = passes(step.experimental_get_compiler_ir(x, x)(stage="optimized_hlo"), _hlo_shape(shape))
    ours, theirs = counted["ours"], counted["keras"]
    assert ours["conditionals"] == 1, ours
    assert ours["reads"] + ours["writes"] <= theirs["reads"] + theirs["writes"], counted

    def windowed_axes(window: str) -> int:
        return sum(int(size) > 1 for size in window.split("x"))

    assert ours["windows"] and all(windowed_axes(w) == 1 for w in ours["windows"]), counted
    assert theirs["windows"] and all(windowed_axes(w) == 3 for w in theirs["windows"]), counted


@pytest.mark.slow  # four XLA compilations of the whole step (~15 s on 2 shared cores)
def test_compiled_lenet_step_is_one_program_with_keras_layers_work_and_two_branches():
    """The whole LeNet-BN training step as ``train_on_batch(jit_compile=True)`` runs it, ours vs Keras' layer
    (bench/xla_cost.py ``--workload lenet``): one XLA program per step and the same host-side ops around it; no
    while loop, custom call or host transfer; a conditional refinement in bn1 and bn2 (64x24x24x6, 64x8x8x16: at
    least ``CONDITIONAL_REFINEMENT_VALUES``), none in the dense bn3 and bn4.

    Bytes read and written by the top-level kernels: ours within three passes over bn1's and bn2's batches
    (64x24x24x6 + 64x8x8x16 float32 = 1,146,880 B a pass) of Keras'. What ours adds: XLA computes each convolution's
    bias add twice, once as the 4-D array YNNPACK's first sum reads and once as the (rows, C) view the refinement's
    branch takes (a write and a read each: 2 passes, 2,293,760 B); the partial sums of the (rows, C) trees
    (1152x6 and 128x16 values instead of 2x6 and 2x16); the dense layers' unconditional refinement (a write and two
    reads of 64x120 and 64x84 float32 = 156,672 B) and per-channel vectors (measured: +2,607,660 B of 54.25 MB; the
    step is still the faster, bench_modes). Its two extra reductions are the dense refinements (a tree of several
    levels counts once).
    """
    rng = np.random.default_rng(0)
    images = rng.random((64, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, 64)
    found = {}
    for variant in ("keras", "ours"):
        model = keras_bn.compile_lenet(keras_bn.lenet_bn(variant, seed=0), lr=0.01, jit_compile=True)
        model.train_on_batch(images, labels)
        data = (tf.constant(images), tf.constant(labels), None)
        hlo = _compiled_train_step(model).experimental_get_compiler_ir(data)(stage="optimized_hlo")
        found[variant] = program(hlo) | _tf_dispatch(model, images, labels, steps=2)
    ours, theirs = found["ours"], found["keras"]
    for counts in (ours, theirs):
        assert counts["xla_programs"] == 1, found
        assert counts["while_loops"] == counts["custom_calls"] == counts["host_transfers"] == 0, found
    assert ours["host_ops"] == theirs["host_ops"], found
    assert (ours["conditionals"], theirs["conditionals"]) == (2, 0), found
    assert ours["bytes"] - theirs["bytes"] < 3 * 4 * (64 * 24 * 24 * 6 + 64 * 8 * 8 * 16), found
    reductions = {name: c["ynn_reductions"] + c["loop_reductions"] for name, c in found.items()}
    assert reductions["ours"] <= reductions["keras"] + 2, found


_JAX_CHECK = """
import json, numpy as np, jax, keras, keras_bn, spec
rng = np.random.default_rng(0)
out = {}
for data, (offset, std) in {"ordinary": (0.5, 1.0), "offset-1e4": (1e4, 1e-2)}.items():
    x = (offset + std * rng.standard_normal((16, 6, 6, 3))).astype(np.float32)
    layer = keras_bn.BatchNorm(momentum=0.0, epsilon=1e-12)
    layer.build(x.shape)
    tv, ntv = [v.value for v in layer.trainable_variables], [v.value for v in layer.non_trainable_variables]
    y, new_stats = jax.jit(lambda tv, ntv, x: layer.stateless_call(tv, ntv, x, training=True))(tv, ntv, x)
    y_ref, _, var_ref = spec.batch_norm_train(x, np.ones(3), np.zeros(3), axis=-1, eps=1e-12)
    var = np.asarray(new_stats[1])
    out[data] = {"var_rel": float(np.max(np.abs(var / var_ref - 1))), "y_abs": float(np.max(np.abs(y - y_ref)))}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # a subprocess under KERAS_BACKEND=jax (the backend is fixed at import)
def test_jax_jit_statistics_match_the_spec():
    """The same two cases under ``jax.jit`` (``lax.cond``): variance within 1e-4 relative of the float64 spec with
    the refinement (offset 1e4) and 1e-5 without it (O(1) data, rerounded float32), y within 1e-3."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", _JAX_CHECK], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["ordinary"]["var_rel"] <= 1e-5, result
    assert result["offset-1e4"]["var_rel"] <= 1e-4, result
    assert max(r["y_abs"] for r in result.values()) <= 1e-3, result
