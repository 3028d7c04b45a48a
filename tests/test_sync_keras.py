"""Synchronized BN on tf.distribute.MirroredStrategy (2 and 4 logical CPUs) vs BN on the global batch.

Every check runs in one subprocess per device count (tests/_sync_workers/keras_mirrored.py);
the references are computed here: ``spec`` (float64) on the concatenated global batch, which is
what single-device BN computes, plus the same code run on one device in the worker.
"""

from __future__ import annotations

import numpy as np
import pytest
from _sync_workers import EPS, KERAS_MOMENTUM, SPLITS, bn_cases, keras_mirrored, offset_case
from numerics import Tolerance, close, tolerance

import spec
from keras_bn.sync import COLLECTIVES_PER_STEP

# float32 has eps 1.2e-7; mean, var, y and dx each pass through a few roundings and pairwise
# sums of at most 600 values per channel, so their errors are ~1e-6 of the data's magnitude
# (observed <= 2e-6). 1e-5 of the magnitude leaves a 5x margin and still fails on any wrong
# formula (an unsynchronized replica's statistics are off by ~1e-1 here).
F32_TOL = tolerance("summation-order", "float32")
# dgamma and dbeta are sums of 600 float32 terms per channel: pairwise summation errs by at most
# ~log2(600) * eps ~ 1.2e-6 of the sum of |terms|, plus ~1e-6 per term from x_hat; 1e-5 bounds it.
SUM_TOL = tolerance("summation-order", "float32")

# LeNet weights after 3 momentum-SGD steps: test_lenet_fit_synchronized_equals_single_device's docstring.
WEIGHTS_TOL = Tolerance(1e-4, 0.0, "3 SGD steps of float32 reassociation: observed <= 7e-7 of a 0.1-1 scale")

DEVICES = sorted(SPLITS)
CASES = ["even", "uneven", "empty"]
PARAMS = [pytest.param(d, c, id=f"{d}replicas-{c}-{'-'.join(map(str, SPLITS[d][c]))}") for d in DEVICES for c in CASES]


def _close(actual, expected, scale, tol=F32_TOL, what=""):
    """numerics.close relative to the quantity's magnitude ``scale``; one global value for every replica."""
    close(actual, expected, tol, scale=scale, broadcast=True, what=what)


def _reference(case):
    """Single-device BN on the concatenated global batch, in float64 (spec)."""
    x, gamma, beta, dy = case["x"], case["gamma"], case["beta"], case["dy"]
    y, mean, var = spec.batch_norm_train(x, gamma, beta, axis=-1, eps=EPS)
    dx, dgamma, dbeta = spec.batch_norm_backward(dy, x, gamma, axis=-1, eps=EPS)
    x_hat = (x - mean) / np.sqrt(var + EPS)
    terms = {"dgamma": np.abs(dy * x_hat).sum(axis=(0, 1, 2)), "dbeta": np.abs(dy).sum(axis=(0, 1, 2))}
    return {"y": y, "mean": mean, "var": var, "dx": dx, "dgamma": dgamma, "dbeta": dbeta, "terms": terms}


@pytest.mark.slow  # MirroredStrategy over 2-4 logical CPUs (~15-25 s per case on 2 cores)
@pytest.mark.parametrize(("devices", "case"), PARAMS)
def test_function_statistics_equal_global_batch(devices, case):
    """cross_replica_moments: every replica gets the global (count, mean, biased var)."""
    out, data = keras_mirrored(devices), bn_cases(devices)[case]
    count, mean, var = spec.moments(data["x"], axis=-1)
    got = {k: out[f"function/{case}/{k}"] for k in ("count", "mean", "var")}
    assert got["mean"].shape == (devices, 3)
    np.testing.assert_array_equal(got["count"], np.broadcast_to(count, (devices, 3)))  # integers, exact in float32
    scale = np.abs(data["x"]).max()
    _close(got["mean"], mean, scale, what="mean")
    _close(got["var"], var, var.max(), what="var")
    # Same code on one device over the whole batch (the worker's off-strategy call).
    _close(got["mean"], out[f"function/{case}/single_mean"], scale, what="mean vs one device")
    _close(got["var"], out[f"function/{case}/single_var"], var.max(), what="var vs one device")


@pytest.mark.parametrize(("devices", "case"), PARAMS)
def test_function_gradients_equal_global_batch(devices, case):
    """A BN built on cross_replica_moments: y and the gradients of sum(y * dy) match the global batch."""
    out, ref = keras_mirrored(devices), _reference(bn_cases(devices)[case])
    _close(out[f"function/{case}/y"], ref["y"], np.abs(ref["y"]).max(), what="y")
    _close(out[f"function/{case}/dx"], ref["dx"], np.abs(ref["dx"]).max(), what="dx")
    for name in ("dgamma", "dbeta"):
        _close(out[f"function/{case}/{name}"], ref[name], ref["terms"][name].max(), SUM_TOL, what=name)


LAYER_PARAMS = [p for p in PARAMS if p.values[1] != "empty"]


@pytest.mark.parametrize(("devices", "case"), LAYER_PARAMS)
def test_layer_step_equals_global_batch(devices, case):
    """keras_bn.BatchNorm(synchronized=True): one training step's y, gradients and moving stats."""
    out, data = keras_mirrored(devices), bn_cases(devices)[case]
    ref = _reference(data)
    _close(out[f"layer/{case}/y"], ref["y"], np.abs(ref["y"]).max(), what="y")
    _close(out[f"layer/{case}/dx"], ref["dx"], np.abs(ref["dx"]).max(), what="dx")
    for name in ("dgamma", "dbeta"):
        _close(out[f"layer/{case}/{name}"], ref[name], ref["terms"][name].max(), SUM_TOL, what=name)
    count = np.full(3, data["x"].size // 3)
    want_mean, want_var = spec.update_running_stats(
        np.zeros(3), np.ones(3), ref["mean"], ref["var"], count, convention="keras", momentum=KERAS_MOMENTUM
    )
    # Every replica's copy of the moving statistics holds the global-batch update.
    _close(out[f"layer/{case}/moving_mean"], np.broadcast_to(want_mean, (devices, 3)), 1.0, what="moving_mean")
    _close(out[f"layer/{case}/moving_variance"], np.broadcast_to(want_var, (devices, 3)), 1.0, what="moving_var")


def _offset_truth(devices):
    x = offset_case(devices)["x"]
    return spec.moments(x, axis=-1)[2]  # float64 two-pass on the float32 data


@pytest.mark.parametrize("devices", DEVICES, ids=[f"{d}replicas" for d in DEVICES])
@pytest.mark.parametrize("where", ["function-var", "layer-moving_variance"])
def test_large_offset_variance_within_1em3_of_float64(devices, where):
    """x = 1e4 + 1e-2 N(0,1) in float32: the synchronized variance is within 1e-3 of float64 truth."""
    check, name = where.split("-")
    got = keras_mirrored(devices)[f"{check}/offset/{name}"]
    truth = _offset_truth(devices)
    rel = np.abs(got / truth - 1.0)
    assert rel.max() <= 1e-3, f"relative error {rel.max():.3g} (truth {truth})"


@pytest.mark.parametrize("devices", DEVICES, ids=[f"{d}replicas" for d in DEVICES])
def test_large_offset_layer_output_equals_float64(devices):
    """The synchronized layer's y at x = 1e4 + 1e-2 N(0,1): x - mean is formed without rounding
    through the float32 mean (which alone would err by up to 5e-4 / 1e-2 = 5% of x_hat)."""
    data = offset_case(devices)
    y = spec.batch_norm_train(data["x"], data["gamma"], data["beta"], axis=-1, eps=EPS)[0]
    _close(keras_mirrored(devices)["layer/offset/y"], y, np.abs(y).max(), what="y")


@pytest.mark.xfail(
    strict=True,
    reason="Keras 3.15.1 synchronized BN all-reduces float32 sums of x and x^2 and returns E[x^2] - E[x]^2 "
    "(keras/src/backend/tensorflow/nn.py:1523-1539, _compute_moments_sync); SPEC.md §7 'Why not E[x^2] - E[x]^2'",
)
def test_keras_builtin_synchronized_bn_variance_within_1em3_of_float64():
    """keras.layers.BatchNormalization(synchronized=True) against SPEC.md §8.2 at x = 1e4 + 1e-2 N(0,1).

    It fails today (relative error > 1, printed); the day Keras fixes it, strict xfail says so.
    """
    got = keras_mirrored(2)["builtin/offset/moving_variance"]
    truth = _offset_truth(2)
    rel = np.abs(got / truth - 1.0)
    print(f"Keras synchronized BN moving variance {got[0]} vs float64 truth {truth}: relative error {rel.max():.3g}")
    assert rel.max() <= 1e-3, f"relative error {rel.max():.3g} (truth {truth})"


def test_collective_calls_per_layer_per_step():
    """All-reduce calls one BN layer issues per training step (traced), ours vs Keras built-in."""
    out = keras_mirrored(2)
    assert out["collectives/ours/forward_calls"] == COLLECTIVES_PER_STEP["forward"] == 2
    assert out["collectives/ours/backward_calls"] == COLLECTIVES_PER_STEP["backward"] == 1
    # Keras' synchronized path all-reduces sum(x), sum(x^2) and the count separately.
    assert out["collectives/builtin/forward_calls"] == 3
    print({k: float(v) for k, v in out.items() if k.startswith("collectives/")})


def _lenet(out, run):
    prefix = f"lenet/{run}/weights/"
    return {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}


def test_lenet_fit_synchronized_equals_single_device():
    """model.fit, 3 SGD steps of 32 images on 2 replicas (16 each), synchronized BN vs one device.

    Weights after 3 momentum-SGD steps differ by float32 reassociation only (cross-replica
    gradient sums vs one sum): observed <= 7e-7 absolute on weights of order 0.1-1; 1e-4 of the
    tensor's scale (at least 0.1, LeNet's weight scale) bounds that with margin. The floor
    matters for the conv/dense biases that feed a BN: BN removes their gradient exactly, so
    both runs hold float32 noise of ~1e-6 there. Per-replica (unsynchronized) statistics move
    the weights by more than 1e-2 of the scale (asserted: the comparison discriminates).
    """
    out = keras_mirrored(2)
    sync, single, unsync = (_lenet(out, r) for r in ("sync", "single", "unsync"))
    assert sync.keys() == single.keys() and len(sync) == 26  # 10 conv/dense + 4 x (gamma, beta, mean, var)
    worst_unsync = 0.0
    for path, want in single.items():
        scale = max(np.abs(want).max(), 0.1)
        _close(sync[path], want, scale, WEIGHTS_TOL, what=path)
        worst_unsync = max(worst_unsync, np.abs(unsync[path] - want).max() / scale)
    close(out["lenet/sync/loss"], out["lenet/single/loss"], SUM_TOL, what="loss")
    assert worst_unsync > 1e-2, f"unsynchronized BN differs by only {worst_unsync:.3g}: the check cannot tell"


# ---------------------------------------------------------------- outside any strategy (in-process)
LOCAL_CASES = [
    pytest.param((16, 4), [0], None, id="nc-16x4"),
    pytest.param((6, 5, 5, 3), [0, 1, 2], None, id="nhwc-6x5x5x3"),
    pytest.param((6, 3, 5, 5), [0, 2, 3], None, id="nchw-6x3x5x5"),
    pytest.param((4, 7, 3), [0, 1], "ragged", id="nlc-4x7x3-masked"),
]


@pytest.mark.parametrize(("shape", "axes", "mask"), LOCAL_CASES)
def test_local_moments_equal_spec(shape, axes, mask, rng):
    """Off-strategy, cross_replica_moments is the local batch's two-pass moments (spec.moments)."""
    from keras_bn.sync import cross_replica_moments

    x = (5.0 + 3.0 * rng.standard_normal(shape)).astype(np.float32)
    channel = next(a for a in range(len(shape)) if a not in axes)
    m = None
    if mask == "ragged":  # Keras-style mask without the channel axis: sequence lengths 7, 5, 3, 1
        m = np.arange(shape[1])[None, :] < np.array([7, 5, 3, 1])[:, None]
        x[~m] = np.nan  # masked-out values must not leak into any statistic
    count, mean, var = (t.numpy() for t in cross_replica_moments(x, axes, mask=m))
    want_count, want_mean, want_var = spec.moments(x, axis=channel, mask=m)
    np.testing.assert_array_equal(count, want_count)
    _close(mean, want_mean, 8.0 * 3.0, what="mean")  # scale: |x| up to ~5 + 3 sigma
    _close(var, want_var, want_var.max(), what="var")


def test_local_centered_is_exact_at_large_offset():
    """return_centered gives x - mean without the float32 rounding of mean (1e4 offset, spread 1e-2)."""
    from keras_bn.sync import cross_replica_moments

    x = offset_case(2)["x"]
    _, mean, var, centered = cross_replica_moments(x, [0, 1, 2], return_centered=True)
    truth = x.astype(np.float64) - x.astype(np.float64).mean(axis=(0, 1, 2))
    # float32 x - shift is exact here; what is left is rounding of values ~1e-2 (ulp ~1e-9) and of
    # D1/n: 1e-5 of the 1e-2 spread. Subtracting the float32 mean instead errs by up to ~5e-4.
    assert np.abs(centered.numpy() - truth).max() <= 1e-5 * 1e-2
    assert np.abs(var.numpy() / truth.var(axis=(0, 1, 2)) - 1).max() <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        pytest.param({"x": np.ones((2, 3), np.int32), "reduction_axes": [0]}, TypeError, "floating-point", id="int-x"),
        pytest.param({"x": np.ones((2, 3), np.float32), "reduction_axes": [2]}, ValueError, "out of range", id="axis"),
        pytest.param({"x": np.ones((2, 3), np.float32), "reduction_axes": [0, 0]}, ValueError, "repeated", id="dup"),
        pytest.param({"x": np.ones((2, 3), np.float32), "reduction_axes": []}, ValueError, "at least one", id="none"),
        pytest.param({"x": np.ones((2, 3), np.float32), "reduction_axes": [0.0]}, TypeError, "ints", id="float-axis"),
        pytest.param(
            {"x": np.ones((2, 3, 4), np.float32), "reduction_axes": [0, 1], "mask": np.ones((3, 2))},
            ValueError,
            "does not broadcast",
            id="mask-shape",
        ),
    ],
)
def test_bad_input_raises(kwargs, error, message):
    from keras_bn.sync import cross_replica_moments

    with pytest.raises(error, match=message):
        cross_replica_moments(**kwargs)
