"""PyTorch as an independent source: torch.nn.BatchNorm1d/2d/3d against the spec.

Outputs and running statistics over 12 training steps (momentum 0.1, 0.3 and None; batch sizes
vary so Bessel's correction and the cumulative average are exercised), inference with the
resulting statistics, and autograd gradients against ``spec.batch_norm_backward``.
``pytest -s`` prints the largest errors seen.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from _peer_errors import PeerErrors
from cases import case, momentum_id
from numerics import tolerance

import spec

PEERS = PeerErrors()  # its largest errors are printed after the module (conftest.py)
agree = PEERS.agree


MODULES = {
    "BatchNorm1d-NC": (torch.nn.BatchNorm1d, (5,)),
    "BatchNorm1d-NCL": (torch.nn.BatchNorm1d, (4, 7)),
    "BatchNorm2d-NCHW": (torch.nn.BatchNorm2d, (3, 5, 4)),
    "BatchNorm3d-NCDHW": (torch.nn.BatchNorm3d, (2, 3, 4, 3)),
}

# Tolerances. The data are O(1) to O(10) (offset up to 3, scale up to 3); |y| <~ 6.
# float64: torch and the spec are both double; 1e-12 relative covers reordered sums.
# float32: torch accumulates CPU statistics in double and rounds once, so y is within a few
#   float32 ulps (1.2e-7 relative) of the spec: 1e-5 relative + 1e-5 absolute. Running stats are
#   float32 buffers re-rounded each of the 12 steps: 2e-6 relative + 1e-6 absolute.
TOL = {
    dtype: {"y": tolerance("peer-vs-spec", dtype, "y"), "stat": tolerance("peer-vs-spec", dtype, "stats")}
    for dtype in ("float32", "float64")
}


def _batch(rng: np.random.Generator, n: int, tail: tuple[int, ...], step: int, dtype: str) -> np.ndarray:
    c = tail[0]
    shape = (n, *tail)
    loc = rng.uniform(-3, 3, c).reshape((1, c) + (1,) * (len(tail) - 1)) + 0.2 * step  # drifting inputs
    scale = rng.uniform(0.3, 3, c).reshape((1, c) + (1,) * (len(tail) - 1))
    return (loc + scale * rng.normal(size=shape)).astype(dtype)


def _torch_case(module: str, *values, dtype: str, detail: str | None = None):
    name, layout = module.split("-")
    return case(module, *values, dtype, peer=f"torch.nn.{name}", layout=layout, dtype=dtype, detail=detail)


TRAINING_CASES = [
    _torch_case(module, momentum, dtype=dtype, detail=momentum_id(momentum))
    for module in MODULES
    for dtype in ("float32", "float64")
    for momentum in (0.1, 0.3, None)
]
BACKWARD_CASES = [_torch_case(module, dtype=dtype) for module in MODULES for dtype in ("float32", "float64")]


@pytest.mark.parametrize(("module", "momentum", "dtype"), TRAINING_CASES)
def test_torch_training_steps_match_spec(module, momentum, dtype):
    cls, tail = MODULES[module]
    c = tail[0]
    rng = np.random.default_rng(zlib.crc32(f"{module}/{momentum}/{dtype}".encode()))  # stable across runs
    bn = cls(c, eps=1e-5, momentum=momentum).to(getattr(torch, dtype))
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
    gamma, beta = bn.weight.detach().numpy().copy(), bn.bias.detach().numpy().copy()
    running_mean, running_var = np.zeros(c), np.ones(c)  # torch's initial buffers
    tol = TOL[dtype]
    bn.train()
    for step in range(12):
        n = (3, 8, 5, 16)[step % 4] if len(tail) > 1 else (3, 8, 5, 16)[step % 4] * 4
        x = _batch(rng, n, tail, step, dtype)
        with torch.no_grad():
            y = bn(torch.from_numpy(x))
        want_y, mean, var = spec.batch_norm_train(x, gamma, beta, axis=1, eps=1e-5)
        count = x.size // c
        running_mean, running_var = spec.update_running_stats(
            running_mean, running_var, mean, var, count, convention="torch", momentum=momentum, num_batches_tracked=step
        )
        agree("torch.nn.BatchNorm", y, want_y, tol["y"], what=f"{module} step {step}: y")
        agree("torch.nn.BatchNorm", bn.running_mean, running_mean, tol["stat"], what=f"step {step}: running_mean")
        agree("torch.nn.BatchNorm", bn.running_var, running_var, tol["stat"], what=f"step {step}: running_var")
        assert int(bn.num_batches_tracked) == step + 1
    bn.eval()
    x = _batch(rng, 4, tail, 12, dtype)
    with torch.no_grad():
        y = bn(torch.from_numpy(x))
    want = spec.batch_norm_infer(x, gamma, beta, running_mean, running_var, axis=1, eps=1e-5)
    agree("torch.nn.BatchNorm", y, want, tol["y"], what=f"{module}: inference after 12 steps")


def test_torch_channels_last_memory_format_matches_spec():
    """The NHWC kernel (channels_last memory format) is a different code path in ATen."""
    rng = np.random.default_rng(7)
    bn = torch.nn.BatchNorm2d(6)
    x = _batch(rng, 4, (6, 5, 5), 0, "float32")
    with torch.no_grad():
        y = bn(torch.from_numpy(x).to(memory_format=torch.channels_last))
    want, mean, var = spec.batch_norm_train(x, np.ones(6), np.zeros(6), axis=1, eps=1e-5)
    agree("torch.nn.BatchNorm", y.contiguous(), want, TOL["float32"]["y"], what="channels_last y")
    rm, rv = spec.update_running_stats(np.zeros(6), np.ones(6), mean, var, x.size // 6, convention="torch")
    agree("torch.nn.BatchNorm", bn.running_var, rv, TOL["float32"]["stat"], what="channels_last running_var")


@pytest.mark.parametrize(("module", "dtype"), BACKWARD_CASES)
def test_torch_autograd_matches_spec_backward(module, dtype):
    cls, tail = MODULES[module]
    c = tail[0]
    rng = np.random.default_rng(len(module) * 31 + len(dtype))
    bn = cls(c, eps=1e-5).to(getattr(torch, dtype))
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c)))
    x = _batch(rng, 6 if len(tail) > 1 else 24, tail, 0, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    xt = torch.from_numpy(x).requires_grad_(True)
    (bn(xt) * torch.from_numpy(dy)).sum().backward()
    gamma = bn.weight.detach().numpy()
    dx, dgamma, dbeta = spec.batch_norm_backward(dy, x, gamma, axis=1, eps=1e-5)
    # dx sums three O(m) terms that cancel to O(1) (SPEC.md, Backward): in float32 that costs
    # ~m ulps of the largest term; m <= 192 here, so 1e-4 absolute on O(1) gradients.
    # dgamma/dbeta are sums of m O(1) products: 1e-5 relative + 1e-4 absolute in float32.
    grad_tol = tolerance("autodiff", dtype, "grad")
    agree("torch autograd", xt.grad, dx, grad_tol, what=f"{module}: dx")
    agree("torch autograd", bn.weight.grad, dgamma, grad_tol, what=f"{module}: dgamma")
    agree("torch autograd", bn.bias.grad, dbeta, grad_tol, what=f"{module}: dbeta")


def test_torch_momentum_none_is_the_cumulative_mean_of_batch_statistics():
    """PyTorch docs: momentum=None gives a simple average; the spec must reproduce that exactly."""
    rng = np.random.default_rng(11)
    bn = torch.nn.BatchNorm1d(3, momentum=None).double()
    means, unbiased = [], []
    for step in range(10):
        x = _batch(rng, 5 + step, (3,), step, "float64")
        with torch.no_grad():
            bn(torch.from_numpy(x))
        means.append(x.mean(axis=0))
        unbiased.append(x.var(axis=0, ddof=1))
    # float64 averages of 10 O(1) numbers: SPEC §8.4's float64 statistics bound (1e-12) is rounding-level.
    agree("torch.nn.BatchNorm", bn.running_mean, np.mean(means, axis=0), TOL["float64"]["stat"], what="running_mean")
    agree("torch.nn.BatchNorm", bn.running_var, np.mean(unbiased, axis=0), TOL["float64"]["stat"], what="running_var")
