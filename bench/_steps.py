"""Workloads shared by the benchmarks, written once so that two benchmarks time the same thing."""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = [
    "tf_batch_norm_step",
    "tf_batch_norm_steps",
    "torch_batch_norm_class",
    "torch_batch_norm_step",
    "torch_training_step",
]


def tf_batch_norm_step(layer, x, dy, *, jit: bool) -> Callable[[], tuple]:
    """One BN training step on TensorFlow: forward with ``training=True`` (moving statistics updated) and the
    backward from the fixed cotangent ``dy`` to x, gamma and beta, in ``tf.function(jit_compile=jit)``.

    The returned callable gives ``(y, dx, dgamma, dbeta)`` after synchronizing on ``dgamma`` (a small output),
    so a timer sees the whole step. ``y`` is an output too, so no compiler drops the forward's last pass.
    """
    step = tf_batch_norm_steps([layer], [x], [dy], jit=jit)
    return lambda: step()[0]


def tf_batch_norm_steps(layers: Sequence, xs: Sequence, dys: Sequence, *, jit: bool) -> Callable[[], list[tuple]]:
    """:func:`tf_batch_norm_step` for several independent layers in one ``tf.function`` call (e.g. a model's BN
    layers at their own shapes): one ``(y, dx, dgamma, dbeta)`` per layer, all synchronized before it returns."""
    import tensorflow as tf

    for layer, x in zip(layers, xs, strict=True):
        layer.build(x.shape)

    @tf.function(jit_compile=jit)
    def step(xs, dys):
        outputs = []
        for layer, x, dy in zip(layers, xs, dys, strict=True):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            outputs.append((y, *tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=dy)))
        return outputs

    def run() -> list[tuple]:
        outputs = step(list(xs), list(dys))
        for out in outputs:
            out[2].numpy()
        return outputs

    return run


def torch_training_step(model, images, labels) -> Callable[[], object]:
    """One PyTorch training step of ``model`` on fixed ``images`` and ``labels``: cross-entropy, SGD with momentum
    (lr 0.01, momentum 0.9), gradients reset to None first. Returns the loss (computed when it returns; no detach:
    one ATen call fewer in what the benchmarks time and profile)."""
    import torch

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def torch_batch_norm_class(package, shape: tuple[int, ...]) -> type:
    """``package``'s BatchNorm1d, 2d or 3d for an input of ``shape``: (N, C) or (N, C, L), (N, C, H, W) or
    (N, C, D, H, W). ``package``: torch.nn, torch_ref or a module with those classes (ab_torch_ref's older one)."""
    return getattr(package, {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)])


def torch_batch_norm_step(module: type, shape: tuple[int, ...] = (64, 64, 56, 56)) -> Callable[[], tuple]:
    """One BN training step of ``module`` (a BatchNorm*d class for ``shape``) alone, Keras' defaults (eps 1e-3,
    momentum 0.01), on fixed inputs: the forward (moving statistics updated) and the gradients of x, gamma and beta
    from a fixed cotangent, which it returns."""
    import numpy as np
    import torch

    bn = module(shape[1], eps=1e-3, momentum=0.01).train()
    rng = np.random.default_rng(0)
    x = torch.from_numpy((0.5 + rng.standard_normal(shape)).astype(np.float32)).requires_grad_(True)
    dy = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    def step() -> tuple:
        return torch.autograd.grad(bn(x), [x, bn.weight, bn.bias], grad_outputs=dy)

    return step
