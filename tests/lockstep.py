"""Train a Keras model and its PyTorch twin in lockstep and measure how far apart they drift.

Test infrastructure, not part of torch_ref: tests/test_torch_conformance.py runs it for 50 steps,
bench/bench_conformance.py for 300.

Both start from the same weights (``keras_to_torch``), see the same batches in the same order and
take one optimizer step per batch. After every step each PyTorch tensor is compared with its Keras
counterpart mapped into PyTorch layout by the (bit-exact) transfer, so a divergence is reported
per parameter and per moving statistic, not hidden in a loss curve.

Piecewise-linear decisions. ReLU (is the input > 0?) and max pooling (which element is largest?)
are discontinuous: an input that lies within rounding distance of the decision boundary can be
decided one way by TensorFlow and the other by PyTorch, and the gradient then differs by a whole
term, not by rounding (MNIST's zero background makes max-pool near-ties common). In float32 such
an event happens every few steps and the runs separate chaotically afterwards; in float64 it is
vanishingly rare. ``follow_keras_routing=True`` makes PyTorch's ``nn.ReLU`` and ``nn.MaxPool2d``
take Keras' decisions for the batch (the sign mask, the pooling argmax), so what remains is the
continuous arithmetic; each overridden decision is counted in ``StepDivergence.routing_flips``.

Directions BN cancels. A BN layer subtracts its batch mean, so the bias of the layer before it, and
any of that layer's weights whose input is constant over the batch (a background region after
flattening), do not change the training loss: their gradient is zero in exact arithmetic and pure
rounding noise in practice. SGD moves them by lr * noise (nothing), Adam by up to lr (it divides
the noise by its own size), independently in each framework; the running mean, which averages the
batch mean, inherits that drift. ``StepDivergence.max_param_bn_variant`` is the divergence of all
other parameter entries.

Optimizers are matched by their update rules:

- SGD with momentum: Keras ``v = mu*v - lr*g; w += v``; PyTorch ``b = mu*b + g; w -= lr*b``. The
  same trajectory (``v = -lr*b``) for a constant learning rate. Keras applies ``mu`` through
  ``ops.cast(mu, dtype)``, which on TensorFlow rounds a Python float to float32 first
  (0.9 -> 0.8999999762 even in float64), so PyTorch gets that rounded value too.
- Adam: the moment EMAs are the same; the step differs. Keras
  ``w -= alpha_t * m / (sqrt(v) + eps)`` with ``alpha_t = lr * sqrt(1 - b2^t) / (1 - b1^t)``;
  PyTorch ``w -= lr_t / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps_t)``. They are the same
  update iff ``eps_t = eps / sqrt(1 - b2^t)`` and ``lr_t = alpha_t (1 - b1^t) / sqrt(1 - b2^t)``, so
  both are set before every PyTorch step. With one constant eps on both sides (Keras' default 1e-7,
  PyTorch's 1e-8) every weight whose gradient is near eps would move differently, by up to ~lr per
  step. Keras forms ``b^t`` from the float32-rounded betas (the cast above); in ``1 - b2^t`` that
  rounding is a 6e-6 relative change of the first steps, so ``alpha_t`` uses the rounded values too.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import keras
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import keras_bn
import torch_ref
from torch_ref.transfer import _torch_units, keras_to_torch

__all__ = ["StepDivergence", "divergence", "make_optimizers", "signed_difference", "train_lockstep"]


@dataclass
class StepDivergence:
    """How far the two models are apart after ``step`` optimizer steps (max |keras - torch| per tensor)."""

    step: int
    loss_keras: float
    loss_torch: float
    per_tensor: dict[str, float] = field(repr=False)
    #: ReLU signs / max-pool windows where PyTorch's own decision differed from Keras' (follow_keras_routing only).
    routing_flips: int = 0
    #: keras - torch per tensor (PyTorch layout), when ``train_lockstep(keep_signed=True)``.
    signed: dict[str, np.ndarray] | None = field(default=None, repr=False)
    #: max(1, max |torch value|) per tensor, to state statistics' divergence relative to their size.
    scale: dict[str, float] = field(default_factory=dict, repr=False)
    #: max |keras - torch| over parameter entries BN does not cancel (see the module docstring).
    max_param_bn_variant: float = 0.0
    #: per layer feeding a BN: PyTorch's batch-mean input patch u this step (the BN's batch mean is W u + b).
    pre_bn_input_mean: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def max_param(self) -> float:
        return max((v for k, v in self.per_tensor.items() if not _is_stat(k)), default=0.0)

    @property
    def max_stat(self) -> float:
        return max((v for k, v in self.per_tensor.items() if _is_stat(k)), default=0.0)

    @property
    def max_stat_relative(self) -> float:
        """max over moving statistics of |keras - torch| / max(1, |value|)."""
        return max((v / self.scale.get(k, 1.0) for k, v in self.per_tensor.items() if _is_stat(k)), default=0.0)

    @property
    def worst(self) -> str:
        return max(self.per_tensor, key=self.per_tensor.__getitem__)

    def line(self) -> str:
        return (
            f"step {self.step:4d}  loss keras {self.loss_keras:.6f} torch {self.loss_torch:.6f}  "
            f"max|d param| {self.max_param:.3e}  max|d stat| {self.max_stat:.3e}  worst {self.worst:18s}"
            f"  routing flips {self.routing_flips}"
        )


def _is_stat(name: str) -> bool:
    return name.endswith(("running_mean", "running_var"))


def signed_difference(keras_model: keras.Model, torch_model: nn.Module) -> dict[str, np.ndarray]:
    """keras - torch (float64) for every floating tensor of ``torch_model.state_dict()``, in PyTorch layout."""
    mirror = copy.deepcopy(torch_model)
    keras_to_torch(keras_model, mirror)  # Keras' values in PyTorch layout, bit-exact
    ours, theirs = torch_model.state_dict(), mirror.state_dict()
    return {
        name: (theirs[name].double() - ours[name].double()).numpy() for name in ours if ours[name].is_floating_point()
    }


def divergence(keras_model: keras.Model, torch_model: nn.Module) -> dict[str, float]:
    """max |keras - torch| for every floating tensor of ``torch_model.state_dict()``, in PyTorch layout."""
    return {name: float(np.abs(d).max()) for name, d in signed_difference(keras_model, torch_model).items()}


def make_optimizers(
    name: str, keras_model: keras.Model, torch_model: nn.Module, *, lr: float, momentum: float = 0.0, eps: float = 1e-7
) -> tuple[keras.optimizers.Optimizer, torch.optim.Optimizer, Callable[[], None]]:
    """Matched optimizers ``(keras_opt, torch_opt, before_torch_step)`` for ``"sgd"`` or ``"adam"``.

    ``before_torch_step`` must run before every ``torch_opt.step()``: for Adam it sets PyTorch's
    eps to Keras' effective ``eps / sqrt(1 - beta2^t)`` (see the module docstring).
    """
    params = torch_model.parameters()
    if name == "sgd":
        keras_opt = keras.optimizers.SGD(learning_rate=lr, momentum=momentum)
        # The value Keras multiplies by: ops.cast(python_float, dtype) goes through float32 on TF.
        torch_opt = torch.optim.SGD(params, lr=lr, momentum=float(np.float32(momentum)))
        return keras_opt, torch_opt, lambda: None
    if name == "adam":
        beta_1, beta_2 = 0.9, 0.999
        keras_opt = keras.optimizers.Adam(learning_rate=lr, beta_1=beta_1, beta_2=beta_2, epsilon=eps)
        torch_opt = torch.optim.Adam(params, lr=lr, betas=(beta_1, beta_2), eps=eps)
        keras_b1, keras_b2 = float(np.float32(beta_1)), float(np.float32(beta_2))
        steps = iter(range(1, 2**62))

        def match_keras_adam() -> None:
            t = next(steps)
            alpha = lr * np.sqrt(1.0 - keras_b2**t) / (1.0 - keras_b1**t)  # Keras' step size
            correction_1, correction_2 = 1.0 - beta_1**t, np.sqrt(1.0 - beta_2**t)  # PyTorch's
            for group in torch_opt.param_groups:
                group["lr"] = alpha * correction_1 / correction_2
                group["eps"] = eps / correction_2

        return keras_opt, torch_opt, match_keras_adam
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


class _PreBatchNormInputs:
    """Watches the inputs of every Conv2d/Linear whose output goes straight into a BN.

    Per training forward it keeps the batch-mean input patch ``u`` (mean over batch and positions
    of the im2col rows) and, cumulatively, which input entries were constant over the batch: BN
    cancels the weights on those exactly as it cancels the bias.
    """

    def __init__(self, torch_model: nn.Module) -> None:
        units = _torch_units(torch_model)
        self.layers = {
            a.name: a.obj for a, b in itertools.pairwise(units) if a.kind != "batch_norm" and b.kind == "batch_norm"
        }
        self.mean: dict[str, np.ndarray] = {}
        self.constant: dict[str, np.ndarray] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in self.layers.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0].detach().double()
            if isinstance(module, nn.Conv2d):
                padding = 0 if module.padding == "valid" else module.padding
                cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
                cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # rows: (n, position); (c, kh, kw) order
            else:
                cols = x.reshape(-1, x.shape[-1])
            self.mean[name] = cols.mean(0).numpy()
            constant = (cols.amax(0) == cols.amin(0)).numpy()
            self.constant[name] = constant | self.constant.get(name, np.zeros_like(constant))

        return hook

    def max_bn_variant(self, signed: dict[str, np.ndarray]) -> float:
        """max |keras - torch| over parameter entries that BN does not cancel."""
        worst = 0.0
        for name, d in signed.items():
            layer, _, kind = name.rpartition(".")
            if layer in self.layers and kind == "bias":
                continue
            if layer in self.layers and kind == "weight" and layer in self.constant:
                d = d.reshape(d.shape[0], -1)[:, ~self.constant[layer]]
            if d.size and not name.endswith(("running_mean", "running_var")):
                worst = max(worst, float(np.abs(d).max()))
        return worst

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _KerasRouting:
    """Imposes Keras' ReLU signs and 2x2 max-pool argmaxes on the matching PyTorch modules."""

    def __init__(self, keras_model: keras.Model, torch_model: nn.Module) -> None:
        self.layers = [
            layer for layer in keras_model.layers if isinstance(layer, keras.layers.ReLU | keras.layers.MaxPooling2D)
        ]
        modules = [m for m in torch_model.modules() if isinstance(m, nn.ReLU | nn.MaxPool2d)]
        kinds = [isinstance(layer, keras.layers.ReLU) for layer in self.layers]
        if kinds != [isinstance(m, nn.ReLU) for m in modules]:
            raise ValueError("follow_keras_routing needs the same sequence of ReLU / MaxPool layers in both models")
        for layer in self.layers:
            if isinstance(layer, keras.layers.ReLU) and (
                layer.max_value is not None or layer.negative_slope != 0 or layer.threshold != 0
            ):
                raise ValueError(f"follow_keras_routing: ReLU {layer.name!r} is not a plain max(x, 0)")
            if isinstance(layer, keras.layers.MaxPooling2D) and (
                tuple(layer.pool_size) != (2, 2) or tuple(layer.strides) != (2, 2) or layer.padding != "valid"
            ):
                raise ValueError(f"follow_keras_routing supports 2x2/2 'valid' pooling only, got {layer.name!r}")
        # The same layers, also returning the input of every ReLU / pool: one forward gives both.
        self.probe = keras.Model(
            keras_model.inputs[0], [keras_model.outputs[0]] + [layer.input for layer in self.layers]
        )
        self.decisions: list[torch.Tensor] = []
        self.flips = 0
        self.handles = [
            m.register_forward_hook(self._relu if k else self._pool) for m, k in zip(modules, kinds, strict=True)
        ]

    def record(self, pre_activations: list) -> None:
        """Keras' decisions for this batch, in PyTorch's NCHW layout."""
        self.decisions = []
        for layer, value in zip(self.layers, pre_activations, strict=True):
            value = keras.ops.convert_to_numpy(value)
            if value.ndim == 4:
                value = value.transpose(0, 3, 1, 2)  # NHWC -> NCHW
            if isinstance(layer, keras.layers.ReLU):
                self.decisions.append(torch.from_numpy(np.ascontiguousarray(value > 0)))
            else:
                n, c, h, w = value.shape
                windows = value.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
                first_max = windows.reshape(n, c, h // 2, w // 2, 4).argmax(-1)  # row-major, first of ties
                rows = 2 * np.arange(h // 2)[:, None] + first_max // 2
                cols = 2 * np.arange(w // 2)[None, :] + first_max % 2
                self.decisions.append(torch.from_numpy(rows * w + cols))  # F.max_pool2d's flat indices

    def _relu(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        (x,) = inputs
        mask = self.decisions.pop(0)
        self.flips += int((mask != (x > 0)).sum())
        return x * mask.to(x.dtype)

    def _pool(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        (x,) = inputs
        index = self.decisions.pop(0).flatten(2)
        chosen = x.flatten(2).gather(2, index)
        self.flips += int((chosen < output.flatten(2)).sum())  # Keras' pick is not a max in PyTorch's values
        return chosen.view(output.shape)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _keras_tape_step(
    keras_model: keras.Model, optimizer: keras.optimizers.Optimizer, routing: _KerasRouting | None
) -> Callable:
    import tensorflow as tf  # the tape loop is TensorFlow-backend Keras; fit() works on any backend

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step(x: np.ndarray, y: np.ndarray) -> float:
        with tf.GradientTape() as tape:
            if routing is None:
                logits = keras_model(x, training=True)
            else:
                logits, *pre_activations = routing.probe(x, training=True)
                routing.record(pre_activations)
            loss = loss_fn(y, logits)
        grads = tape.gradient(loss, keras_model.trainable_variables)
        optimizer.apply_gradients(zip(grads, keras_model.trainable_variables, strict=True))
        return float(loss)

    return step


def _torch_step(torch_model: nn.Module, optimizer: torch.optim.Optimizer, before_step: Callable[[], None]) -> Callable:
    def step(x: np.ndarray, y: np.ndarray) -> float:
        torch_model.train()
        optimizer.zero_grad()
        loss = F.cross_entropy(torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())), torch.from_numpy(y))
        loss.backward()
        before_step()
        optimizer.step()
        return float(loss.detach())

    return step


def _batches(images: np.ndarray, labels: np.ndarray, batch_size: int, steps: int) -> Iterable[tuple]:
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images must be NHWC with one label each, got {images.shape} and {labels.shape}")
    if steps * batch_size > images.shape[0]:
        raise ValueError(f"{steps} steps of {batch_size} need {steps * batch_size} images, got {images.shape[0]}")
    for i in range(steps):
        yield images[i * batch_size : (i + 1) * batch_size], labels[i * batch_size : (i + 1) * batch_size]


def train_lockstep(
    keras_model: keras.Model,
    torch_model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.0,
    eps: float = 1e-7,
    batch_size: int = 32,
    steps: int = 50,
    keras_loop: str = "tape",
    follow_keras_routing: bool = False,
    keep_signed: bool = False,
    copy_weights: bool = True,
    on_step: Callable[[StepDivergence], None] | None = None,
) -> list[StepDivergence]:
    """Train both models on the same NHWC ``images`` (int ``labels``); divergence after each step.

    ``keras_loop``: ``"tape"`` (a ``tf.GradientTape`` loop) or ``"fit"`` (``model.fit`` with
    ``shuffle=False``; the PyTorch step runs in a batch-end callback, and ``loss_keras`` is fit's
    running mean). ``follow_keras_routing``: see the module docstring (tape loop only).
    ``keep_signed`` keeps every step's signed differences. ``copy_weights`` first copies the Keras
    weights into ``torch_model`` so both start identical.
    """
    if keras_loop not in ("tape", "fit"):
        raise ValueError(f"keras_loop must be 'tape' or 'fit', got {keras_loop!r}")
    if follow_keras_routing and keras_loop != "tape":
        raise ValueError("follow_keras_routing needs keras_loop='tape' (fit hides the activations)")
    images = np.asarray(images)
    labels = np.asarray(labels, np.int64)
    batches = list(_batches(images, labels, batch_size, steps))
    if copy_weights:
        keras_to_torch(keras_model, torch_model)
    keras_opt, torch_opt, before = make_optimizers(
        optimizer, keras_model, torch_model, lr=lr, momentum=momentum, eps=eps
    )
    torch_step = _torch_step(torch_model, torch_opt, before)
    routing = _KerasRouting(keras_model, torch_model) if follow_keras_routing else None
    pre_bn = _PreBatchNormInputs(torch_model)
    history: list[StepDivergence] = []

    def record(index: int, loss_keras: float) -> None:
        flips_before = routing.flips if routing else 0
        loss_torch = torch_step(*batches[index])
        flips = routing.flips - flips_before if routing else 0
        signed = signed_difference(keras_model, torch_model)
        per_tensor = {name: float(np.abs(d).max()) for name, d in signed.items()}
        scale = {
            name: max(1.0, float(value.abs().max()))
            for name, value in torch_model.state_dict().items()
            if value.is_floating_point()
        }
        entry = StepDivergence(
            index + 1,
            loss_keras,
            loss_torch,
            per_tensor,
            flips,
            signed if keep_signed else None,
            scale,
            pre_bn.max_bn_variant(signed),
            dict(pre_bn.mean) if keep_signed else None,
        )
        history.append(entry)
        if on_step is not None:
            on_step(entry)

    try:
        if keras_loop == "tape":
            keras_step = _keras_tape_step(keras_model, keras_opt, routing)
            for index, (x, y) in enumerate(batches):
                record(index, keras_step(x, y))
        else:

            class _Lockstep(keras.callbacks.Callback):
                def on_train_batch_end(self, batch, logs=None):
                    record(batch, float(logs["loss"]) if logs and "loss" in logs else float("nan"))

            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            keras_model.compile(optimizer=keras_opt, loss=loss)
            x_all = np.concatenate([b[0] for b in batches])
            y_all = np.concatenate([b[1] for b in batches])
            keras_model.fit(
                x_all, y_all, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[_Lockstep()]
            )
    finally:  # the hooks must not outlive the run
        pre_bn.remove()
        if routing is not None:
            routing.remove()
    return history


def train_lenet_lockstep(
    dtype: str, torch_bn: str, images: np.ndarray, labels: np.ndarray, **options
) -> tuple[keras.Model, nn.Module, list[StepDivergence]]:
    """The LeNet-BN pair trained in lockstep: keras_bn.BatchNorm (torch convention, momentum 0.1, eps 1e-5,
    seed 0) against ``torch_ref.lenet_bn(torch_bn)``, both in ``dtype``; ``options`` go to train_lockstep.

    Keras' floatx must already be ``dtype`` (Keras builds in it): a model built in another dtype is refused.
    """
    keras_model = keras_bn.lenet_bn("ours", convention="torch", momentum=0.1, epsilon=1e-5, seed=0)
    built = {v.dtype for v in keras_model.weights if v.dtype != "int64"}
    if built != {dtype}:
        raise ValueError(f"Keras built the model in {sorted(built)}, not {dtype}: set keras.config.floatx first")
    torch_model = torch_ref.lenet_bn(torch_bn).to(getattr(torch, dtype))
    history = train_lockstep(keras_model, torch_model, images.astype(dtype), labels, **options)
    return keras_model, torch_model, history
