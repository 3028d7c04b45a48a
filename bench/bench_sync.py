"""Cost of synchronized BatchNorm on 2 logical CPU devices (tf.distribute.MirroredStrategy).

Side by side in one process, under one MirroredStrategy over logical CPUs:

- a single large BN layer, one training step (forward, then gradients for x, gamma, beta);
- LeNet-BN, ``model.fit`` on random 28x28 images (SGD with momentum), time per step;

each with ``keras_bn.BatchNorm`` and ``keras.layers.BatchNormalization``, ``synchronized`` False
and True, plus ours unsynchronized with ``fused=False``: the synchronized layer cannot use TF's
fused kernel, so that is the like-for-like baseline for the cost of the collectives alone.
Variants take turns in rotating order for ``--rounds`` rounds (so load drift on a shared machine
hits all alike); reported: median ms per step, and each synchronized variant's ratio to the same
layer unsynchronized (and, for ours, to the non-fused unsynchronized layer).

Collective calls per BN layer per step are counted while each step is traced: calls of
``ReplicaContext.all_reduce`` in the forward and the backward pass, per replica, and the
collective all-reduce kernels in the traced graph. For LeNet, all calls of one step are counted
(the optimizer's gradient all-reduce included) and the synchronized variant's excess over the
local one, divided by the 4 BN layers, is the per-layer figure.

    nice -n 10 python bench/bench_sync.py                 # defaults below
    python bench/bench_sync.py --rounds 3 --steps 3       # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from export.machine import describe_machine, machine_info  # noqa: E402

# (layer, synchronized, fused): ours-local uses TF's fused kernel where it applies; the synchronized
# layer cannot (the statistics come from the all-reduce), so ours-local-generic (fused=False) is
# the unsynchronized baseline with the same non-fused math, isolating the cost of the collectives.
VARIANTS = [
    ("ours", False, None),
    ("ours", False, False),
    ("ours", True, None),
    ("keras", False, None),
    ("keras", True, None),
]
LENET_BN_LAYERS = 4


class AllReduceCounter:
    """Counts ``ReplicaContext.all_reduce`` calls during tracing, split into forward/backward.

    MirroredStrategy traces each replica in its own thread, so the phase is thread-local.
    """

    def __init__(self) -> None:
        self.phase = threading.local()
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def set_phase(self, name: str) -> None:
        self.phase.name = name

    def __enter__(self) -> AllReduceCounter:
        from tensorflow.python.distribute import distribute_lib

        self._cls = distribute_lib.ReplicaContextBase
        self._original = original = self._cls.all_reduce

        def counting(ctx, reduce_op, value, options=None):
            with self._lock:
                self.calls.append(getattr(self.phase, "name", "forward"))
            return original(ctx, reduce_op, value, options)

        self._cls.all_reduce = counting
        return self

    def __exit__(self, *exc) -> None:
        self._cls.all_reduce = self._original

    def count(self, phase: str, per: int) -> float:
        return self.calls.count(phase) / per


def collective_kernels(graph: tf.Graph) -> int:
    """Collective all-reduce kernels in a traced graph, nested function bodies included."""
    kinds = {"CollectiveReduce", "CollectiveReduceV2", "CollectiveReduceV3", "NcclAllReduce"}
    graph_def = graph.as_graph_def()
    nodes = list(graph_def.node)
    for fn in graph_def.library.function:
        nodes.extend(fn.node_def)
    return sum(node.op in kinds for node in nodes)


def make_bn(kind: str, synchronized: bool, fused=None):
    import keras

    from keras_bn import BatchNorm

    if kind == "ours":
        return BatchNorm(synchronized=synchronized, fused=fused)
    return keras.layers.BatchNormalization(synchronized=synchronized)


def layer_variant(strategy, kind: str, synchronized: bool, fused, shape: tuple[int, ...]):
    """A traced single-layer training step; returns (run, counts)."""
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        layer = make_bn(kind, synchronized, fused)
        layer.build((None, *shape[1:]))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    per = shape[0] // replicas
    xs = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[ctx.replica_id_in_sync_group * per : (ctx.replica_id_in_sync_group + 1) * per])
    )
    counter = AllReduceCounter()

    def step(xr):
        with tf.GradientTape() as tape:
            tape.watch(xr)
            counter.set_phase("forward")
            y = layer(xr, training=True)
            loss = tf.reduce_sum(y * y)
        counter.set_phase("backward")
        grads = tape.gradient(loss, [xr, layer.gamma.value, layer.beta.value])
        counter.set_phase("forward")
        return [tf.reduce_sum(g) for g in grads]

    fn = tf.function(lambda v: strategy.run(step, args=(v,)))
    with counter:
        concrete = fn.get_concrete_function(xs)
    counts = {
        "forward_calls": counter.count("forward", replicas),
        "backward_calls": counter.count("backward", replicas),
        "kernels": collective_kernels(concrete.graph) / replicas,
    }

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            out = fn(xs)
        strategy.experimental_local_results(out[0])[0].numpy()
        return (time.perf_counter() - start) / steps

    return run, counts


class BatchTimer:
    """Wall time between consecutive ``on_train_batch_end`` calls of one fit: steady-state steps only.

    The first batch (iterator start-up, and fit's own set-up) is left out; the median of the rest
    is the step time. Built lazily on keras.callbacks.Callback so importing this file stays cheap.
    """

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.ends: list[float] = []

            def on_train_batch_end(self, batch, logs=None):
                self.ends.append(time.perf_counter())

            def step_seconds(self) -> float:
                return statistics.median(np.diff(self.ends))

        return _Timer()


def lenet_variant(strategy, kind: str, synchronized: bool, fused, batch: int, steps: int):
    """A LeNet-BN ``model.fit`` over ``steps`` batches; returns (run, counts)."""

    from keras_bn.model import compile_lenet, lenet_bn

    replicas = strategy.num_replicas_in_sync
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (batch * steps, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, batch * steps)
    with strategy.scope():
        extra = {} if fused is None else {"fused": fused}
        model = lenet_bn(kind, seed=0, synchronized=synchronized, **extra)
        compile_lenet(model, "sgd", lr=0.05, momentum=0.9)
    counter = AllReduceCounter()
    with counter:  # the first fit traces the train step (forward and backward are not told apart here)
        model.fit(images, labels, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    # All all_reduce calls of one train step, per replica: the optimizer's gradient all-reduce too;
    # the per-BN-layer figure is (synchronized - local) / 4, computed in main().
    counts = {"calls_per_step": counter.count("forward", replicas)}

    def run(_: int) -> float:
        timer = BatchTimer()
        model.fit(images, labels, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
        return timer.step_seconds()

    return run, counts


def interleaved(runs: dict[str, callable], rounds: int, steps: int) -> dict[str, list[float]]:
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up after tracing
        runs[name](1)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(runs[name](steps))
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--layer-shape", default="64,32,32,64", help="global NHWC batch for the single BN layer")
    parser.add_argument("--lenet-batch", type=int, default=128, help="global batch (split over the devices)")
    parser.add_argument("--lenet-steps", type=int, default=12, help="batches per timed model.fit call (>= 3)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="single-layer steps per timing")
    parser.add_argument("--intra-threads", type=int, default=1, help="TF intra-op threads (per op)")
    parser.add_argument("--inter-threads", type=int, default=2, help="TF inter-op threads (replicas run in parallel)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices)
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_threads)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.devices)])
    shape = tuple(int(s) for s in args.layer_shape.split(","))
    print(
        f"machine: {describe_machine()}; TF {tf.__version__}; "
        f"MirroredStrategy over {args.devices} logical CPUs; threads: TF intra-op "
        f"{tf.config.threading.get_intra_op_parallelism_threads()}, inter-op "
        f"{tf.config.threading.get_inter_op_parallelism_threads()} (set by --intra-threads/--inter-threads)"
    )
    results: dict = {"machine": machine_info(), "config": vars(args), "layer": {}, "lenet": {}}
    for bench, build, steps in (
        ("layer", lambda k, s, f: layer_variant(strategy, k, s, f, shape), args.steps),
        ("lenet", lambda k, s, f: lenet_variant(strategy, k, s, f, args.lenet_batch, args.lenet_steps), 1),
    ):
        runs, counts = {}, {}
        for kind, synchronized, fused in VARIANTS:
            name = f"{kind}-{'sync' if synchronized else 'local'}{'-generic' if fused is False else ''}"
            runs[name], counts[name] = build(kind, synchronized, fused)
        if bench == "lenet":
            for kind in ("ours", "keras"):
                extra = counts[f"{kind}-sync"]["calls_per_step"] - counts[f"{kind}-local"]["calls_per_step"]
                counts[f"{kind}-sync"]["calls_per_bn_layer"] = extra / LENET_BN_LAYERS
        times = interleaved(runs, args.rounds, steps)
        what = f"single BN layer, global batch {shape}" if bench == "layer" else (
            f"LeNet-BN model.fit, global batch {args.lenet_batch}"
        )  # fmt: skip
        print(f"\n{what}: median ms/step over {args.rounds} rounds")
        print(f"{'variant':18s} {'ms/step':>8s} {'sync/local':>10s} {'sync/generic':>12s}  collectives per BN layer")
        for name, values in times.items():
            median = statistics.median(values) * 1e3
            ratios = ["", ""]
            if name.endswith("sync"):
                for i, base in enumerate((name.replace("sync", "local"), name.replace("sync", "local-generic"))):
                    if base in times:
                        ratios[i] = f"{median / (statistics.median(times[base]) * 1e3):.2f}"
            print(f"{name:18s} {median:8.2f} {ratios[0]:>10s} {ratios[1]:>12s}  {counts[name]}")
            results[bench][name] = {"median_ms": median, "ms": [v * 1e3 for v in values], "collectives": counts[name]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
