"""keras_bn.BatchNorm against its peers, step by step: Keras' built-in layer (default convention,
masking, renorm, trainable=False) and torch.nn.BatchNorm1d/2d/3d (convention="torch"); and the
layer under the Keras torch backend against the spec.

Each step compares outputs, input and parameter gradients (for a fixed random cotangent) and
every weight, then applies the *same* SGD update to both sides so later steps start equal.

Tolerances: tests/numerics.py, cross-framework float32 (outputs and dx 1e-5, parameter gradients
1e-4 absolute, moving statistics 2e-6 relative + 1e-7 absolute; the reasons are there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from cases import case, momentum_id
from numerics import close, tolerance

import keras_bn
import spec

OUT_TOL = tolerance("cross-framework", "float32", "y")
PARAM_GRAD_TOL = tolerance("cross-framework", "float32", "param-grad")
STAT_TOL = tolerance("cross-framework", "float32", "stats")
STEPS = 10
LR = 0.1


def _batch(rng, shape, axis, step):
    """Per-channel means/scales that drift with the step (exercises renorm's clipping)."""
    channels = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = channels
    loc = (0.3 * step + np.arange(channels)).reshape(bshape)
    scale = (0.5 + 0.2 * step + np.arange(channels) / channels).reshape(bshape)
    return (loc + scale * rng.standard_normal(shape)).astype(np.float32)


def _keras_step(layer, x, upstream, mask=None):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, mask=mask)
        loss = tf.reduce_sum(y * upstream)
    params = [w for w in (layer.gamma, layer.beta) if w is not None]
    dx, *dparams = tape.gradient(loss, [x, *params])
    return np.asarray(y), np.asarray(dx), [np.asarray(g) for g in dparams]


def _compare_weights(ours, builtin, step):
    for a, b in zip(ours.weights, builtin.weights, strict=True):
        close(a.numpy(), b.numpy(), STAT_TOL, what=f"{a.name}, step {step}")


KERAS_CASES = [
    case(shape, axis, fused, peer="keras-builtin", layout=layout, detail="fused" if fused else "generic")
    for layout, shape, axis, fused in [
        ("nhwc", (4, 5, 6, 3), -1, True),
        ("nhwc", (4, 5, 6, 3), -1, False),
        ("nchw", (4, 3, 5, 6), 1, True),
        ("nc", (32, 6), -1, True),
        ("nlc", (4, 7, 5), -1, False),
        ("ncdhw", (2, 3, 3, 4, 5), 1, True),
    ]
]


@pytest.mark.parametrize(("shape", "axis", "fused"), KERAS_CASES)
def test_default_layer_matches_keras_builtin_step_by_step(rng, shape, axis, fused):
    builtin = keras.layers.BatchNormalization(axis=axis, momentum=0.9)
    ours = keras_bn.BatchNorm(axis=axis, momentum=0.9, fused=fused)
    builtin.build(shape)
    ours.build(shape)
    channels = shape[axis]
    builtin.set_weights(
        [rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.5, channels), np.zeros(channels), np.ones(channels)]
    )
    ours.set_weights(builtin.get_weights())
    for step in range(STEPS):
        x = _batch(rng, shape, axis, step)
        upstream = rng.standard_normal(shape).astype(np.float32)
        y_b, dx_b, dp_b = _keras_step(builtin, x, upstream)
        y_o, dx_o, dp_o = _keras_step(ours, x, upstream)
        close(y_o, y_b, OUT_TOL, what=f"y, step {step}")
        close(dx_o, dx_b, OUT_TOL, what=f"dx, step {step}")
        for name, a, b in zip(("dgamma", "dbeta"), dp_o, dp_b, strict=True):
            close(a, b, PARAM_GRAD_TOL, what=f"{name}, step {step}")
        _compare_weights(ours, builtin, step)
        for layer in (builtin, ours):  # identical SGD step from the built-in's gradients
            layer.gamma.assign(layer.gamma - LR * dp_b[0])
            layer.beta.assign(layer.beta - LR * dp_b[1])
    x = _batch(rng, shape, axis, STEPS)
    close(np.asarray(ours(x)), np.asarray(builtin(x)), OUT_TOL, what="inference")


def test_masked_sequences_match_keras_builtin(rng):
    """Keras' mask semantics (channels last): masked steps excluded from the statistics.

    Keras divides by (count + 1e-7); with counts >= 8 that is a 1e-8 relative difference.
    """
    shape = (4, 9, 3)
    builtin, ours = keras.layers.BatchNormalization(momentum=0.8), keras_bn.BatchNorm(momentum=0.8)
    builtin.build(shape)
    ours.build(shape)
    for step in range(5):
        mask = rng.uniform(size=shape[:2]) < 0.6
        mask[:, 0] = True
        x = _batch(rng, shape, -1, step)
        upstream = rng.standard_normal(shape).astype(np.float32)
        y_b, dx_b, dp_b = _keras_step(builtin, x, upstream, mask=tf.constant(mask))
        y_o, dx_o, dp_o = _keras_step(ours, x, upstream, mask=tf.constant(mask))
        keep = mask[..., None].repeat(3, -1)
        close(y_o[keep], y_b[keep], OUT_TOL)
        close(dx_o, dx_b, OUT_TOL)
        for a, b in zip(dp_o, dp_b, strict=True):
            close(a, b, PARAM_GRAD_TOL)
        _compare_weights(ours, builtin, step)


@pytest.mark.parametrize(
    "clipping",
    [{}, {"rmax": 1.3, "rmin": 0.8, "dmax": 0.4}],
    ids=["unclipped", "clipped"],
)
def test_renorm_matches_keras_builtin_renorm(rng, clipping):
    """Batch renormalization: same 7 weights, outputs and gradients over 10 drifting batches."""
    shape = (8, 4, 4, 3)
    kwargs = {"renorm": True, "renorm_clipping": dict(clipping), "renorm_momentum": 0.7, "momentum": 0.8}
    builtin, ours = keras.layers.BatchNormalization(**kwargs), keras_bn.BatchNorm(**kwargs)
    builtin.build(shape)
    ours.build(shape)
    assert [w.name for w in ours.weights] == [w.name for w in builtin.weights]
    for step in range(STEPS):
        x = _batch(rng, shape, -1, step)
        upstream = rng.standard_normal(shape).astype(np.float32)
        y_b, dx_b, dp_b = _keras_step(builtin, x, upstream)
        y_o, dx_o, dp_o = _keras_step(ours, x, upstream)
        close(y_o, y_b, OUT_TOL, what=f"y, step {step}")
        close(dx_o, dx_b, OUT_TOL, what=f"dx, step {step}")
        for a, b in zip(dp_o, dp_b, strict=True):
            close(a, b, PARAM_GRAD_TOL)
        _compare_weights(ours, builtin, step)


def test_trainable_false_means_inference_mode_like_keras(rng):
    shape = (4, 5, 5, 3)
    builtin, ours = keras.layers.BatchNormalization(), keras_bn.BatchNorm()
    builtin.build(shape)
    ours.build(shape)
    builtin.set_weights([rng.uniform(0.5, 1.5, 3), rng.normal(0, 0.5, 3), rng.normal(0, 1, 3), rng.uniform(0.5, 2, 3)])
    ours.set_weights(builtin.get_weights())
    for layer in (builtin, ours):
        layer.trainable = False
    x = _batch(rng, shape, -1, 0)
    before = [w.numpy().copy() for w in ours.weights]
    close(np.asarray(ours(x, training=True)), np.asarray(builtin(x, training=True)), OUT_TOL)
    gamma, beta, mean, var = (w.astype(np.float64) for w in before)
    y_ref = spec.batch_norm_infer(x, gamma, beta, mean, var, axis=-1, eps=1e-3)
    close(np.asarray(ours(x, training=True)), y_ref, OUT_TOL)
    for a, b in zip(before, ours.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    assert ours.trainable_weights == [] and len(ours.non_trainable_weights) == 4


def test_weights_transfer_both_ways_with_keras_builtin(rng):
    builtin, ours = keras.layers.BatchNormalization(), keras_bn.BatchNorm()
    builtin.build((2, 4))
    ours.build((2, 4))
    values = [rng.standard_normal(4).astype(np.float32) for _ in range(4)]
    builtin.set_weights(values)
    ours.set_weights(builtin.get_weights())
    builtin.set_weights([v + 1 for v in ours.get_weights()])
    for a, b in zip(builtin.get_weights(), values, strict=True):
        np.testing.assert_array_equal(a, b + 1)
    assert [w.name for w in ours.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]


# --- torch.nn.BatchNorm --------------------------------------------------------------------------

TORCH_CASES = [
    case(module, shape, perm, momentum, peer=f"torch.nn.{module}", layout=layout, detail=momentum_id(momentum))
    for module, layout, shape, perm in [
        ("BatchNorm1d", "nc", (16, 5), None),
        ("BatchNorm1d", "ncl", (4, 5, 7), None),
        ("BatchNorm2d", "nchw", (4, 3, 6, 5), None),
        ("BatchNorm2d", "nhwc", (4, 3, 6, 5), (0, 2, 3, 1)),
        ("BatchNorm3d", "ncdhw", (2, 3, 3, 4, 5), None),
    ]
    for momentum in (0.1, None)
]


@pytest.mark.parametrize(("module", "shape", "perm", "momentum"), TORCH_CASES)
def test_torch_convention_matches_torch_batchnorm_step_by_step(rng, module, shape, perm, momentum):
    """convention='torch' = torch.nn.BatchNormNd in training: unbiased running var, eps 1e-5.

    ``perm`` feeds our layer the channels-last transpose of torch's NC... input (axis=-1).
    """
    torch = pytest.importorskip("torch")
    channels = shape[1]
    ref = getattr(torch.nn, module)(channels, momentum=momentum).double()
    ours = keras_bn.BatchNorm(
        axis=-1 if perm else 1, convention="torch", momentum="cumulative" if momentum is None else momentum
    )
    to_ours = (lambda a: np.transpose(a, perm)) if perm else (lambda a: a)
    ours.build(to_ours(np.zeros(shape)).shape)
    gamma, beta = rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.5, channels)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(gamma))
        ref.bias.copy_(torch.from_numpy(beta))
    ours.gamma.assign(gamma.astype(np.float32))
    ours.beta.assign(beta.astype(np.float32))
    ref.weight.data = ref.weight.data.float().double()  # both start from the float32-rounded values
    ref.bias.data = ref.bias.data.float().double()
    for step in range(STEPS):
        x = _batch(rng, shape, 1, step)
        upstream = rng.standard_normal(shape).astype(np.float32)
        xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
        yt = ref.train()(xt)
        (yt * torch.from_numpy(upstream.astype(np.float64))).sum().backward()
        y_o, dx_o, (dg_o, db_o) = _keras_step(ours, to_ours(x), to_ours(upstream))
        close(y_o, to_ours(yt.detach().numpy()), OUT_TOL, what=f"y, step {step}")
        close(dx_o, to_ours(xt.grad.numpy()), OUT_TOL, what=f"dx, step {step}")
        close(dg_o, ref.weight.grad.numpy(), PARAM_GRAD_TOL, what=f"dgamma, step {step}")
        close(db_o, ref.bias.grad.numpy(), PARAM_GRAD_TOL, what=f"dbeta, step {step}")
        close(ours.moving_mean.numpy(), ref.running_mean.numpy(), STAT_TOL)
        close(ours.moving_variance.numpy(), ref.running_var.numpy(), STAT_TOL)
        if momentum is None:
            assert int(ours.num_batches_tracked.numpy()) == int(ref.num_batches_tracked) == step + 1
        with torch.no_grad():  # the same SGD step on both, from torch's gradients
            new_gamma = (ref.weight - LR * ref.weight.grad).float().double()
            new_beta = (ref.bias - LR * ref.bias.grad).float().double()
            ref.weight.copy_(new_gamma)
            ref.bias.copy_(new_beta)
            ref.weight.grad = ref.bias.grad = None
        ours.gamma.assign(new_gamma.numpy().astype(np.float32))
        ours.beta.assign(new_beta.numpy().astype(np.float32))
    x = _batch(rng, shape, 1, STEPS)
    y_ref = ref.eval()(torch.from_numpy(x.astype(np.float64))).detach().numpy()
    close(np.asarray(ours(to_ours(x))), to_ours(y_ref), OUT_TOL, what="inference")


# --- Keras torch backend ---------------------------------------------------------------------------

_TORCH_BACKEND_SCRIPT = textwrap.dedent(
    """
    import json, os
    import numpy as np
    import keras, torch
    import keras_bn, spec
    assert keras.backend.backend() == "torch"
    rng = np.random.default_rng(7)
    errors = {}
    for conv, momentum, spec_momentum, mode, shape, axis in [
        ("keras", None, spec.DEFAULT, "auto", (4, 5, 6, 3), -1),
        ("torch", None, spec.DEFAULT, "auto", (4, 3, 5, 6), 1),
        ("torch", "cumulative", None, "deferred", (6, 4), -1),
        ("caffe", None, spec.DEFAULT, "deferred", (3, 4, 5), 1),
        ("tf1", None, spec.DEFAULT, "frozen", (2, 3, 3, 4, 3), -1),
    ]:
        layer = keras_bn.BatchNorm(axis=axis, convention=conv, momentum=momentum, stats_update=mode)
        layer.build(shape)
        c = shape[axis]
        gamma, beta = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(0, 0.5, c).astype(np.float32)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        mean, var = np.zeros(c), np.ones(c)
        err = {"y": 0.0, "stats": 0.0}
        for step in range(10):
            x = (1.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
            y = keras.ops.convert_to_numpy(layer(x, training=True))
            y_ref, bm, bv = spec.batch_norm_train(x, gamma, beta, axis=axis, eps=layer.epsilon)
            err["y"] = max(err["y"], float(np.abs(y - y_ref).max()))
            if mode != "frozen":
                keras_bn.apply_updates(layer)
                mean, var = spec.update_running_stats(mean, var, bm, bv, x.size // c, convention=conv,
                                                      momentum=spec_momentum, num_batches_tracked=step)
            got = [keras.ops.convert_to_numpy(w) for w in (layer.moving_mean, layer.moving_variance)]
            err["stats"] = max(err["stats"], float(np.max(np.abs(got[0] - mean) / (1 + np.abs(mean)))),
                               float(np.max(np.abs(got[1] - var) / (1 + np.abs(var)))))
        x = rng.standard_normal(shape).astype(np.float32)
        y_ref = spec.batch_norm_infer(x, gamma, beta, mean, var, axis=axis, eps=layer.epsilon)
        err["infer"] = float(np.abs(keras.ops.convert_to_numpy(layer(x)) - y_ref).max())
        errors[f"{conv}-{mode}-{len(shape)}d"] = err
    # gradients (keras.ops.custom_gradient on torch) against spec.batch_norm_backward
    for shape, axis in [((4, 5, 6, 3), -1), ((4, 3, 5, 6), 1)]:
        layer = keras_bn.BatchNorm(axis=axis, convention="torch")
        layer.build(shape)
        gamma = rng.uniform(0.5, 1.5, 3).astype(np.float32)
        layer.gamma.assign(gamma)
        x = (1.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        xt = torch.tensor(x, requires_grad=True)
        (layer(xt, training=True) * torch.tensor(dy)).sum().backward()
        dx, dgamma, dbeta = spec.batch_norm_backward(dy, x, gamma, axis=axis, eps=layer.epsilon)
        errors[f"grad-{len(shape)}d-axis{axis}"] = {
            "dx": float(np.abs(xt.grad.numpy() - dx).max()),
            "dgamma": float(np.abs(layer.gamma.value.grad.numpy() - dgamma).max()),
            "dbeta": float(np.abs(layer.beta.value.grad.numpy() - dbeta).max()),
        }
    # the plain training step is torch_ref's Function (keras_bn/_torch_backend.py), a masked one keras.ops' path
    layer = keras_bn.BatchNorm()
    x = torch.tensor(rng.standard_normal((4, 3)).astype(np.float32), requires_grad=True)
    errors["grad_fn"] = type(layer(x, training=True).grad_fn).__name__
    # forgetting apply_updates is an error on this (eager) backend too
    layer = keras_bn.BatchNorm(stats_update="deferred")
    layer(np.ones((4, 2), np.float32), training=True)
    try:
        layer(np.ones((4, 2), np.float32), training=True)
        errors["forgot"] = "no error"
    except RuntimeError as e:
        errors["forgot"] = str(e)
    print("RESULT" + json.dumps(errors))
    """
)


@pytest.mark.slow  # a subprocess under KERAS_BACKEND=torch
def test_layer_runs_and_matches_spec_under_keras_torch_backend():
    """The layer on KERAS_BACKEND=torch (a fresh process: the backend is fixed at import), whose plain training
    step is torch_ref's autograd Function: outputs and statistics over 10 steps for five conventions/modes/ranks,
    gradients against spec.batch_norm_backward, that Function in the graph, and the forgotten-apply error.

    Tolerances as in test_layer_spec (float32 vs float64): outputs 1e-5, stats 2e-6 relative.
    """
    pytest.importorskip("torch")
    env = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_BACKEND_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert "was called in training mode while its previous moving-statistics update" in errors.pop("forgot")
    assert errors.pop("grad_fn") == "_BatchNormTrainWithJvpBackward"
    for run in ("grad-4d-axis-1", "grad-4d-axis1"):
        err = errors.pop(run)
        # dx O(1) within 1e-5; dgamma/dbeta sum 120 terms of O(3): 1e-4
        assert err["dx"] < OUT_TOL.atol and max(err["dgamma"], err["dbeta"]) < PARAM_GRAD_TOL.atol, (run, err)
    assert len(errors) == 5
    for run, err in errors.items():
        assert err["y"] < OUT_TOL.atol and err["infer"] < OUT_TOL.atol, (run, err)
        assert err["stats"] < STAT_TOL.rtol, (run, err)
