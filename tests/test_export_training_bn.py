"""ONNX BatchNormalization-15 in training mode, in onnx.reference and ONNX Runtime, against the spec.

The operator normalizes with the batch's statistics and returns updated running statistics,
running = input * momentum + batch * (1 - momentum) with the *biased* batch variance: exactly
spec.batch_norm_train followed by spec.update_running_stats(convention="onnx").
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import spec
from export.onnx.graph import TRAINING_OPSET, batchnorm_training_model, check_model, ir_version_for

SHAPES = {"NC": (16, 4), "NCHW": (8, 3, 5, 5), "NCDHW": (4, 2, 3, 3, 3)}
MOMENTA = [0.9, 0.99]


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


@pytest.mark.parametrize("momentum", MOMENTA, ids=[f"momentum{m}" for m in MOMENTA])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("runtime", ["onnx.reference", "onnxruntime"])
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
    # runtimes) give ~1e-6 absolute; the running stats are O(10) averages, float32 accurate to ~1e-6 relative.
    np.testing.assert_allclose(y, want_y, rtol=0, atol=5e-6)
    np.testing.assert_allclose(running_mean, want_mean, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(running_var, want_var, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("runtime", ["onnx.reference", "onnxruntime"])
def test_training_mode_running_var_is_biased_not_bessel_corrected(runtime, rng):
    """The check above can tell the estimators apart: the unbiased (torch/tf1-style) update is far off."""
    shape = SHAPES["NCHW"]
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
