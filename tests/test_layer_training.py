"""keras_bn.BatchNorm in training: model.fit / custom loops / tf.function / XLA, deferred and frozen
statistics, the combination matrix of docs/stats_update.md, mixed precision, save and load.

References: a manual GradientTape loop for model.fit, the spec for statistics, Keras' built-in
layer for mixed precision. Tolerances (float32 on CPU): the same computation traced by
tf.function and run eagerly may fuse or order reductions differently, a few ulp per step;
over 4-8 optimizer steps of O(1) values that stays below 1e-5 (relative and absolute):
tests/numerics.py, "compiled" float32.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from numerics import close, tolerance

import keras_bn
import spec

TOL = tolerance("compiled", "float32", "y")
BATCH, SAMPLES = 16, 64


@pytest.fixture
def data(rng):
    x = (0.5 + rng.standard_normal((SAMPLES, 8, 8, 3))).astype(np.float32)
    y = rng.integers(0, 3, SAMPLES)
    return x, y


def _model(seed: int = 3, **bn_kwargs) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras_bn.BatchNorm(name="bn", **bn_kwargs),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, name="head"),
        ]
    )


def _compile(model, jit_compile=False):
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def _manual_epoch(model, x, y, *, apply=True):
    """The reference: eager GradientTape loop, optimizer step, then keras_bn.apply_updates."""
    optimizer = keras.optimizers.SGD(0.1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for start in range(0, len(x), BATCH):
        xb, yb = x[start : start + BATCH], y[start : start + BATCH]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        if apply:
            keras_bn.apply_updates(model)


def _bn_state(model):
    return [w.numpy() for w in model.get_layer("bn").weights]


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_deferred_updates_in_fit_equal_a_manual_loop(data, jit_compile):
    """model.fit + ApplyUpdates gives the moving statistics (and weights) of the manual loop."""
    x, y = data
    fitted = _compile(_model(stats_update="deferred"), jit_compile)
    fitted.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[keras_bn.ApplyUpdates()])
    manual = _model(stats_update="deferred")
    _manual_epoch(manual, x, y)
    for a, b in zip(fitted.get_weights(), manual.get_weights(), strict=True):
        close(a, b, TOL)
    auto = _model()  # deferring changes when, not what: same statistics as Keras' in-call update
    _manual_epoch(auto, x, y, apply=False)
    for a, b in zip(_bn_state(fitted), _bn_state(auto), strict=True):
        close(a, b, TOL)
    assert keras_bn.pending_updates(fitted) == []
    assert not np.allclose(_bn_state(fitted)[2], 0.0)  # the moving mean did train


def test_forgetting_to_apply_in_fit_raises(data):
    x, y = data
    model = _compile(_model(stats_update="deferred"))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"keras_bn\.apply_updates\(model\)"):
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)


def test_forgetting_to_apply_under_xla_is_reported_and_loses_nothing(data):
    """XLA drops asserts: the pending update is applied at the next call and counted."""
    x, y = data
    model = _compile(_model(stats_update="deferred"), jit_compile=True)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    with pytest.raises(RuntimeError, match=r"'bn': 3 update\(s\) applied late.*'bn': an update is recorded"):
        keras_bn.check_updates(model)
    assert keras_bn.pending_updates(model) == ["bn"]
    keras_bn.apply_updates(model)
    manual = _model(stats_update="deferred")
    _manual_epoch(manual, x, y)
    for a, b in zip(_bn_state(model), _bn_state(manual), strict=True):
        close(a, b, TOL)


def test_eager_forgetting_raises_and_apply_is_idempotent(rng):
    layer = keras_bn.BatchNorm(stats_update="deferred", momentum=0.5)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    layer(x, training=True)
    assert keras_bn.pending_updates([layer]) == [layer.name]
    with pytest.raises(RuntimeError, match="still pending"):
        layer(x, training=True)
    assert keras_bn.apply_updates(layer) == 1
    once = layer.moving_mean.numpy().copy()
    keras_bn.apply_updates(layer)  # nothing pending: no second update
    np.testing.assert_array_equal(layer.moving_mean.numpy(), once)
    _, mean, _ = spec.batch_norm_train(x, np.ones(3), np.zeros(3), axis=-1)
    np.testing.assert_allclose(once, 0.5 * mean, rtol=1e-6)
    keras_bn.check_updates(layer)
    layer(x, training=True)
    with pytest.raises(RuntimeError, match="an update is recorded but not applied"):
        keras_bn.check_updates(layer)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf.function", "xla"])
def test_custom_compiled_loop_with_apply_updates_equals_eager_loop(data, jit_compile):
    x, y = data
    model = _model(stats_update="deferred")
    optimizer = keras.optimizers.SGD(0.1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=jit_compile)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        keras_bn.apply_updates(model)  # after the optimizer step, in the same compiled graph
        return loss

    for start in range(0, SAMPLES, BATCH):
        step(x[start : start + BATCH], y[start : start + BATCH])
    eager = _model(stats_update="deferred")
    _manual_epoch(eager, x, y)
    for a, b in zip(model.get_weights(), eager.get_weights(), strict=True):
        close(a, b, TOL)
    keras_bn.check_updates(model)


def test_frozen_statistics_do_not_change_in_fit_while_gamma_beta_train(data, rng):
    x, y = data
    model = _compile(_model(stats_update="frozen"))
    bn = model.get_layer("bn")
    bn.moving_mean.assign(rng.normal(0, 1, 4).astype(np.float32))
    before = _bn_state(model)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    after = _bn_state(model)
    np.testing.assert_array_equal(after[2], before[2])
    np.testing.assert_array_equal(after[3], before[3])
    assert np.abs(after[0] - before[0]).max() > 1e-4 and np.abs(after[1] - before[1]).max() > 1e-4


COMBINATIONS = [
    (update, normalize, affine)
    for update in ("auto", "deferred", "frozen")
    for normalize in ("batch", "moving")
    for affine in (True, False)
]


def test_combination_matrix_in_one_fit(data):
    """Every stats_update x normalize_with x affine_trainable side by side in one model.fit.

    Expected, per docs/stats_update.md: moving statistics change iff stats_update != "frozen";
    gamma/beta change iff affine_trainable; the training output is batch-normalized iff
    normalize_with == "batch" (checked against the spec on the first batch).
    """
    x, y = data
    inputs = keras.Input((8, 8, 3))
    features = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    names, outputs = [], []
    for update, normalize, affine in COMBINATIONS:
        name = f"bn_{update}_{normalize}_{'affine' if affine else 'fixed'}"
        layer = keras_bn.BatchNorm(name=name, stats_update=update, normalize_with=normalize, affine_trainable=affine)
        names.append(name)
        outputs.append(keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(layer(features))))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Concatenate()(outputs)))
    _compile(model)
    for name in names:  # non-trivial stored statistics, so "moving" differs from "batch"
        layer = model.get_layer(name)
        layer.moving_mean.assign(np.full(4, 0.3, np.float32))
        layer.moving_variance.assign(np.full(4, 2.0, np.float32))
    before = {name: [w.numpy() for w in model.get_layer(name).weights] for name in names}
    conv_out = np.asarray(model.get_layer("conv")(x[:BATCH])).astype(np.float64)
    for (update, normalize, _), name in zip(COMBINATIONS, names, strict=True):
        layer = model.get_layer(name)
        g, b, m, v = (w.astype(np.float64) for w in before[name])
        y_ref = (
            spec.batch_norm_train(conv_out, g, b, axis=-1, eps=1e-3)[0]
            if normalize == "batch"
            else spec.batch_norm_infer(conv_out, g, b, m, v, axis=-1, eps=1e-3)
        )
        close(np.asarray(layer(conv_out.astype(np.float32), training=True)), y_ref, TOL)
        if update == "deferred":
            keras_bn.apply_updates(layer)
        layer.set_weights(before[name])
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[keras_bn.ApplyUpdates()])
    for (update, _, affine), name in zip(COMBINATIONS, names, strict=True):
        layer = model.get_layer(name)
        after = [w.numpy() for w in layer.weights]
        stats_moved = not np.array_equal(after[2], before[name][2]) and not np.array_equal(after[3], before[name][3])
        affine_moved = not np.array_equal(after[0], before[name][0]) and not np.array_equal(after[1], before[name][1])
        assert stats_moved == (update != "frozen"), name
        assert affine_moved == affine, name
        assert (layer.gamma in layer.trainable_weights) == affine, name


def test_predict_and_evaluate_use_moving_statistics(data):
    x, y = data
    model = _compile(_model(convention="torch"))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    conv = np.asarray(model.get_layer("conv")(x)).astype(np.float64)
    g, b, m, v = (w.astype(np.float64) for w in _bn_state(model))
    hidden = np.maximum(spec.batch_norm_infer(conv, g, b, m, v, axis=-1, eps=1e-5), 0).mean(axis=(1, 2))
    kernel, bias = model.get_layer("head").get_weights()
    close(model.predict(x, verbose=0), hidden @ kernel + bias, TOL)
    loss = model.evaluate(x, y, verbose=0)
    assert np.isfinite(loss)


def _train_call(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * tf.reshape(tf.range(tf.size(y), dtype=tf.float32), tf.shape(y)) / 100.0)
    return y, tape.gradient(loss, [x, layer.gamma])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf.function", "xla"])
def test_compiled_training_call_equals_eager(rng, jit_compile, fused):
    """Outputs, gradients (x, gamma) and statistics of a compiled training call equal the eager ones."""
    shape = (16, 4, 4, 3)
    layers = [keras_bn.BatchNorm(convention="torch", fused=fused) for _ in range(2)]
    compiled = tf.function(_train_call, jit_compile=jit_compile)
    for _ in range(3):
        x = tf.constant((1.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32))
        y_e, (dx_e, dg_e) = _train_call(layers[0], x)
        y_c, (dx_c, dg_c) = compiled(layers[1], x)
        close(np.asarray(y_c), np.asarray(y_e), TOL)
        close(np.asarray(dx_c), np.asarray(dx_e), TOL)
        # dgamma sums 256 products of O(3) terms: ~256 ulp of O(100) sums
        close(dg_c, dg_e, tolerance("compiled", "float32", "param-grad"), what="dgamma")
        for a, b in zip(layers[0].weights, layers[1].weights, strict=True):
            close(a.numpy(), b.numpy(), TOL)


def test_xla_training_keeps_two_pass_variance(rng):
    """Under XLA the fused op would lower to E[x^2] - E[x]^2 (negative variances for |mean|/std = 1e6).

    The layer routes XLA to its generic corrected two-pass path: with |mean| / std = 1e4 the
    moving (unbiased, momentum 1) variance matches the spec within 1e-4 relative, where the
    one-pass float32 formula would be off by orders of magnitude (ulp(E[x^2] = 1e4) ~ 1e-3 > var).
    """
    shape = (16, 4, 4, 3)
    layer = keras_bn.BatchNorm(convention="torch", momentum=1.0, fused=True)  # even when asked for the kernel
    x = tf.constant((1e2 + 1e-2 * rng.standard_normal(shape)).astype(np.float32))
    tf.function(_train_call, jit_compile=True)(layer, x)
    _, _, var = spec.batch_norm_train(np.asarray(x), np.ones(3), np.zeros(3), axis=-1)
    n = np.prod(shape[:3])
    np.testing.assert_allclose(layer.moving_variance.numpy(), var * n / (n - 1), rtol=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_float32_statistics_and_matches_keras(rng, policy, fused):
    """Weights float32, output in the compute dtype, statistics of the half-precision input in float32.

    The spec sees the input after Keras' autocast (exact half values), so statistics match to
    float32 accuracy (2e-6); the half output differs from the spec by <= 1 ulp of |y| <= ~4
    (float16 2**-10 * 4 ~ 4e-3, bfloat16 2**-7 * 4 ~ 3e-2) and from Keras' built-in by as much.
    """
    half = policy.split("_")[1]
    tol = 4e-3 if half == "float16" else 3e-2
    shape = (8, 5, 5, 3)
    ours = keras_bn.BatchNorm(dtype=policy, momentum=0.5, fused=fused)
    builtin = keras.layers.BatchNormalization(dtype=policy, momentum=0.5)
    x = (2.0 + 3.0 * rng.standard_normal(shape)).astype(np.float32)
    y_o, y_b = ours(x, training=True), builtin(x, training=True)
    assert keras.backend.standardize_dtype(y_o.dtype) == half
    assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in ours.weights)
    x_half = np.asarray(tf.cast(tf.cast(x, half), tf.float32), np.float64)
    y_ref, mean, var = spec.batch_norm_train(x_half, np.ones(3), np.zeros(3), axis=-1, eps=1e-3)
    np.testing.assert_allclose(ours.moving_mean.numpy(), 0.5 * mean, rtol=2e-6)
    np.testing.assert_allclose(ours.moving_variance.numpy(), 0.5 + 0.5 * var, rtol=2e-6)
    np.testing.assert_allclose(np.asarray(tf.cast(y_o, tf.float32)), y_ref, atol=tol)
    np.testing.assert_allclose(np.asarray(tf.cast(y_o, tf.float32)), np.asarray(tf.cast(y_b, tf.float32)), atol=2 * tol)


def test_mixed_precision_model_fit(data):
    x, y = data
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = _compile(_model(convention="torch"))
        history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    finally:
        keras.config.set_dtype_policy(previous)
    assert all(np.isfinite(history.history["loss"]))
    bn = model.get_layer("bn")
    assert bn.compute_dtype == "float16" and bn.moving_variance.dtype == "float32"
    assert np.all(bn.moving_variance.numpy() > 0) and not np.allclose(bn.moving_mean.numpy(), 0)


@pytest.mark.parametrize(
    "bn_kwargs",
    [{}, {"convention": "torch", "momentum": "cumulative"}, {"convention": "caffe", "stats_update": "deferred"}],
    ids=["keras", "torch-cumulative", "caffe-deferred"],
)
def test_save_and_load_restore_statistics_bit_exactly_and_training_continues(data, tmp_path, bn_kwargs):
    x, y = data
    callbacks = [keras_bn.ApplyUpdates()] if bn_kwargs.get("stats_update") == "deferred" else []
    model = _compile(_model(**bn_kwargs))
    model.fit(x[:32], y[:32], batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("bn")) is keras_bn.BatchNorm
    assert loaded.get_layer("bn").get_config() == model.get_layer("bn").get_config()
    for a, b in zip(model.get_layer("bn").weights, loaded.get_layer("bn").weights, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    weights_only = _compile(_model(seed=9, **bn_kwargs))
    model.save_weights(tmp_path / "model.weights.h5")
    weights_only.load_weights(tmp_path / "model.weights.h5")
    for a, b in zip(model.get_weights(), weights_only.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # same continued training (the .keras file carries the optimizer state; SGD has none to lose)
    for m in (model, loaded):
        m.fit(x[32:], y[32:], batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        close(a, b, TOL)


def test_frozen_moving_fixed_survives_unfreezing_unlike_keras_trainable_false(rng):
    """docs/stats_update.md row 12: a frozen BN stays frozen when its parent is unfrozen.

    Keras' recipe (``trainable=False``) is undone by ``model.trainable = True``: the built-in layer
    goes back to batch statistics. Ours keeps normalizing with the stored statistics and keeps
    gamma/beta fixed, so the training output stays the inference output (spec).
    """
    x = (1.0 + rng.standard_normal((8, 4, 4, 3))).astype(np.float32)
    ours = keras_bn.BatchNorm(stats_update="frozen", normalize_with="moving", affine_trainable=False)
    builtin = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((4, 4, 3)), ours, builtin])
    ours.moving_mean.assign(np.array([0.5, 1.0, 1.5], np.float32))
    model.trainable = False
    model.trainable = True
    assert ours.trainable_weights == [] and len(builtin.trainable_weights) == 2
    before = [w.numpy().copy() for w in ours.weights]
    y = np.asarray(ours(x, training=True))
    g, b, m, v = (w.astype(np.float64) for w in before)
    close(y, spec.batch_norm_infer(x, g, b, m, v, axis=-1, eps=1e-3), TOL)
    for a, w in zip(before, ours.weights, strict=True):
        np.testing.assert_array_equal(a, w.numpy())
