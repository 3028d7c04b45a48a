"""keras_bn.BatchNorm on edge input: empty and fully masked batches, one value per channel, bad arguments.

Oracles: PyTorch itself for what an empty batch and a one-value batch do there (a zero-size
training batch returns an empty output and leaves the running statistics; one value per channel
raises), Keras' own layer for what we deliberately do differently (it writes NaN for an empty
batch and moves the statistics towards 0 for a fully masked one), and exact equality for
"unchanged" (an update that does not happen changes no bit).
"""

from __future__ import annotations

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from cases import case
from numerics import close, tolerance

import keras_bn
import spec

C = 8  # channels: a multiple of 4, so fused=None would pick the fused kernel too
#: (id, convention, momentum): every spec convention at its default momentum, plus torch's cumulative average.
CONVENTIONS = [(c.name, c.name, None) for c in spec.list_conventions()] + [("torch-cumulative", "torch", "cumulative")]
#: Training paths of the layer: (id, layer kwargs, whether the call gets a mask).
PATHS = [
    ("fused", {"fused": True}, False),
    ("generic", {"fused": False}, False),
    ("synchronized", {"synchronized": True}, False),
    ("masked", {}, True),
    ("deferred", {"stats_update": "deferred"}, False),
    ("moving-auto", {"normalize_with": "moving"}, False),
]
CASES = [
    pytest.param(conv, momentum, kwargs, masked, id=f"{conv_id}-{path_id}")
    for conv_id, conv, momentum in CONVENTIONS
    for path_id, kwargs, masked in PATHS
] + [pytest.param("keras", None, {"renorm": True}, masked, id=f"keras-renorm{'-masked' * masked}") for masked in (0, 1)]


def layer_with_state(rng, shape, **kwargs) -> keras_bn.BatchNorm:
    """A built layer whose every non-trainable weight holds a non-initial value (so any write shows)."""
    layer = keras_bn.BatchNorm(**kwargs)
    layer.build(shape)
    for variable in layer.non_trainable_variables:
        if variable.dtype == "int64":
            variable.assign(7)
        else:
            variable.assign(rng.uniform(0.5, 2.0, variable.shape).astype(variable.dtype))
    return layer


def state(layer) -> dict[str, np.ndarray]:
    return {v.path: keras.ops.convert_to_numpy(v) for v in layer.weights}


def counter_step(convention: str) -> int:
    """torch's num_batches_tracked counts training calls, empty ones too (_BatchNorm.forward adds 1 first)."""
    return 1 if convention == "torch" else 0


@pytest.mark.parametrize(("convention", "momentum", "kwargs", "masked"), CASES)
def test_empty_training_batch_returns_empty_output_and_keeps_statistics(rng, convention, momentum, kwargs, masked):
    layer = layer_with_state(rng, (None, 4, 4, C), convention=convention, momentum=momentum, **kwargs)
    before = state(layer)
    x = np.zeros((0, 4, 4, C), np.float32)
    mask = np.zeros((0, 4, 4), bool) if masked else None
    y = layer(x, training=True, mask=mask)
    if layer.stats_update == "deferred":
        keras_bn.apply_updates(layer)
    assert tuple(y.shape) == x.shape
    after = state(layer)
    for path, value in before.items():
        expected = value + counter_step(convention) if path.endswith("num_batches_tracked") else value
        np.testing.assert_array_equal(after[path], expected, err_msg=path)


def test_empty_batch_leaves_torch_batchnorm_statistics_unchanged():
    """SPEC.md §9, empty training batch: PyTorch's behaviour, which we follow (its counter counts the step)."""
    torch = pytest.importorskip("torch")
    module = torch.nn.BatchNorm2d(C).train()
    y = module(torch.zeros(0, C, 4, 4))
    assert tuple(y.shape) == (0, C, 4, 4)
    assert torch.equal(module.running_mean, torch.zeros(C)) and torch.equal(module.running_var, torch.ones(C))
    assert int(module.num_batches_tracked) == 1


@pytest.mark.xfail(
    strict=True,
    reason="Keras 3.15.1 writes NaN into moving_mean/moving_variance on an empty batch: ops.moments divides "
    "by m = 0 (keras/src/backend/tensorflow/nn.py:1548, _compute_moments is tf.nn.moments); SPEC.md §9",
)
def test_empty_batch_leaves_keras_batchnormalization_statistics_unchanged():
    """SPEC.md §9, empty training batch: the moving statistics stay exactly as they were."""
    builtin = keras.layers.BatchNormalization()
    builtin(np.zeros((0, 4, 4, C), np.float32), training=True)
    np.testing.assert_array_equal(builtin.moving_mean.numpy(), np.zeros(C))
    np.testing.assert_array_equal(builtin.moving_variance.numpy(), np.ones(C))


@pytest.mark.parametrize(("conv_id", "convention", "momentum"), CONVENTIONS, ids=[c[0] for c in CONVENTIONS])
def test_fully_masked_batch_normalizes_like_keras_and_keeps_statistics(rng, conv_id, convention, momentum):
    """No value carries no information: no convention moves its statistics (Keras moves them towards 0).

    The output is Keras': with no value the batch mean and variance are 0, so y = x * gamma /
    sqrt(eps) + beta. Keras' own layer also "updates" with those zeros, pulling the moving
    variance towards 0; we decide against that in every convention (an empty batch is PyTorch's
    no-op, and a masked-out batch is an empty one). torch's counter still counts the call.
    """
    x = rng.normal(size=(4, 5, C)).astype(np.float32)
    mask = np.zeros((4, 5), bool)
    layer = layer_with_state(rng, x.shape, convention=convention, momentum=momentum, epsilon=1e-3)
    builtin = keras.layers.BatchNormalization(epsilon=1e-3)
    builtin.build(x.shape)
    builtin.set_weights(layer.get_weights()[:4])
    before = state(layer)
    y = layer(x, training=True, mask=mask)
    y_keras = builtin(x, training=True, mask=mask)
    # Keras divides by (0 + 1e-7) where we select 0: both give mean = var = 0 exactly.
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_keras))
    after = state(layer)
    for path, value in before.items():
        expected = value + counter_step(convention) if path.endswith("num_batches_tracked") else value
        np.testing.assert_array_equal(after[path], expected, err_msg=path)
    assert not np.allclose(builtin.moving_variance.numpy(), before[layer.moving_variance.path])  # Keras moves


ONE_VALUE_SHAPES = [
    pytest.param((1, C), -1, id="nc"),
    pytest.param((1, 1, 1, C), -1, id="nhwc"),
    pytest.param((1, C, 1, 1), 1, id="nchw"),
    pytest.param((1, 1, C), -1, id="nlc"),
]


def torch_message() -> str:
    """PyTorch's own words for one value per channel in training (torch/nn/functional.py)."""
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError) as info:
        torch.nn.BatchNorm1d(C).train()(torch.zeros(1, C))
    return str(info.value).split(", got")[0]


@pytest.mark.parametrize("mode", ["eager", "tf.function"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
@pytest.mark.parametrize(("shape", "axis"), ONE_VALUE_SHAPES)
def test_torch_convention_refuses_one_value_per_channel_in_training(shape, axis, fused, mode):
    expected = torch_message()
    layer = keras_bn.BatchNorm(axis=axis, convention="torch", fused=fused)
    call = layer if mode == "eager" else tf.function(lambda x: layer(x, training=True))
    with pytest.raises(ValueError, match=expected):
        call(np.ones(shape, np.float32), training=True) if mode == "eager" else call(np.ones(shape, np.float32))


@pytest.mark.parametrize(
    ("kwargs", "raises"),
    [
        pytest.param({"convention": "keras"}, False, id="keras-trains-on-one-value"),
        pytest.param(
            {"convention": "torch", "stats_update": "frozen", "normalize_with": "moving"},
            False,
            id="torch-frozen-moving",
        ),
        pytest.param({"convention": "torch", "stats_update": "frozen"}, True, id="torch-frozen-batch"),
        pytest.param({"convention": "torch", "normalize_with": "moving"}, True, id="torch-moving-auto"),
    ],
)
def test_one_value_rule_applies_only_where_torch_would_use_the_batch(kwargs, raises):
    layer = keras_bn.BatchNorm(**kwargs)
    x = np.ones((1, C), np.float32)
    if raises:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            layer(x, training=True)
    else:
        layer(x, training=True)
    layer(x, training=False)  # inference never needs two values


def test_one_value_with_a_dynamic_batch_under_tf_function_keeps_statistics():
    """The batch size is unknown at trace time, so the check cannot raise; the update is skipped instead."""
    layer = keras_bn.BatchNorm(convention="torch")
    layer.build((None, C))
    call = tf.function(lambda x: layer(x, training=True), input_signature=[tf.TensorSpec((None, C), tf.float32)])
    call(np.full((1, C), 3.0, np.float32))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(C))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones(C))
    call(np.stack([np.zeros(C), np.ones(C)]).astype(np.float32))  # two values: torch's update, unbiased
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.9 + 0.1 * 0.5, rtol=1e-6)  # float32 rounding


@pytest.mark.parametrize("jit", [False, True], ids=["tf.function", "tf-xla"])
@pytest.mark.parametrize(("axis", "shape"), [(-1, (6, 4, 5, C)), (1, (6, C, 4, 5))], ids=["NHWC", "NCHW"])
def test_a_trace_that_knows_only_the_rank_trains_like_the_spec(rng, jit, axis, shape):
    """``tf.function`` with an input signature of unknown sizes (channels included: the layer was built with them):
    channels-last, the generic path's (rows, C) view takes the channel count from the layer; channels-first, the
    count per channel is the product of the reduced sizes at run time. The statistics are the float64 spec's
    (``spec.batch_norm_train``) within rerounded float32 tolerances, and y within 1e-3 (O(1) values)."""
    layer = keras_bn.BatchNorm(axis=axis, momentum=0.0, fused=False)  # momentum 0: moving variance = batch variance
    layer.build(tuple(None if a == 0 else d for a, d in enumerate(shape)))
    signature = [tf.TensorSpec((None, None, None, None), tf.float32)]
    call = tf.function(lambda x: layer(x, training=True), input_signature=signature, jit_compile=jit)
    x = (0.5 + rng.standard_normal(shape)).astype(np.float32)
    y = call(x).numpy()
    y_ref, mean_ref, var_ref = spec.batch_norm_train(x, np.ones(C), np.zeros(C), axis=axis, eps=layer.epsilon)
    close(layer.moving_mean.numpy(), mean_ref, tolerance("rerounded", "float32", "stats"))
    close(layer.moving_variance.numpy(), var_ref, tolerance("rerounded", "float32", "stats"))
    np.testing.assert_allclose(y, y_ref, atol=1e-3)


BAD_ARGUMENTS = [
    # (id, kwargs, error type, text the message must contain); type errors are ValueErrors too, like the spec's
    ("axis-float", {"axis": 1.5}, ValueError, "axis"),
    ("axis-str", {"axis": "1"}, ValueError, "axis"),
    ("axis-bool", {"axis": True}, ValueError, "axis"),
    ("axis-none", {"axis": None}, ValueError, "axis"),
    ("axis-list", {"axis": [1]}, ValueError, "axis"),  # Keras' int(axis) refuses lists too
    ("epsilon-zero", {"epsilon": 0.0}, ValueError, "epsilon must be > 0 and finite, got 0.0"),
    ("epsilon-negative", {"epsilon": -1e-3}, ValueError, "epsilon must be > 0 and finite"),
    ("epsilon-inf", {"epsilon": math.inf}, ValueError, "epsilon must be > 0 and finite, got inf"),
    ("epsilon-nan", {"epsilon": math.nan}, ValueError, "epsilon must be > 0 and finite, got nan"),
    ("epsilon-str", {"epsilon": "1e-3"}, ValueError, "epsilon must be a real number, got str"),
    ("momentum-above-1", {"momentum": 1.5}, ValueError, "momentum"),
    ("momentum-negative", {"momentum": -0.1}, ValueError, "momentum"),
    ("momentum-nan", {"momentum": math.nan}, ValueError, "momentum"),
    ("momentum-str", {"momentum": "0.9"}, ValueError, "momentum"),
    ("momentum-bool", {"momentum": True}, ValueError, "momentum"),
    ("renorm_momentum-above-1", {"renorm": True, "renorm_momentum": 1.5}, ValueError, "renorm_momentum"),
    ("renorm_momentum-negative", {"renorm_momentum": -0.5}, ValueError, "renorm_momentum"),
    ("renorm_momentum-str", {"renorm_momentum": "0.9"}, ValueError, "renorm_momentum"),
    ("renorm_clipping-list", {"renorm": True, "renorm_clipping": [1.0, 3.0]}, ValueError, "renorm_clipping"),
    ("renorm_clipping-key", {"renorm": True, "renorm_clipping": {"rmx": 3.0}}, ValueError, "renorm_clipping"),
    ("renorm_clipping-str", {"renorm": True, "renorm_clipping": {"rmax": "3"}}, ValueError, "renorm_clipping['rmax']"),
    ("renorm_clipping-nan", {"renorm": True, "renorm_clipping": {"dmax": math.nan}}, ValueError, "dmax"),
    ("renorm_clipping-negative-rmin", {"renorm": True, "renorm_clipping": {"rmin": -1.0}}, ValueError, "rmin"),
    ("renorm_clipping-negative-dmax", {"renorm": True, "renorm_clipping": {"dmax": -1.0}}, ValueError, "dmax"),
    (
        "renorm_clipping-rmax-below-rmin",
        {"renorm": True, "renorm_clipping": {"rmax": 1, "rmin": 2}},
        ValueError,
        "rmax",
    ),
    ("center-str", {"center": "yes"}, ValueError, "center"),
    ("scale-int", {"scale": 1}, ValueError, "scale"),
    ("renorm-none", {"renorm": None}, ValueError, "renorm"),
    ("synchronized-str", {"synchronized": "no"}, ValueError, "synchronized"),
    ("affine_trainable-int", {"affine_trainable": 0}, ValueError, "affine_trainable"),
    ("fused-str", {"fused": "auto"}, ValueError, "fused"),
    ("stats_update", {"stats_update": "never"}, ValueError, "stats_update"),
    ("normalize_with", {"normalize_with": "running"}, ValueError, "normalize_with"),
]


@pytest.mark.parametrize(("kwargs", "error", "text"), [c[1:] for c in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_argument_is_refused_naming_it(kwargs, error, text):
    with pytest.raises(error, match=re.escape(text)):
        keras_bn.BatchNorm(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"axis": np.int64(1)}, id="axis-numpy-int"),
        pytest.param({"epsilon": np.float32(1e-5), "momentum": np.float64(0.5)}, id="numpy-floats"),
        pytest.param({"momentum": 0, "renorm_momentum": 1}, id="int-momenta"),
        pytest.param({"renorm": True, "renorm_clipping": {"rmax": math.inf, "rmin": 0, "dmax": None}}, id="clip-inf"),
        pytest.param({"renorm_clipping": {"anything": 1}}, id="clipping-ignored-without-renorm"),  # as Keras
    ],
)
def test_valid_arguments_of_every_numeric_type_are_accepted(kwargs):
    layer = keras_bn.BatchNorm(**kwargs)
    assert keras_bn.BatchNorm.from_config(layer.get_config()).get_config() == layer.get_config()


BAD_MASKS = [
    # (id, input shape, mask shape, text)
    ("rank-equal", (2, 3, 4), (2, 3, 4), "one dimension less"),
    ("rank-too-low", (2, 3, 4), (2,), "one dimension less"),
    ("wrong-time-size", (2, 3, 4), (2, 5), "does not broadcast"),
    ("wrong-batch-size", (2, 3, 4, 5), (3, 3, 4), "does not broadcast"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize(("shape", "mask_shape", "text"), [c[1:] for c in BAD_MASKS], ids=[c[0] for c in BAD_MASKS])
def test_mask_of_a_wrong_shape_is_refused_naming_the_mask(shape, mask_shape, text, training):
    layer = keras_bn.BatchNorm()
    with pytest.raises(ValueError, match=f"mask.*{text}|{text}.*mask"):
        layer(np.ones(shape, np.float32), mask=np.ones(mask_shape, bool), training=training)


@pytest.mark.parametrize(
    ("shape", "axis", "mask_shape"),
    [
        case((5, 2, 3), 1, (5, 2), peer="keras-builtin", layout="ncl", detail="time-mask"),
        case((5, 3, 3, 2), 1, (5, 3, 3), peer="keras-builtin", layout="nchw", detail="nch-mask"),
        case((1, 2, 3, 4), -1, (1, 2, 1), peer="keras-builtin", layout="nhwc", detail="broadcast-mask"),
        case((4, 3, 6), -1, (4, 3), peer="keras-builtin", layout="nlc", detail="time-mask"),
    ],
)
def test_masked_statistics_follow_keras_rule(rng, shape, axis, mask_shape):
    """Keras expands a mask on the last axis and counts it after broadcasting, whatever ``axis`` is."""
    x = rng.normal(2.0, 3.0, shape).astype(np.float32)
    mask = rng.random(mask_shape) > 0.3
    mask.flat[0] = True
    ours, builtin = (
        keras_bn.BatchNorm(axis=axis, momentum=0.0),
        keras.layers.BatchNormalization(axis=axis, momentum=0.0),
    )
    y, y_keras = ours(x, training=True, mask=mask), builtin(x, training=True, mask=mask)
    # Keras divides by (count + 1e-7): relative 1e-7 / count on O(1) values, under float32's 1.2e-7 ulp.
    close(y, y_keras, tolerance("cross-framework", "float32", "y"), what="y")
    stats_tol = tolerance("cross-framework", "float32", "stats")
    close(ours.moving_mean, builtin.moving_mean, stats_tol, what="moving_mean")
    close(ours.moving_variance, builtin.moving_variance, stats_tol, what="moving_variance")
