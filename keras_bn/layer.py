"""``keras_bn.BatchNorm``: a drop-in for ``keras.layers.BatchNormalization`` with explicit
control of the moving statistics.

The layer is bookkeeping: weights, config, and the decision *when* statistics are computed,
used and stored. The math is ``spec``'s, called on Keras tensors through ``keras_bn._ops``
(gradient wiring, graph-safe update, renorm), and, for the TensorFlow fast path, TensorFlow's
fused kernel (``keras_bn._fused``). ``call`` picks one path per call: fused or generic, each
with a training and an inference branch; renorm only changes the generic path's affine map.

Three independent choices, each an argument (matrix of uses: docs/stats_update.md):

- ``stats_update``: when the moving statistics change: ``"auto"`` (inside every training
  call, Keras' behaviour), ``"deferred"`` (recorded in the call, applied after the optimizer
  step by ``keras_bn.apply_updates`` / ``keras_bn.ApplyUpdates``) or ``"frozen"`` (never;
  Caffe's ``use_global_stats``);
- ``normalize_with``: which statistics a training call normalizes with: ``"batch"``
  (standard BN) or ``"moving"`` (the stored ones, as inference does);
- ``affine_trainable``: whether gamma and beta are trainable weights.

``trainable=False`` keeps Keras' meaning: the layer runs in inference mode and changes nothing.
"""

from __future__ import annotations

import math
import numbers
import re

import keras
import numpy as np
from keras import constraints, initializers, ops, regularizers
from keras.layers import InputSpec

import spec
from keras_bn import _ops
from keras_bn.updates import PendingUpdate

# TensorFlow's fused kernel and tf.distribute's cross-replica sum exist on the TensorFlow backend only;
# on jax and torch, Keras never imports TensorFlow and neither do we (seconds of start-up, a second thread pool).
if keras.backend.backend() == "tensorflow":
    from keras_bn import _fused, sync, tuning
else:
    _fused = sync = tuning = None
# On the torch backend the generic training path runs torch_ref's autograd Function (the same spec formulas),
# and the moving-statistics update runs spec's formulas on the torch tensors themselves (xp=torch).
_torch_backend = None
if keras.backend.backend() == "torch":
    from keras_bn import _torch_backend
_STATS_XP = ops if _torch_backend is None else _torch_backend.XP

STATS_UPDATES = ("auto", "deferred", "frozen")
NORMALIZE_WITH = ("batch", "moving")
CUMULATIVE = "cumulative"  # torch's momentum=None; here None means "the convention's default"


#: Inputs with at least this many values refine their mean only where needed (SPEC.md §8.5, a traced conditional);
#: smaller ones unconditionally: there the skipped reduction costs less than the conditional's own kernels and ops
#: (under XLA a 64x120 step compiles to 19 top-level kernels with it, 16 without; bench/xla_cost.py). Timed too
#: (bench/bench_refinement_threshold.py, tf.function, XLA and JAX at LeNet's shapes and 32x8x8x16): on a 2-core
#: Xeon every decided winner is the side this threshold picks; the rest are ties.
CONDITIONAL_REFINEMENT_VALUES = 2**16


def _refine_conditionally(x) -> bool:
    """Whether this call's statistics skip the mean's refinement where it cannot matter: on TensorFlow and JAX
    (``tf.cond`` / ``lax.cond``; on torch a data-dependent branch costs a host sync) for large enough inputs."""
    if keras.backend.backend() not in ("tensorflow", "jax"):
        return False
    values = math.prod(_ops.UNKNOWN_BATCH if d is None else d for d in x.shape)
    return values >= CONDITIONAL_REFINEMENT_VALUES


_STATISTICS_DTYPES: dict[str, str] = {}


def _statistics_dtype(dtype: str) -> str:
    """The dtype statistics are computed in for ``dtype`` inputs: Keras' rule (float32 for half inputs), once per
    dtype (``keras.backend.result_type`` costs more than the cast it decides on the torch backend). A dict, not
    ``functools.cache``: TorchDynamo warns on every cache-wrapped function it traces."""
    if dtype not in _STATISTICS_DTYPES:
        _STATISTICS_DTYPES[dtype] = keras.backend.result_type(dtype, "float32")
    return _STATISTICS_DTYPES[dtype]


def _clone_initializer(initializer):
    """A fresh copy of a configured initializer (new seed), as Keras' layer does."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_number(name: str, value, *, low: float, high: float = math.inf) -> float:
    """``value`` as a float after checking it is a real number (not bool, not NaN) in [low, high].

    Every refusal is a ``ValueError`` naming the argument, as the spec's own checks are.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return value


def _check_axis(axis) -> int:
    """Keras' ``int(axis)`` silently truncates 1.5 and accepts "1" and True; we take integers only."""
    if isinstance(axis, bool | np.bool_) or not isinstance(axis, numbers.Integral):
        raise ValueError(f"axis must be an int (the channel axis), got {axis!r}")
    return int(axis)


def _check_renorm_clipping(clipping) -> dict:
    """Keras' key and order checks, plus the values' types (missing keys: rmin 0, rmax/dmax inf)."""
    if clipping is None:
        return {}
    if not isinstance(clipping, dict):
        raise ValueError(f"renorm_clipping must be a dict with keys 'rmax', 'rmin', 'dmax', got {clipping!r}")
    keys = ["rmax", "rmin", "dmax"]
    if set(clipping) - set(keys):
        raise ValueError(f"Received invalid keys for `renorm_clipping` argument: {clipping}. Supported values: {keys}.")
    checked = {
        key: _check_number(f"renorm_clipping[{key!r}]", value, low=-math.inf)
        for key, value in clipping.items()
        if value is not None
    }
    for key, value in checked.items():
        if value < 0:  # Keras' wording for dmax, which its own test matches
            raise ValueError(f"{key} should be non-negative in renorm_clipping, got {key}={value}")
    rmax, rmin = checked.get("rmax"), checked.get("rmin")
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(f"rmax should be greater than rmin in renorm_clipping, got rmax={rmax}, rmin={rmin}")
    return dict(clipping)


def _hyperparameters(convention: str, momentum, epsilon) -> spec.Hyperparameters:
    """spec's one check of (convention, momentum, eps), in Keras' spelling.

    ``None`` means the convention's default; torch's ``momentum=None`` (cumulative average) is
    spelled ``"cumulative"``. spec's messages name ``epsilon``, Keras' name for eps.
    """
    if momentum is None:
        momentum = spec.DEFAULT
    elif isinstance(momentum, str) and momentum == CUMULATIVE:
        momentum = None
    return spec.check_hyperparameters(
        convention, momentum, spec.DEFAULT if epsilon is None else epsilon, eps_name="epsilon"
    )


def _check_statistics_options(stats_update, normalize_with, fused) -> None:
    if stats_update not in STATS_UPDATES:
        raise ValueError(f"stats_update must be one of {STATS_UPDATES}, got {stats_update!r}")
    if stats_update == "deferred" and keras.backend.backend() not in ("tensorflow", "torch"):
        # the pending buffer is a set of untracked variables: stateful backends only
        raise ValueError(
            f"stats_update='deferred' needs the tensorflow or torch backend, not {keras.backend.backend()}"
        )
    if normalize_with not in NORMALIZE_WITH:
        raise ValueError(f"normalize_with must be one of {NORMALIZE_WITH}, got {normalize_with!r}")
    if fused not in (None, True, False):
        raise ValueError(f"fused must be None (auto), True or False, got {fused!r}")


@keras.saving.register_keras_serializable(package="keras_bn", name="BatchNorm")
class BatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization (Ioffe & Szegedy 2015) with a choice of convention and update timing.

    Public name ``keras_bn.BatchNorm``. A subclass of ``keras.layers.BatchNormalization``, so
    ``isinstance(layer, keras.layers.BatchNormalization)`` finds it (the fine-tuning recipe
    freezes BN layers by that test), with the same class name: Keras addresses a layer's weights
    in ``.weights.h5`` / ``.keras`` files by its snake-cased class name
    (``keras/src/saving/saving_lib.py``, ``_save_container_state``), so files saved with
    Keras' layer load into models built with ours and back, and default layer names are Keras'
    (``batch_normalization``, ``batch_normalization_1``, ...). It registers as
    ``keras_bn>BatchNorm``: ``import keras_bn`` before ``keras.saving.load_model``. None of the
    parent's methods run (its ``__init__`` and ``build`` are replaced, not extended).

    Every argument of ``keras.layers.BatchNormalization`` (Keras 3.15) means what it means
    there (validated: ``axis`` an int, ``epsilon`` > 0 and finite, momenta in [0, 1],
    ``renorm_clipping`` values >= 0, flags True/False; a bad one raises naming it), plus:

    Args:
        momentum: the convention's momentum (Keras 0.99 weights the *old* value, torch 0.1 the
            *new* one). ``None``: the convention's default. ``"cumulative"``: torch's
            ``momentum=None`` (cumulative average; ``convention="torch"`` only).
        epsilon: added to the variance; ``None``: the convention's default (Keras 1e-3,
            torch 1e-5).
        convention: any ``spec`` convention (``spec.list_conventions()``): how momentum maps to
            the weight on the new batch, and whether the running variance is biased or
            Bessel-corrected. ``"torch"`` with momentum 0.1 reproduces ``torch.nn.BatchNorm2d``.
            Conventions with a counter (``"caffe"``, torch cumulative) get a non-trainable
            ``num_batches_tracked`` weight after Keras' weights.
        stats_update: ``"auto"``, ``"deferred"`` or ``"frozen"`` (module docstring).
        normalize_with: ``"batch"`` or ``"moving"``: statistics used in training calls.
        affine_trainable: whether gamma and beta are trained (``False``: fixed affine).
        fused: ``True`` uses TensorFlow's fused kernel wherever it applies (TF backend, channel
            axis last or 1, float16/bfloat16/float32, no mask/renorm/synchronized in
            training, not under XLA); ``None`` (default) does so for inference, and for training
            where the fixed rule ``_fused.pays_off`` says so, the same on every run
            (``keras_bn.tuning``: ``KERAS_BN_FUSED=measure`` times both paths once per input shape,
            dtype and device instead, ``KERAS_BN_FUSED_CACHE`` keeps those decisions,
            ``keras_bn.tune`` measures ahead); ``False`` always uses the generic ``keras.ops`` path.

    Weights, in Keras' order: ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``
    (renorm: ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``), then
    ``num_batches_tracked`` (int64) where the convention needs it. So with the default
    convention ``set_weights(keras.layers.BatchNormalization(...).get_weights())`` works.

    Statistics are computed in float32 (float64 for float64 layers) by a corrected two-pass
    algorithm, also under mixed precision; weights are stored in the variable dtype. Inference
    off TF's fused kernel (``fused=False``, other backends, other layouts) computes
    ``keras.ops.batch_normalization``, the op Keras' layer calls: outputs bit-identical to Keras'.
    The fused kernel's inference is a few float32 ulp away from it.

    Masks follow Keras: a mask has the input's rank minus one and covers every axis but the
    *last* (``keras.layers.Masking`` masks time steps), whatever ``axis`` is; it is broadcast
    over the input and counted after broadcasting. Edge batches (docs/stats_update.md): a
    training batch with no values for a channel (0 rows, or fully masked) normalizes as Keras
    does but leaves the moving statistics unchanged, in every convention (Keras' layer writes
    NaN, or moves them towards 0); ``convention="torch"`` counts it in ``num_batches_tracked``,
    as PyTorch does. ``convention="torch"`` with one value per channel raises in training, as
    PyTorch does (where the shape is static).
    """

    def __init__(
        self,
        axis=-1,
        momentum=None,
        epsilon=None,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        convention="keras",
        stats_update="auto",
        normalize_with="batch",
        affine_trainable=True,
        fused=None,
        **kwargs,
    ):
        # Layer's __init__, not BatchNormalization's: every attribute is set (and checked) below.
        keras.layers.Layer.__init__(self, **kwargs)
        self.axis = _check_axis(axis)
        self._conv, self.momentum, self.epsilon = _hyperparameters(convention, momentum, epsilon)
        self.convention = convention
        _check_statistics_options(stats_update, normalize_with, fused)
        self.stats_update = stats_update
        self.normalize_with = normalize_with
        self.fused = fused

        self.affine_trainable = _check_bool("affine_trainable", affine_trainable)
        if _check_bool("synchronized", synchronized) and keras.backend.backend() != "tensorflow":
            raise ValueError("Argument synchronized=True is only supported with the TensorFlow backend.")
        self.synchronized = bool(synchronized)
        self.center = _check_bool("center", center)
        self.scale = _check_bool("scale", scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = True

        self.renorm = _check_bool("renorm", renorm)
        if self.renorm and (convention != "keras" or self.momentum is None):
            raise ValueError(
                f"renorm=True follows Keras' renorm update, so it needs convention='keras' with a numeric "
                f"momentum, got convention={convention!r}"
            )
        # Keras stores the clipping dict only with renorm=True ({} for None) and ignores it otherwise.
        self.renorm_clipping = _check_renorm_clipping(renorm_clipping) if self.renorm else renorm_clipping
        self.renorm_momentum = _check_number("renorm_momentum", renorm_momentum, low=0.0, high=1.0)

        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.num_batches_tracked = None
        self._reduction_axes = None
        self._pending = None

    # ------------------------------------------------------------------ build
    def build(self, input_shape):
        ndim = len(input_shape)
        if ndim < 2:
            raise ValueError(f"BatchNorm needs inputs of rank >= 2 (batch and channel axes), got shape {input_shape}")
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"axis {self.axis} is out of range for inputs of rank {ndim} (shape {input_shape})")
        channels = input_shape[self.axis]
        if channels is None:
            raise ValueError(f"the channel axis {self.axis} must have a known size, got input shape {input_shape}")
        shape = (channels,)
        if self.scale:
            self.gamma = self._affine_weight(
                "gamma", shape, self.gamma_initializer, self.gamma_regularizer, self.gamma_constraint
            )
        if self.center:
            self.beta = self._affine_weight(
                "beta", shape, self.beta_initializer, self.beta_regularizer, self.beta_constraint
            )
        self.moving_mean = self._statistic("moving_mean", shape, self.moving_mean_initializer)
        self.moving_variance = self._statistic("moving_variance", shape, self.moving_variance_initializer)
        if self.renorm:
            # Keras tracks the moving stddev (initialized at sqrt of the variance initializer).
            def moving_stddev_initializer(shape, dtype=None):
                return ops.sqrt(_clone_initializer(self.moving_variance_initializer)(shape, dtype=dtype))

            self.moving_stddev = self._statistic("moving_stddev", shape, moving_stddev_initializer)
            self.renorm_mean = self._statistic("renorm_mean", shape, _clone_initializer(self.moving_mean_initializer))
            self.renorm_stddev = self._statistic("renorm_stddev", shape, moving_stddev_initializer)
        if spec.needs_counter(self._conv, self.momentum):
            self.num_batches_tracked = self._statistic("num_batches_tracked", (), "zeros", dtype="int64")
        if self.stats_update == "deferred":
            self._pending = PendingUpdate(self.name, channels, self.variable_dtype)

        self.input_spec = InputSpec(ndim=ndim, axes={self.axis: channels})
        self._channel_axis = self.axis % ndim
        self._reduction_axes = tuple(a for a in range(ndim) if a != self._channel_axis)
        self._channels = channels

    def _affine_weight(self, name: str, shape, initializer, regularizer, constraint):
        return self.add_weight(
            shape=shape,
            name=name,
            initializer=initializer,
            regularizer=regularizer,
            constraint=constraint,
            trainable=self.affine_trainable,
            autocast=False,
        )

    def _statistic(self, name: str, shape, initializer, dtype=None):
        """A non-trainable weight in the variable dtype (or ``dtype``), never autocast: statistics stay float32+."""
        return self.add_weight(
            shape=shape, name=name, initializer=initializer, dtype=dtype, trainable=False, autocast=False
        )

    def compute_output_shape(self, input_shape):
        if not -len(input_shape) <= self.axis < len(input_shape):
            raise ValueError(f"Axis {self.axis} is out of bounds for input shape {input_shape}.")
        return input_shape

    # ------------------------------------------------------------------ call
    def call(self, inputs, training=None, mask=None):
        self._check_inputs(inputs)
        training = bool(training) and self.trainable  # Keras: trainable=False means inference mode
        batch_stats = training and self.normalize_with == "batch"
        update = training and self.stats_update != "frozen"
        if (batch_stats or update) and self.convention == "torch":
            self._check_more_than_one_value(inputs)
        x, weights = self._as_statistics_dtype(inputs, mask)
        if batch_stats:
            fmt = self._fused_training_format(inputs, weights)
            y, stats = self._train_fused(inputs, fmt) if fmt else self._train_generic(x, weights)
        else:
            y = self._infer(inputs, x)
            stats = self._batch_statistics(x, weights) if update else None
        if update:
            count, mean, var = (_ops.stop_gradient(t) for t in stats)
            if self.stats_update == "deferred":
                self._pending.record(count, mean, var, apply_late=self._apply_pending)
            else:
                self._update_moving_stats(count, mean, var)
        return _ops.cast(y, self.compute_dtype)

    def _check_inputs(self, inputs) -> None:
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if "float" not in dtype:
            raise TypeError(f"BatchNorm {self.name!r} needs floating-point inputs, got dtype {dtype}")
        if inputs.shape[self._channel_axis] not in (None, self._channels):
            raise ValueError(
                f"BatchNorm {self.name!r} was built for {self._channels} channels on axis {self.axis}, "
                f"got input shape {inputs.shape}"
            )

    def _as_statistics_dtype(self, inputs, mask):
        """``x`` in the statistics' dtype (float32 for half inputs) and the mask as 0/1 weights like x, or None."""
        x = _ops.cast(inputs, _statistics_dtype(keras.backend.standardize_dtype(inputs.dtype)))
        weights = None if mask is None else ops.cast(self._broadcast_mask(mask, inputs), x.dtype)
        return x, weights

    def _affine(self, dtype):
        """gamma and beta in the statistics' dtype (None where scale=False / center=False)."""
        dtype = keras.backend.standardize_dtype(dtype)
        gamma = None if self.gamma is None else _ops.cast(self.gamma, dtype)
        beta = None if self.beta is None else _ops.cast(self.beta, dtype)
        return gamma, beta

    def _all_reduce_sum(self):
        """The cross-replica sum spec's formulas take: tf.distribute's where synchronized, else none."""
        return sync.all_reduce_sum() if self.synchronized else spec.identity

    def _train_generic(self, x, weights):
        """Batch statistics (summed over replicas where synchronized), renorm's affine, SPEC.md §4's gradient."""
        if _torch_backend is not None and weights is None and not self.renorm and not self.synchronized:
            return _torch_backend.train(x, *self._affine(x.dtype), self.epsilon, self._channel_axis)
        reduce = self._all_reduce_sum()
        rows, row_weights, axes = self._as_rows(x, weights)
        stats = _ops.moments(rows, axes, row_weights, reduce, conditional=_refine_conditionally(x))
        mean, var = _ops.per_channel(stats.mean), _ops.per_channel(stats.var)
        gamma, beta = self._affine(x.dtype)
        if self.renorm:
            gamma, beta = self._renorm_affine(mean, var, gamma, beta, x.dtype)
        y = _ops.normalize_batch(rows, stats, gamma, beta, self.epsilon, axes, row_weights, reduce)
        return (y if rows is x else ops.reshape(y, ops.shape(x))), (_ops.per_channel(stats.count), mean, var)

    def _as_rows(self, x, weights):
        """``(x, weights, axes)`` for the statistics: on TensorFlow with the channel axis last, x as (rows, C) reduced
        over axis 0.

        The same values in the same order (a reshape, no copy), so the same statistics up to summation order.
        TensorFlow's XLA:CPU (``jit_compile``) sums a 4-D batch's three leading axes as a padded 32x32x32
        ``reduce-window`` tree and the same values as (rows, C) in 32-row windows: the layer step at 64x56x56x64 took
        0.29x the time (``bench/xla_cost.py``'s ``reduce-window`` column; README, "Benchmarks"); TF graphs without XLA
        take the same time either way. JAX's XLA sums the 4-D batch without such a tree, and the view cost it 3-11%
        at LeNet-BN's shapes, so JAX and the other layouts keep their shape.
        """
        ndim = len(x.shape)
        if ndim <= 2 or self._channel_axis != ndim - 1 or keras.backend.backend() != "tensorflow":
            return x, weights, self._reduction_axes
        shape = (-1, self._channels)  # the built channel count: a traced input may not know its own
        return ops.reshape(x, shape), None if weights is None else ops.reshape(weights, shape), (0,)

    def _train_fused(self, inputs, fmt: str):
        gamma, beta = self._affine("float32")
        y, count, mean, var = _fused.train(inputs, gamma, beta, self.epsilon, fmt)
        return y, (count, mean, var)

    def _batch_statistics(self, x, weights):
        """``(count, mean, var)`` of the batch for an update while normalizing with the moving statistics."""
        rows, row_weights, axes = self._as_rows(x, weights)
        stats = _ops.moments(rows, axes, row_weights, self._all_reduce_sum(), conditional=_refine_conditionally(x))
        return tuple(_ops.per_channel(t) for t in stats[:3])

    def _infer(self, inputs, x):
        """Normalize with the moving statistics: TF's fused kernel where it applies, else Keras' own op."""
        gamma, beta = self._affine(x.dtype)
        moving_mean = ops.cast(self.moving_mean, x.dtype)
        moving_var = ops.cast(self.moving_variance, x.dtype)
        fmt = self._fused_format(inputs)
        if fmt:
            return _fused.infer(inputs, gamma, beta, moving_mean, moving_var, self.epsilon, fmt)
        # Keras' own op with Keras' arguments (batch_normalization.py, call): bit-identical to
        # keras.layers.BatchNormalization, so replace_batch_norm (fused=False) changes no output.
        # A last channel axis is passed as -1, as Keras' default (same values).
        last = self._channel_axis == len(inputs.shape) - 1
        axis = -1 if last else self._channel_axis
        return ops.batch_normalization(
            x, moving_mean, moving_var, axis=axis, offset=beta, scale=gamma, epsilon=self.epsilon
        )

    def _broadcast_mask(self, mask, inputs):
        """Keras' mask rule (batch_normalization.py, ``_moments``): expand on the *last* axis, broadcast.

        A Keras mask covers every input axis but the last (``Masking`` masks time steps), whatever
        the channel axis is; it is counted after broadcasting, so a (1, 2, 1) mask over a
        (1, 2, 3, 4) input weighs 24 values, not 2.
        """
        if len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask provided should be one dimension less than the inputs. Received: "
                f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )
        for m, d in zip(mask.shape, inputs.shape[:-1], strict=True):
            if m is not None and d is not None and m not in (1, d):
                raise ValueError(
                    f"BatchNorm {self.name!r}: mask of shape {tuple(mask.shape)} does not broadcast to the inputs' "
                    f"shape without its last axis, {tuple(inputs.shape[:-1])} (inputs {tuple(inputs.shape)})"
                )
        return ops.broadcast_to(ops.expand_dims(ops.cast(mask, "bool"), -1), ops.shape(inputs))

    def _check_more_than_one_value(self, inputs):
        """PyTorch refuses to train on one value per channel (its unbiased variance needs two).

        torch/nn/functional.py, ``_verify_batch_size``: "Expected more than 1 value per channel
        when training". Checked where the shape is static (eager, or a traced graph with a
        known batch size); with a dynamic batch under ``tf.function`` the check cannot run at
        trace time and such a batch leaves the statistics unchanged instead.
        """
        sizes = [inputs.shape[a] for a in self._reduction_axes]
        if all(d is not None for d in sizes) and math.prod(sizes) == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(inputs.shape)} "
                f"(BatchNorm {self.name!r}, convention='torch')"
            )

    def _fused_format(self, inputs) -> str | None:
        """The fused kernel's data format for these inputs, or None for the generic path."""
        if self.fused is False or _fused is None:
            return None
        if keras.backend.standardize_dtype(inputs.dtype) not in _fused.DTYPES or _fused.in_xla_context():
            return None
        return _fused.data_format(len(inputs.shape), self._channel_axis)

    def _fused_training_format(self, inputs, weights) -> str | None:
        """The fused format for a training call, or None: the kernel has no mask, renorm or cross-replica sum,
        and with ``fused=None`` it is used where ``keras_bn.tuning`` says (the fixed rule, or a measurement if
        asked)."""
        if weights is not None or self.renorm or self.synchronized:
            return None
        fmt = self._fused_format(inputs)
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if fmt and self.fused is None and not tuning.use_fused(tuple(inputs.shape), self._channel_axis, dtype):
            return None
        return fmt

    def _renorm_affine(self, mean, var, gamma, beta, dtype):
        """Fold renorm's (r, d) into the affine map: (x_hat * r + d) * gamma + beta."""
        r, d = _ops.renorm_correction(
            mean,
            var,
            ops.cast(self.renorm_mean, dtype),
            ops.cast(self.renorm_stddev, dtype),
            self.epsilon,
            self.renorm_clipping,
        )
        new_gamma = r if gamma is None else r * gamma
        new_beta = d if gamma is None else d * gamma
        return new_gamma, new_beta if beta is None else new_beta + beta

    # --------------------------------------------------------------- updates
    def _update_moving_stats(self, count, mean, var, gate=None):
        """Assign the moving statistics after one batch (only where ``gate``, if given)."""

        if self.renorm:
            self._update_renorm_stats(count, mean, var, gate)
            return

        def assign(variable, value):  # value is in the variable's dtype: update_running_stats keeps the old one's
            variable.assign(value if gate is None else ops.where(gate, value, variable.value))

        counter = self.num_batches_tracked
        new_mean, new_var, valid = _ops.update_running_stats(
            self.moving_mean.value,
            self.moving_variance.value,
            mean,
            var,
            count,
            conv=self._conv,
            momentum=self.momentum,
            num_batches_tracked=None if counter is None else counter.value,
            xp=_STATS_XP,
        )
        assign(self.moving_mean, new_mean)
        assign(self.moving_variance, new_var)
        if counter is not None:
            # torch's num_batches_tracked counts training calls, empty ones included (it is
            # incremented in _BatchNorm.forward before F.batch_norm sees the batch); Caffe's
            # scale factor counts batches that contributed.
            step = ops.convert_to_tensor(True) if self.convention == "torch" else ops.all(valid)
            step = step if gate is None else ops.logical_and(gate, step)
            counter.assign(counter.value + ops.cast(step, "int64"))

    def _update_renorm_stats(self, count, mean, var, gate=None):
        """Keras' renorm update (``_ops.renorm_update``); it has no count, so an empty or fully masked batch
        changes nothing, as in the other conventions."""
        has_values = ops.cast(count, "float32") >= 1.0
        gate = has_values if gate is None else ops.logical_and(gate, has_values)
        dtype = self.moving_mean.dtype
        new = _ops.renorm_update(
            ops.cast(mean, dtype),
            ops.cast(var, dtype),
            moving_mean=self.moving_mean.value,
            moving_stddev=self.moving_stddev.value,
            renorm_mean=self.renorm_mean.value,
            renorm_stddev=self.renorm_stddev.value,
            momentum=self.momentum,
            renorm_momentum=self.renorm_momentum,
            epsilon=self.epsilon,
        )
        for name, value in new.items():
            variable = getattr(self, name)
            variable.assign(ops.where(gate, ops.cast(value, variable.dtype), variable.value))

    def _apply_pending(self) -> None:
        """Apply the recorded update, if any (called by ``keras_bn.apply_updates``)."""
        gate, count, mean, var = self._pending.take()
        self._update_moving_stats(count, mean, var, gate=gate)

    # ---------------------------------------------------------------- saving
    def load_own_variables(self, store):
        """Keras' loading, plus files written before the class took Keras' name (paths ``.../batch_norm_N``).

        Keras looks the weights up under the snake-cased class name; keras_bn <= 0.1.0 saved them
        under ``batch_norm`` (class ``BatchNorm``). Where nothing is stored under the new path and
        the old one exists, read that: a user's saved statistics are not lost. The store API used
        here (``_h5_entry_path``, ``has_path``, ``get``) is Keras 3's H5IOStore; any other store
        is used as given. In old files of models that mixed Keras' layer and ours, the numbering
        N differs and this mapping is not attempted to be right: Keras then reports the layers it
        could not load.
        """
        entry = getattr(store, "_h5_entry_path", None)
        if len(store) == 0 and isinstance(entry, str) and hasattr(store, "has_path"):
            legacy = re.sub(r"batch_normalization(_\d+)?$", r"batch_norm\1", entry)
            if legacy != entry and store.has_path(legacy):
                store = store.get(legacy)
        super().load_own_variables(store)

    # ---------------------------------------------------------------- config
    def get_config(self):
        config = {
            "axis": self.axis,
            "momentum": CUMULATIVE if self.momentum is None else self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "convention": self.convention,
            "stats_update": self.stats_update,
            "normalize_with": self.normalize_with,
            "affine_trainable": self.affine_trainable,
            "fused": self.fused,
        }
        return {**keras.layers.Layer.get_config(self), **config}


#: The public name. The class is called ``BatchNormalization`` because Keras' weight files
#: address layers by their class name (see the class docstring).
BatchNorm = BatchNormalization
