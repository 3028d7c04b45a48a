"""MultiWorkerMirroredStrategy, 2 worker processes on 127.0.0.1: the same statistics as one process.

tests/_sync_workers/keras_multiworker.py starts both workers with their TF_CONFIG on free ports,
bounds the run in time and ends the workers whatever happens. Each worker holds part of the
global batch (even and uneven splits); the references are the same function run in one process
on the whole batch, and ``spec`` in float64. ~20-30 s (two TensorFlow start-ups in parallel).
Reproduce by hand:

    python tests/_sync_workers/keras_multiworker.py launch --inputs IN.npz --out OUT.npz
"""

from __future__ import annotations

import numpy as np
import pytest
from _sync_workers import EPS, KERAS_MOMENTUM, SPLITS, bn_cases, keras_multiworker
from numerics import close, tolerance

import spec

# float32 (eps 1.2e-7), a few roundings and pairwise sums of <= 600 values per channel: errors
# ~1e-6 of each quantity's magnitude (observed <= 1e-6); 1e-5 of it leaves margin and still
# catches per-worker statistics (off by ~1e-1 here).
F32_TOL = tolerance("summation-order", "float32")

CASES = [pytest.param(c, id=f"2workers-{c}-{'-'.join(map(str, SPLITS[2][c]))}") for c in ("even", "uneven")]


def _close(actual, expected, scale, tol=F32_TOL, what=""):
    """numerics.close relative to the quantity's magnitude ``scale``; one global value for every replica."""
    close(actual, expected, tol, scale=scale, broadcast=True, what=what)


@pytest.mark.slow  # multi-process MultiWorkerMirroredStrategy
@pytest.mark.parametrize("case", CASES)
def test_multiworker_statistics_equal_one_process(case):
    """Both workers get the global (count, mean, var): as one process computes it, and as spec does."""
    out, data = keras_multiworker(), bn_cases(2)[case]
    count, mean, var = spec.moments(data["x"], axis=-1)
    np.testing.assert_array_equal(out[f"{case}/count"], np.broadcast_to(count, (2, 3)))
    scale = np.abs(data["x"]).max()
    for peer_mean, peer_var in ((out[f"{case}/single_mean"][0], out[f"{case}/single_var"][0]), (mean, var)):
        _close(out[f"{case}/mean"], np.broadcast_to(peer_mean, (2, 3)), scale, what="mean")
        _close(out[f"{case}/var"], np.broadcast_to(peer_var, (2, 3)), var.max(), what="var")


@pytest.mark.parametrize("case", CASES)
def test_multiworker_output_and_gradients_equal_global_batch(case):
    """Functional BN on cross_replica_moments across processes: y and grads of sum(y * dy)."""
    out, data = keras_multiworker(), bn_cases(2)[case]
    x, gamma, beta, dy = data["x"], data["gamma"], data["beta"], data["dy"]
    y, mean, var = spec.batch_norm_train(x, gamma, beta, axis=-1, eps=EPS)
    dx, dgamma, dbeta = spec.batch_norm_backward(dy, x, gamma, axis=-1, eps=EPS)
    x_hat = (x - mean) / np.sqrt(var + EPS)
    _close(out[f"{case}/y"], y, np.abs(y).max(), what="y")
    _close(out[f"{case}/dx"], dx, np.abs(dx).max(), what="dx")
    _close(out[f"{case}/dgamma"], dgamma, np.abs(dy * x_hat).sum(axis=(0, 1, 2)).max(), what="dgamma")
    _close(out[f"{case}/dbeta"], dbeta, np.abs(dy).sum(axis=(0, 1, 2)).max(), what="dbeta")


@pytest.mark.parametrize("case", CASES)
def test_multiworker_layer_step_equals_global_batch(case):
    """keras_bn.BatchNorm(synchronized=True): y and both workers' moving statistics after one step."""
    out, data = keras_multiworker(), bn_cases(2)[case]
    y, mean, var = spec.batch_norm_train(data["x"], data["gamma"], data["beta"], axis=-1, eps=EPS)
    want_mean, want_var = spec.update_running_stats(
        np.zeros(3), np.ones(3), mean, var, data["x"].size // 3, convention="keras", momentum=KERAS_MOMENTUM
    )
    _close(out[f"{case}/layer_y"], y, np.abs(y).max(), what="y")
    _close(out[f"{case}/layer_moving_mean"], np.broadcast_to(want_mean, (2, 3)), 1.0, what="moving_mean")
    _close(out[f"{case}/layer_moving_variance"], np.broadcast_to(want_var, (2, 3)), 1.0, what="moving_variance")
