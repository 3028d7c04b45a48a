"""keras_bn's torch-backend shortcut (keras_bn/_torch_backend.py) and its one moving-statistics update.

On Keras' torch backend the layer's plain training step runs torch_ref's Function and updates the moving
statistics with ``_ops.update_running_stats(..., xp=torch)``: the very function the other backends run with
``xp=keras.ops``, on the torch tensors themselves, with the count as one Python number known from the shape.

Oracle: the update evaluated by hand in float32 with NumPy, one rounding per operation as the CPU kernels of
torch and TensorFlow (eager) round: ``w`` rounded once to float32, Bessel's ``var * m / (m - 1)`` where the
convention is unbiased, ``(1 - w) * old + w * batch``, unchanged where the batch has too few values. Every
namespace and count form must agree with it bit for bit, in every convention, for a batch with enough values,
one value (no unbiased variance) and none. The layer itself on ``KERAS_BACKEND=torch`` (a subprocess: the
backend is fixed at import) must give torch_ref's own outputs and gradients and this update's statistics bit
for bit; tests/test_layer_peers.py checks the same run against the float64 spec within tolerances.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from cases import case, momentum_id
from keras import ops

import spec
from keras_bn import _ops, _torch_backend

CONVENTIONS = [("keras", 0.99), ("torch", 0.1), ("torch", None), ("onnx", 0.9), ("tf1", 0.99), ("caffe", 0.999)]
CONVENTIONS += [("d2l", 0.9)]
BATCHES = 7  # num_batches_tracked before this update, where the convention counts


def float32_update(convention: str, momentum, values: list[np.ndarray], count: float):
    """``(new_mean, new_var, valid)`` of one update by hand in float32 (module docstring)."""
    conv = spec.get_convention(convention)
    running_mean, running_var, batch_mean, batch_var = values
    unbiased = conv.running_variance == "unbiased"
    valid = count > 1.0 if unbiased else count >= 1.0
    if not valid:
        return running_mean, running_var, False
    n = BATCHES if spec.needs_counter(conv, momentum) else None
    w = np.float32(spec.new_value_weight(conv, momentum, n))  # float64 weight, rounded once to the statistics'
    if unbiased:
        batch_var = batch_var * np.float32(count) / np.float32(count - 1.0)
    keep = np.float32(1.0) - w
    return keep * running_mean + w * batch_mean, keep * running_var + w * batch_var, True


# namespace -> (xp, the tensor of a NumPy array, whether the count is one Python number)
NAMESPACES = {
    "torch": (torch, torch.from_numpy, False),
    "torch-count_number": (torch, torch.from_numpy, True),  # the torch backend's layer path
    "tensorflow": (ops, ops.convert_to_tensor, False),  # keras.ops on this process's TensorFlow backend, eager
}
CASES = [
    case(*row, peer=row[3], convention=row[0], detail=f"{momentum_id(row[1])}-count{int(row[2])}")
    for row in (
        (convention, momentum, count, namespace)
        for namespace in NAMESPACES
        for convention, momentum in CONVENTIONS
        for count in (64.0, 1.0, 0.0)
    )
]


@pytest.mark.parametrize(("convention", "momentum", "count", "namespace"), CASES)
def test_update_is_the_float32_update_by_hand_in_every_namespace(convention, momentum, count, namespace, rng) -> None:
    conv = spec.get_convention(convention)
    values = [rng.uniform(0.1, 3.0, 6).astype(np.float32) for _ in range(4)]  # running mean/var, batch mean/var
    xp, tensor, count_number = NAMESPACES[namespace]
    counter = {}
    if spec.needs_counter(conv, momentum):
        counter = {"num_batches_tracked": tensor(np.array(BATCHES, np.int64))}
    counts = count if count_number else tensor(np.full(6, count, np.float32))
    got = _ops.update_running_stats(
        *(tensor(v) for v in values), counts, conv=conv, momentum=momentum, xp=xp, **counter
    )
    want_mean, want_var, want_valid = float32_update(convention, momentum, values, count)
    np.testing.assert_array_equal(ops.convert_to_numpy(got[0]), want_mean, err_msg="mean")
    np.testing.assert_array_equal(ops.convert_to_numpy(got[1]), want_var, err_msg="variance")
    if count_number:
        assert got[2] is want_valid
    else:
        np.testing.assert_array_equal(ops.convert_to_numpy(got[2]), np.full(6, want_valid), err_msg="valid")


@pytest.mark.parametrize(
    ("shape", "axis"),
    [case((4, 5, 6, 3), 3, layout="nhwc"), case((4, 3, 5), 1, layout="ncl"), case((6, 4), 1, layout="nc")],
)
def test_torch_train_returns_the_generic_paths_statistics(shape: tuple[int, ...], axis: int, rng) -> None:
    """The count as one number (values per channel), batch mean and biased variance per channel (C,) at the layer's
    channel axis without gradient, y differentiable."""
    x = torch.from_numpy((1.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)).requires_grad_()
    gamma = torch.ones(shape[axis], requires_grad=True)
    y, (count, mean, var) = _torch_backend.train(x, gamma, None, 1e-3, axis)
    ones, zeros = np.ones(shape[axis]), np.zeros(shape[axis])
    _, want_mean, want_var = spec.batch_norm_train(x.detach().numpy(), ones, zeros, axis=axis)
    assert count == x.numel() // shape[axis] and isinstance(count, float)
    # float32 shifted moments against the float64 reference on O(1..10) data: a few float32 ulp
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var.numpy(), want_var, rtol=1e-5)
    assert mean.shape == var.shape == (shape[axis],) and not (mean.requires_grad or var.requires_grad)
    assert y.shape == x.shape and y.requires_grad


_LAYER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    import keras, keras_bn
    from torch_ref import batch_norm_train
    sys.path.insert(0, sys.argv[1])
    from test_keras_torch_backend import float32_update

    rng = np.random.default_rng(5)
    mismatches = {}
    for convention, momentum, stats_update in json.loads(sys.argv[2]):
        for shape in [(8, 5, 5, 3), (16, 7)]:
            layer = keras_bn.BatchNorm(convention=convention, stats_update=stats_update,
                                       **({} if momentum is None else {"momentum": momentum}))
            layer.build(shape)
            name = f"{convention}-{momentum}-{stats_update}-{len(shape)}d"
            bad = mismatches.setdefault(name, [])
            for step in range(3):
                x = torch.from_numpy((2 + 3 * rng.standard_normal(shape)).astype(np.float32)).requires_grad_()
                dy = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
                gamma, beta = layer.gamma.value, layer.beta.value
                old = [keras.ops.convert_to_numpy(v).copy() for v in (layer.moving_mean, layer.moving_variance)]
                y = layer(x, training=True)
                grads = torch.autograd.grad(y, [x, gamma, beta], grad_outputs=dy)
                if stats_update == "deferred":
                    keras_bn.apply_updates(layer)
                # oracle: torch_ref's Function itself, then the update by hand on its statistics
                want_y, mean, var = batch_norm_train(x, gamma, beta, layer.epsilon, channel_dim=-1)
                want_grads = torch.autograd.grad(want_y, [x, gamma, beta], grad_outputs=dy)
                want_mean, want_var, _ = float32_update(
                    convention, momentum, [*old, mean.numpy(), var.numpy()], float(x.numel() // shape[-1]))
                got = [y, *grads, layer.moving_mean, layer.moving_variance]
                want = [want_y, *want_grads, want_mean, want_var]
                for what, a, b in zip(["y", "dx", "dgamma", "dbeta", "mean", "var"], got, want):
                    a, b = (keras.ops.convert_to_numpy(t.detach() if torch.is_tensor(t) else t) for t in (a, b))
                    if a.tobytes() != b.tobytes():
                        bad.append(f"step {step} {what}")
    print("RESULT" + json.dumps(mismatches))
    """
)


@pytest.mark.slow  # a subprocess under KERAS_BACKEND=torch
def test_layer_on_torch_backend_is_torch_ref_and_the_float32_update_bit_for_bit() -> None:
    """Outputs and gradients are torch_ref's Function's, the moving statistics the update by hand on its
    statistics, bit for bit over 3 steps; auto and deferred updates, 4-D (NHWC) and 2-D inputs; biased and unbiased
    running variance (conventions without a batch counter: float32_update's counter is fixed)."""
    runs = [
        ("keras", 0.99, "auto"),
        ("keras", 0.99, "deferred"),
        ("torch", 0.1, "auto"),
        ("torch", 0.1, "deferred"),
        ("d2l", 0.9, "auto"),
    ]
    env = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", _LAYER_SCRIPT, tests_dir, json.dumps(runs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mismatches = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(mismatches) == 2 * len(runs)
    assert all(not bad for bad in mismatches.values()), mismatches
