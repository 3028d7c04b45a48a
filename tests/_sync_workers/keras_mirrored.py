"""Subprocess worker: synchronized BN under ``MirroredStrategy`` on N logical CPU devices.

Logical devices must be configured before TensorFlow initializes its devices, which a pytest
process that already imported TensorFlow cannot undo, hence a fresh process per device count.

    python keras_mirrored.py --devices N --inputs in.npz --out out.npz --checks function,layer,...

``in.npz`` holds cases ``<case>/x`` (global batch, NHWC float32), ``<case>/splits`` (rows per
replica) and ``<case>/gamma|beta|dy``; every check writes arrays ``<check>/<case>/<name>`` to
``out.npz``. Gradients are those of L = sum(y * dy) over the global batch; per-replica
statistics are stacked (replicas first) so the caller can check that all replicas agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import numpy as np
from _common import EPS, KERAS_MOMENTUM, cases, functional_bn_step, replica_rows

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402


def _configure(devices: int) -> tf.distribute.MirroredStrategy:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(devices)])


def _per_replica(strategy, x: np.ndarray, splits: np.ndarray):
    """The global batch split along axis 0 into per-replica pieces of the given (uneven) sizes."""
    parts = [replica_rows(x, splits, i) for i in range(len(splits))]
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group])
    )


def _local(strategy, value) -> list[np.ndarray]:
    return [np.asarray(v) for v in strategy.experimental_local_results(value)]


def check_function(strategy, inputs: dict, out: dict) -> None:
    """cross_replica_moments inside strategy.run, with a functional BN on top, vs the same off-strategy."""
    from keras_bn.sync import cross_replica_moments

    for case in cases(inputs):
        x, gamma, beta, dy = (inputs[f"{case}/{k}"] for k in ("x", "gamma", "beta", "dy"))
        g, b = tf.constant(gamma), tf.constant(beta)

        def step(xr, dyr, g=g, b=b):
            return functional_bn_step(xr, dyr, g, b)

        run = tf.function(lambda xs, dys, step=step: strategy.run(step, args=(xs, dys)))
        splits = inputs[f"{case}/splits"]
        res = run(_per_replica(strategy, x, splits), _per_replica(strategy, dy, splits))
        names = ("count", "mean", "var", "y", "dx", "dgamma", "dbeta")
        for name, value in zip(names, res, strict=True):
            local = _local(strategy, value)
            if name in ("y", "dx"):
                out[f"function/{case}/{name}"] = np.concatenate(local)
            elif name in ("dgamma", "dbeta"):  # what an optimizer's cross-replica sum sees
                out[f"function/{case}/{name}"] = np.sum(local, axis=0)
            else:
                out[f"function/{case}/{name}"] = np.stack(local)
        # One device, the concatenated batch, the same function (not in a replica context).
        count, mean, var = cross_replica_moments(tf.constant(x), [0, 1, 2])
        out[f"function/{case}/single_mean"] = mean.numpy()
        out[f"function/{case}/single_var"] = var.numpy()


def _new_layer(strategy, channels: int, gamma, beta, momentum: float, synchronized: bool, builtin: bool = False):
    import keras

    from keras_bn import BatchNorm

    with strategy.scope():
        if builtin:
            layer = keras.layers.BatchNormalization(momentum=momentum, epsilon=EPS, synchronized=synchronized)
        else:
            layer = BatchNorm(momentum=momentum, epsilon=EPS, synchronized=synchronized)
        layer.build((None, None, None, channels))
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    return layer


def check_layer(strategy, inputs: dict, out: dict) -> None:
    """keras_bn.BatchNorm(synchronized=True): one training step's output, gradients, moving stats."""
    for case in cases(inputs):
        x, gamma, beta, dy = (inputs[f"{case}/{k}"] for k in ("x", "gamma", "beta", "dy"))
        momentum = float(inputs.get(f"{case}/momentum", KERAS_MOMENTUM))
        layer = _new_layer(strategy, x.shape[-1], gamma, beta, momentum, synchronized=True)

        def step(xr, dyr, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(xr)
                y = layer(xr, training=True)
                loss = tf.reduce_sum(y * dyr)
            dx, dg, db = tape.gradient(loss, [xr, layer.gamma.value, layer.beta.value])
            return y, dx, dg, db

        run = tf.function(lambda xs, dys, step=step: strategy.run(step, args=(xs, dys)))
        splits = inputs[f"{case}/splits"]
        y, dx, dg, db = run(_per_replica(strategy, x, splits), _per_replica(strategy, dy, splits))
        out[f"layer/{case}/y"] = np.concatenate(_local(strategy, y))
        out[f"layer/{case}/dx"] = np.concatenate(_local(strategy, dx))
        out[f"layer/{case}/dgamma"] = np.sum(_local(strategy, dg), axis=0)
        out[f"layer/{case}/dbeta"] = np.sum(_local(strategy, db), axis=0)
        # Every replica's copy of the moving statistics (MirroredVariable components).
        out[f"layer/{case}/moving_mean"] = np.stack(_local(strategy, layer.moving_mean.value))
        out[f"layer/{case}/moving_variance"] = np.stack(_local(strategy, layer.moving_variance.value))


def check_builtin(strategy, inputs: dict, out: dict) -> None:
    """keras.layers.BatchNormalization(synchronized=True): moving stats after one step (momentum per case)."""
    for case in cases(inputs):
        x, gamma, beta = (inputs[f"{case}/{k}"] for k in ("x", "gamma", "beta"))
        momentum = float(inputs.get(f"{case}/momentum", KERAS_MOMENTUM))
        layer = _new_layer(strategy, x.shape[-1], gamma, beta, momentum, synchronized=True, builtin=True)
        run = tf.function(lambda xs, layer=layer: strategy.run(lambda xr: layer(xr, training=True), args=(xs,)))
        run(_per_replica(strategy, x, inputs[f"{case}/splits"]))
        out[f"builtin/{case}/moving_mean"] = np.stack(_local(strategy, layer.moving_mean.value))
        out[f"builtin/{case}/moving_variance"] = np.stack(_local(strategy, layer.moving_variance.value))


class _CallCounter:
    """Counts ReplicaContext.all_reduce calls while a step is traced, split by forward/backward."""

    def __init__(self) -> None:
        self.phase = threading.local()  # MirroredStrategy traces each replica in its own thread
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __enter__(self):
        from tensorflow.python.distribute import distribute_lib

        self._cls = distribute_lib.ReplicaContextBase
        self._original = original = self._cls.all_reduce
        counter = self

        def counting_all_reduce(ctx, reduce_op, value, options=None):
            with counter._lock:
                counter.calls.append(getattr(counter.phase, "name", "other"))
            return original(ctx, reduce_op, value, options)

        self._cls.all_reduce = counting_all_reduce
        return self

    def __exit__(self, *exc) -> None:
        self._cls.all_reduce = self._original


def _collective_ops(concrete) -> int:
    """Collective all-reduce kernels in a traced step, nested function bodies included."""
    kinds = ("CollectiveReduce", "CollectiveReduceV2", "CollectiveReduceV3", "NcclAllReduce")
    graph_def = concrete.graph.as_graph_def()
    nodes = list(graph_def.node)
    for fn in graph_def.library.function:
        nodes.extend(fn.node_def)
    return sum(node.op in kinds for node in nodes)


def check_collectives(strategy, inputs: dict, out: dict) -> None:
    """all_reduce calls and collective kernels per BN layer per training step (ours vs Keras built-in)."""
    x = inputs["data/x"]
    channels = x.shape[-1]
    gamma, beta = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    for name, builtin in (("ours", False), ("builtin", True)):
        layer = _new_layer(strategy, channels, gamma, beta, KERAS_MOMENTUM, synchronized=True, builtin=builtin)
        counter = _CallCounter()

        def step(xr, layer=layer, counter=counter):
            with tf.GradientTape() as tape:
                tape.watch(xr)
                counter.phase.name = "forward"
                loss = tf.reduce_sum(tf.square(layer(xr, training=True)))
            counter.phase.name = "backward"
            grads = tape.gradient(loss, [xr, layer.gamma.value, layer.beta.value])
            counter.phase.name = "other"
            return grads

        fn = tf.function(lambda xs, step=step: strategy.run(step, args=(xs,)))
        values = _per_replica(strategy, x, np.full(strategy.num_replicas_in_sync, len(x) // 2))
        with counter:
            concrete = fn.get_concrete_function(values)
        replicas = strategy.num_replicas_in_sync
        out[f"collectives/{name}/forward_calls"] = np.array(counter.calls.count("forward") / replicas)
        out[f"collectives/{name}/backward_calls"] = np.array(counter.calls.count("backward") / replicas)
        out[f"collectives/{name}/kernels"] = np.array(_collective_ops(concrete) / replicas)


LENET_STEPS, LENET_BATCH = 3, 32


def check_lenet(strategy, inputs: dict, out: dict) -> None:
    """LeNet-BN trained with model.fit for a few steps: synchronized under the strategy vs one device.

    Also trains the unsynchronized net under the strategy, whose per-replica statistics make it
    differ from one device: the measure of how much the comparison can tell apart.
    """
    import keras

    from keras_bn.model import compile_lenet, lenet_bn

    rng = np.random.default_rng(11)
    images = rng.uniform(0.0, 1.0, (LENET_STEPS * LENET_BATCH, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, LENET_STEPS * LENET_BATCH)
    runs = {"sync": (strategy, True), "single": (tf.distribute.get_strategy(), True), "unsync": (strategy, False)}
    for name, (where, synchronized) in runs.items():
        keras.utils.set_random_seed(0)
        with where.scope():
            model = compile_lenet(
                lenet_bn("ours", seed=0, synchronized=synchronized, momentum=0.9), "sgd", lr=0.05, momentum=0.9
            )
        history = model.fit(images, labels, batch_size=LENET_BATCH, epochs=1, shuffle=False, verbose=0)
        out[f"lenet/{name}/loss"] = np.array(history.history["loss"])
        for weight in model.weights:
            out[f"lenet/{name}/weights/{weight.path}"] = np.asarray(weight.value)


CHECKS = {
    "function": check_function,
    "layer": check_layer,
    "builtin": check_builtin,
    "collectives": check_collectives,
    "lenet": check_lenet,
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checks", required=True, help="comma-separated: " + ",".join(CHECKS))
    args = parser.parse_args(argv)
    strategy = _configure(args.devices)
    out: dict[str, np.ndarray] = {}
    for name in args.checks.split(","):
        # Each check reads only the cases meant for it: "<check>.<case>/..." keys, prefix stripped.
        prefix = f"{name}."
        with np.load(args.inputs) as data:
            inputs = {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}
        start = time.perf_counter()
        CHECKS[name](strategy, inputs, out)
        print(f"keras_mirrored[{args.devices}] {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    np.savez(args.out, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
