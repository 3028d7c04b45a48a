"""ONNX BatchNormalization-15 in training mode, in onnx.reference and ONNX Runtime, against the spec.

The operator normalizes with the batch's statistics and returns updated running statistics,
running = input * momentum + batch * (1 - momentum) with the *biased* batch variance: exactly
spec.batch_norm_train followed by spec.update_running_stats(convention="onnx").
"""

from __future__ import annotations

import numpy as np
import pytest
from cases import case, momentum_id
from numerics import Tolerance, close, tolerance
from onnx import helper

import spec
from export.onnx.graph import TRAINING_OPSET, batchnorm_training_model, check_model, ir_version_for

SHAPES = {"nc": (16, 4), "nchw": (8, 3, 5, 5), "ncdhw": (4, 2, 3, 3, 3)}
MOMENTA = [0.9, 0.99]
RUNTIMES = ["onnx.reference", "onnxruntime"]
CASES = [
    case(runtime, shape, momentum, peer=runtime, layout=layout, detail=momentum_id(momentum))
    for runtime in RUNTIMES
    for layout, shape in SHAPES.items()
    for momentum in MOMENTA
]
STATS_TOL = tolerance("peer-vs-spec", "float32", "stats")


def _run(runtime: str, model, feeds):
    if runtime == "onnx.reference":
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model).run(None, feeds)
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _case(shape, rng):
    channels = shape[1]
    # Offset mean (~3) and per-channel spread make mean, variance and both running statistics all matter.
    x = (rng.normal(3.0, 1.0, shape) * rng.uniform(0.5, 3.0, (1, channels) + (1,) * (len(shape) - 2))).astype(
        np.float32
    )
    return {
        "X": x,
        "scale": rng.uniform(0.5, 2.0, channels).astype(np.float32),
        "B": rng.normal(0.0, 1.0, channels).astype(np.float32),
        "input_mean": rng.normal(0.0, 1.0, channels).astype(np.float32),
        "input_var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
    }


@pytest.mark.parametrize(("runtime", "shape", "momentum"), CASES)
def test_training_mode_bn_matches_spec(runtime, shape, momentum, rng):
    eps = 1e-5
    model = batchnorm_training_model(shape, epsilon=eps, momentum=momentum)
    feeds = _case(shape, rng)
    y, running_mean, running_var = _run(runtime, model, feeds)
    want_y, mean, var = spec.batch_norm_train(feeds["X"], feeds["scale"], feeds["B"], axis=1, eps=eps)
    count = feeds["X"].size // shape[1]
    want_mean, want_var = spec.update_running_stats(
        feeds["input_mean"], feeds["input_var"], mean, var, count, convention="onnx", momentum=momentum
    )
    # y = x_hat * gamma + beta with |x_hat| <= ~4 and gamma <= 2: float32 statistics (single-pass sums in the
    # runtimes) give ~1e-6 absolute, so 5e-6 absolute (tighter than SPEC §8.4's 1e-5 + 1e-5 |y|, kept);
    # the running statistics are float32 averages of O(1..10): SPEC §8.4's float32 statistics bound.
    close(y, want_y, Tolerance(0.0, 5e-6, "float32 y = x_hat * gamma + beta, |y| <= ~8: ~1e-6 measured"), what="y")
    close(running_mean, want_mean, STATS_TOL, what="running_mean")
    close(running_var, want_var, STATS_TOL, what="running_var")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_training_mode_running_var_is_biased_not_bessel_corrected(runtime, rng):
    """The check above can tell the estimators apart: the unbiased (torch/tf1-style) update is far off."""
    shape = SHAPES["nchw"]
    feeds = _case(shape, rng)
    _, _, running_var = _run(runtime, batchnorm_training_model(shape, momentum=0.9), feeds)
    _, mean, var = spec.batch_norm_train(feeds["X"], feeds["scale"], feeds["B"], axis=1, eps=1e-5)
    count = feeds["X"].size // shape[1]
    _, unbiased = spec.update_running_stats(
        feeds["input_mean"], feeds["input_var"], mean, var, count, convention="tf1", momentum=0.9
    )
    # var * m/(m-1) with m = 200 moves the running variance by 0.1 * var / 199, ~1e-3 here: >> 2e-6 relative
    assert np.max(np.abs(running_var - unbiased) / np.abs(unbiased)) > 1e-4


def test_training_model_is_opset_15_training_mode():
    model = batchnorm_training_model((8, 3, 5, 5))
    check_model(model)
    assert {o.domain: o.version for o in model.opset_import}[""] == TRAINING_OPSET == 15
    assert model.ir_version == ir_version_for(model) == 8
    (node,) = model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["training_mode"] == 1
    assert [o.name for o in model.graph.output] == ["Y", "running_mean", "running_var"]


def test_training_model_rejects_a_shape_without_channels():
    with pytest.raises(ValueError, match="x_shape"):
        batchnorm_training_model((8,))
