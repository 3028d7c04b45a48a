"""Deferred moving-statistics updates: TF1's ``UPDATE_OPS`` made explicit and checkable.

A ``BatchNorm(stats_update="deferred")`` layer, called with ``training=True``, normalizes
with the batch statistics but only *records* them (count, mean, biased variance) in a
small pending buffer. The moving statistics change when the update is applied, after the
optimizer step, exactly once:

- ``model.fit``: pass :class:`ApplyUpdates` in ``callbacks``; it applies every pending
  update after each training batch (one compiled call on TensorFlow) and checks at the end.
- custom loops: call :func:`apply_updates` after ``optimizer.apply(...)``, eagerly or inside
  the same ``tf.function`` / ``jit_compile`` step.
- :func:`pending_updates` lists layers holding an unapplied update; :func:`check_updates`
  raises if any update was applied late or is still pending.

Forgetting to apply is an error, not silently untrained statistics (the classic TF1 bug):
a second training call while an update is pending raises ``RuntimeError`` eagerly and
``InvalidArgumentError`` inside ``tf.function``. Under XLA (``jit_compile=True``) asserts are
compiled away, so there the pending update is applied late (at the next training call, so
no statistics are lost) and counted; :func:`check_updates` reports it.

The pending buffer is deliberately not part of the layer's weights: ``get_weights()`` and
saved files are the same as with ``stats_update="auto"``.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
import numpy as np
from keras import ops

_FORGOT = (
    "BatchNorm layer {name!r} (stats_update='deferred') was called in training mode while its "
    "previous moving-statistics update was still pending. Apply updates once per optimizer step: "
    "keras_bn.apply_updates(model) after optimizer.apply(...) in a custom loop, or "
    "model.fit(..., callbacks=[keras_bn.ApplyUpdates()])."
)


def _executing_eagerly() -> bool:
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "torch":
        import torch

        return not torch.compiler.is_compiling()
    return False


class PendingUpdate:
    """One layer's recorded but not yet applied batch statistics (untracked variables).

    ``recorded`` is 1 while an update waits. ``late`` counts updates that were still pending
    at the next training call where no error can be raised (under XLA): those are applied
    then, before the new batch is recorded, so the statistics stay right but the user is
    told by :func:`check_updates`.
    """

    def __init__(self, layer_name: str, channels: int, dtype: str):
        def variable(name, shape, vdtype):
            return keras.Variable(
                np.zeros(shape, vdtype), dtype=vdtype, trainable=False, autocast=False, name=f"{layer_name}_{name}"
            )

        self.layer_name = layer_name
        self.count = variable("pending_count", (channels,), dtype)
        self.mean = variable("pending_mean", (channels,), dtype)
        self.var = variable("pending_var", (channels,), dtype)
        self.recorded = variable("pending_recorded", (), "int32")
        self.late = variable("pending_late", (), "int32")

    def record(self, count, mean, var, apply_late) -> None:
        """Store one batch's statistics; an unapplied previous update is an error.

        Eagerly the error is a ``RuntimeError``; in a TensorFlow graph a ``tf.debugging.Assert``
        (``InvalidArgumentError`` at run time). XLA drops asserts, so there ``apply_late()``
        applies the previous update now and ``late`` counts it.
        """
        if _executing_eagerly():
            if int(ops.convert_to_numpy(self.recorded.value)):
                raise RuntimeError(_FORGOT.format(name=self.layer_name))
        elif keras.backend.backend() == "tensorflow" and not _in_xla_context():
            import tensorflow as tf

            tf.debugging.Assert(tf.equal(self.recorded.value, 0), [_FORGOT.format(name=self.layer_name)])
        else:
            self.late.assign(self.late.value + self.recorded.value)
            apply_late()
        if isinstance(count, int | float):  # one count for every channel, known from the shape (torch backend)
            count = ops.full(self.count.shape, count, dtype=self.count.dtype)
        self.count.assign(ops.cast(count, self.count.dtype))
        self.mean.assign(ops.cast(mean, self.mean.dtype))
        self.var.assign(ops.cast(var, self.var.dtype))
        self.recorded.assign(ops.ones_like(self.recorded.value))

    def take(self):
        """``(gate, count, mean, var)`` of the pending update, and mark it applied."""
        gate = self.recorded.value > 0
        stats = (self.count.value, self.mean.value, self.var.value)
        self.recorded.assign(ops.zeros_like(self.recorded.value))
        return (gate, *stats)


def _in_xla_context() -> bool:
    from keras_bn._fused import in_xla_context

    return in_xla_context()


def _children(layer: keras.Layer) -> Iterable[keras.Layer]:
    """The layers ``layer`` holds: ``Model.layers`` for a model; for any other layer, its attributes
    that are layers or lists, tuples or dicts of layers (what Keras tracks as sublayers)."""
    if isinstance(layer, keras.Model):
        yield from layer.layers
        return
    for value in vars(layer).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else (value,)
        yield from (item for item in items if isinstance(item, keras.Layer))


def _walk(layer: keras.Layer, seen: set[int]) -> Iterable[keras.Layer]:
    """``layer`` and every layer under it, each once, depth first in attribute order."""
    if id(layer) in seen:
        return
    seen.add(id(layer))
    yield layer
    for child in _children(layer):
        yield from _walk(child, seen)


def deferred_layers(model) -> list:
    """Every built ``BatchNorm(stats_update="deferred")`` inside ``model`` (a layer, model or list)."""
    roots = [model] if isinstance(model, keras.Layer) else list(model)
    seen: set[int] = set()
    found = []
    for root in roots:
        if not isinstance(root, keras.Layer):
            raise TypeError(f"apply_updates expects Keras layers or models, got {type(root).__name__}")
        found.extend(layer for layer in _walk(root, seen) if getattr(layer, "_pending", None) is not None)
    return found


def apply_updates(model: keras.Layer | Iterable[keras.Layer]) -> int:
    """Apply every pending deferred moving-statistics update in ``model``; return how many layers.

    Call after the optimizer step. Idempotent within a step (a layer with nothing pending
    is left unchanged), usable eagerly and inside ``tf.function`` / ``jit_compile``.
    """
    layers = deferred_layers(model)
    for layer in layers:
        layer._apply_pending()
    return len(layers)


def pending_updates(model: keras.Layer | Iterable[keras.Layer]) -> list[str]:
    """Names of deferred layers holding a recorded, unapplied update (eager only)."""
    return [layer.name for layer in deferred_layers(model) if int(ops.convert_to_numpy(layer._pending.recorded.value))]


def check_updates(model: keras.Layer | Iterable[keras.Layer], *, pending_ok: bool = False) -> None:
    """Raise ``RuntimeError`` if any deferred update was applied late or (unless ``pending_ok``) is pending."""
    problems = []
    for layer in deferred_layers(model):
        late = int(ops.convert_to_numpy(layer._pending.late.value))
        if late:
            problems.append(f"{layer.name!r}: {late} update(s) applied late, at the next training call")
        if not pending_ok and int(ops.convert_to_numpy(layer._pending.recorded.value)):
            problems.append(f"{layer.name!r}: an update is recorded but not applied")
    if problems:
        raise RuntimeError(
            "deferred BatchNorm updates were not applied once per step ("
            + "; ".join(problems)
            + "). Call keras_bn.apply_updates(model) after every optimizer step, or pass "
            "keras_bn.ApplyUpdates() to model.fit."
        )


class ApplyUpdates(keras.callbacks.Callback):
    """``model.fit`` callback: apply deferred BN updates after every training batch.

    ``on_train_batch_end`` runs after the batch's optimizer step has finished, so the order is
    the one TF1's ``UPDATE_OPS`` under a control dependency gave. On TensorFlow the updates of
    all layers run as one compiled ``tf.function``. ``steps_per_execution > 1`` runs several
    optimizer steps per callback and is refused. At the end of training :func:`check_updates`
    verifies that every update was applied on time.
    """

    def on_train_begin(self, logs=None):
        steps = getattr(self.model, "steps_per_execution", 1) or 1
        if int(steps) > 1:
            raise ValueError(
                f"ApplyUpdates applies deferred BN updates once per callback, but steps_per_execution={steps} "
                "runs several optimizer steps per callback; compile with steps_per_execution=1 or use "
                "stats_update='auto'"
            )
        layers = deferred_layers(self.model)
        self._apply = lambda: apply_updates(layers)
        if keras.backend.backend() == "tensorflow" and layers:
            import tensorflow as tf

            self._apply = tf.function(self._apply)

    def on_train_batch_end(self, batch, logs=None):
        self._apply()

    def on_train_end(self, logs=None):
        check_updates(self.model)
