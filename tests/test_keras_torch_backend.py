"""keras_bn's torch-backend shortcut (keras_bn/_torch_backend.py) against the keras.ops path it replaces.

On Keras' torch backend the layer's plain training step runs torch_ref's Function and updates the moving
statistics with torch ops directly. The update must be the very operations of ``_ops.update_running_stats``:
here both run on the same float32 values (the keras.ops version on this process's TensorFlow backend, eager, one
rounding per op like torch's CPU kernels) and must agree bit for bit, in every convention, for a batch with
enough values, one value (no unbiased variance) and none. The end-to-end check under ``KERAS_BACKEND=torch``
is tests/test_layer_peers.py's torch-backend test (slow: a subprocess).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from keras import ops

import spec
from keras_bn import _ops, _torch_backend

CASES = [
    (convention, momentum, count)
    for convention, momentum in [
        ("keras", 0.99),
        ("torch", 0.1),
        ("torch", None),
        ("onnx", 0.9),
        ("tf1", 0.99),
        ("caffe", 0.999),
        ("d2l", 0.9),
    ]
    for count in (64.0, 1.0, 0.0)
]


@pytest.mark.parametrize(
    ("convention", "momentum", "count"),
    CASES,
    ids=[f"{c}-momentum{m}-count{int(n)}" for c, m, n in CASES],
)
def test_torch_update_is_bit_identical_to_the_keras_ops_update(convention: str, momentum, count: float, rng) -> None:
    conv = spec.get_convention(convention)
    values = [rng.uniform(0.1, 3.0, 6).astype(np.float32) for _ in range(4)]  # running mean/var, batch mean/var
    counts = np.full(6, count, np.float32)
    batches = np.int64(7)
    keyword = {"conv": conv, "momentum": momentum}
    counter = {"num_batches_tracked": batches} if spec.needs_counter(conv, momentum) else {}
    want = _ops.update_running_stats(
        *(ops.convert_to_tensor(v) for v in values), ops.convert_to_tensor(counts), **keyword, **counter
    )
    counter = {"num_batches_tracked": torch.tensor(batches)} if counter else {}
    got = _torch_backend.update_running_stats(
        *(torch.from_numpy(v) for v in values), torch.from_numpy(counts), **keyword, **counter
    )
    for name, a, b in zip(("mean", "variance", "valid"), got, want, strict=True):
        np.testing.assert_array_equal(a.numpy(), ops.convert_to_numpy(b), err_msg=name)


@pytest.mark.parametrize(("shape", "axis"), [((4, 5, 6, 3), 3), ((4, 3, 5), 1), ((6, 4), 1)], ids=["NHWC", "NCL", "NC"])
def test_torch_train_returns_the_generic_paths_statistics(shape: tuple[int, ...], axis: int, rng) -> None:
    """Count per channel (C,), batch mean and biased variance at the layer's channel axis, y differentiable."""
    x = torch.from_numpy((1.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)).requires_grad_()
    gamma = torch.ones(shape[axis], requires_grad=True)
    y, (count, mean, var) = _torch_backend.train(x, gamma, None, 1e-3, axis)
    ones, zeros = np.ones(shape[axis]), np.zeros(shape[axis])
    _, want_mean, want_var = spec.batch_norm_train(x.detach().numpy(), ones, zeros, axis=axis)
    np.testing.assert_array_equal(count.numpy(), np.full(shape[axis], x.numel() // shape[axis], np.float32))
    # float32 shifted moments against the float64 reference on O(1..10) data: a few float32 ulp
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var.numpy(), want_var, rtol=1e-5)
    assert y.shape == x.shape and y.requires_grad
