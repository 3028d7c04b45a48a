"""Constants and batch splitting shared by the sync-BN test runner and its worker scripts.

NumPy only at import: the workers import it before TensorFlow or torch.distributed start (a worker runs as
a script, so this folder is its ``sys.path[0]``; the runner imports it as ``_sync_workers._common``).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-3  # the same epsilon for the Keras and PyTorch runs, so they are comparable
KERAS_MOMENTUM = 0.9  # keras_bn.BatchNorm convention "keras": new = 0.9 * old + 0.1 * batch
TORCH_MOMENTUM = 0.1  # the same weight on the new batch in PyTorch's convention


def cases(inputs: dict) -> list[str]:
    """Case names in an inputs file: every ``<case>/x`` array."""
    return sorted({key.split("/")[0] for key in inputs if key.endswith("/x")})


def replica_rows(x: np.ndarray, splits: np.ndarray, index: int) -> np.ndarray:
    """Rows of the global batch ``x`` that replica/rank ``index`` holds, given rows per replica."""
    bounds = np.concatenate([[0], np.cumsum(splits)])
    return x[bounds[index] : bounds[index + 1]]


def functional_bn_step(xr, dyr, gamma, beta):
    """A BN written on ``keras_bn.sync.cross_replica_moments`` and the gradients of ``sum(y * dy)``:
    (count, mean, var, y, dx, dgamma, dbeta) of this replica. Called inside ``strategy.run``, so
    TensorFlow is imported here, after the worker has set up its devices."""
    import tensorflow as tf

    from keras_bn.sync import cross_replica_moments

    with tf.GradientTape() as tape:
        tape.watch([xr, gamma, beta])
        count, mean, var = cross_replica_moments(xr, [0, 1, 2])
        y = gamma * (xr - mean) * tf.math.rsqrt(var + EPS) + beta
        loss = tf.reduce_sum(y * dyr)
    return (count, mean, var, y, *tape.gradient(loss, [xr, gamma, beta]))
