"""``replace_batch_norm``: the same Keras model with every BatchNormalization layer made ``keras_bn.BatchNorm``.

The one-line fix for BN fine-tuning on a pretrained model::

    model = keras_bn.replace_batch_norm(keras.applications.MobileNetV2(...), stats_update="frozen")

Functional and Sequential models are rebuilt by ``keras.models.clone_model(recursive=True)``
(nested Functional/Sequential models included); every layer that is not BN is reused as it is
(the same object, the same variables), and each BN layer is replaced by ours, built from the
old layer's config plus ``options``, with the old layer's weights copied by name. Before an
option changes anything the outputs are bit-identical: replacements get ``fused=False``, whose
inference computes Keras' own ``keras.ops.batch_normalization`` (keras_bn/layer.py).
"""

from __future__ import annotations

import keras

import spec
from keras_bn.layer import BatchNorm

#: Weights a BN layer may hold, by attribute name; copied where both layers have them.
_WEIGHTS = (
    "gamma",
    "beta",
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
    "num_batches_tracked",
)


def replace_batch_norm(model: keras.Layer, **options) -> keras.Layer:
    """Return ``model`` with every ``keras.layers.BatchNormalization`` replaced by ``keras_bn.BatchNorm``.

    Args:
        model: a Functional or Sequential model (nested ones are walked), or a single BN layer.
        **options: ``keras_bn.BatchNorm`` arguments applied to every BN layer, e.g.
            ``stats_update="frozen"`` (keep the pretrained statistics while fine-tuning),
            ``normalize_with="moving"``, ``convention="torch"``, ``fused=None`` (TF's fused
            kernel where it pays off; inference then a few ulp from Keras'). ``convention`` without
            ``momentum`` converts each layer's momentum (``spec.convert_momentum``); ``epsilon``
            is kept unless given, since the trained weights depend on it.

    Returns:
        A new model object (not compiled: compile it) sharing every non-BN layer and its
        variables with ``model``. Layers that already are ``keras_bn.BatchNorm`` are kept as
        they are when ``options`` is empty, else rebuilt with the options like Keras' ones.
        Layer names, ``trainable`` and dtype policies are kept.

    Raises:
        TypeError: ``model`` is a subclassed model (its layers live in Python attributes, which
            cannot be rebuilt generically) or not a Keras layer.
        ValueError / TypeError: an invalid option (raised by ``keras_bn.BatchNorm``), before
            anything is returned.
    """
    if isinstance(model, keras.layers.BatchNormalization):
        return _replacement(model, options)
    if not isinstance(model, keras.Model):
        raise TypeError(f"replace_batch_norm expects a Keras model or BN layer, got {type(model).__name__}")
    _require_rebuildable(model)

    def clone(layer: keras.Layer) -> keras.Layer:
        if isinstance(layer, keras.layers.BatchNormalization):
            return _replacement(layer, options)
        return layer

    return keras.models.clone_model(model, clone_function=clone, recursive=True)


def _require_rebuildable(model: keras.Model) -> None:
    """Refuse subclassed models anywhere in ``model``, naming the first one."""
    from keras.src.models.functional import Functional  # keras.Model(inputs, outputs) makes one

    if not isinstance(model, keras.Sequential | Functional):
        raise TypeError(
            f"replace_batch_norm rebuilds Functional and Sequential models; {model.name!r} is a subclassed "
            f"{type(model).__name__}: construct it with keras_bn.BatchNorm instead"
        )
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _require_rebuildable(layer)


def _replacement(layer: keras.layers.BatchNormalization, options: dict) -> BatchNorm:
    """``keras_bn.BatchNorm`` from ``layer``'s config and ``options``, built, with ``layer``'s weights."""
    if isinstance(layer, BatchNorm) and not options:
        return layer
    config = layer.get_config()
    if "convention" in options and "momentum" not in options:
        source = getattr(layer, "convention", "keras")
        if config["momentum"] != "cumulative" and options["convention"] != source:
            config["momentum"] = spec.convert_momentum(config["momentum"], source, options["convention"])
    if not isinstance(layer, BatchNorm):
        # fused=False: inference through Keras' own op, so outputs stay bit-identical (TF's fused
        # kernel is a few ulp away), and training at the speed of Keras' layer (bench_layer: the
        # generic path is 0.9-1.05x its time). Pass fused=None to opt into the fused kernel.
        config["fused"] = False
    new = BatchNorm(**{**config, **options})  # not from_config, which rewraps our errors in a TypeError
    if layer.built:
        shape = [None] * layer.input_spec.ndim  # Keras' and our build() record the rank there
        shape[layer.axis] = layer.moving_mean.shape[0]
        new.build(tuple(shape))
        for name in _WEIGHTS:
            source, target = getattr(layer, name, None), getattr(new, name, None)
            if source is not None and target is not None:
                target.assign(source.value)
    return new
