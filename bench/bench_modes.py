"""Keras' built-in BN vs ours in every execution mode, and PyTorch's, side by side in one run (issue #14).

Three workloads, each in every mode:

- **layer**: one BN training step alone on a 64x56x56x64 float32 batch (``--shape``): forward with
  ``training=True`` (moving statistics updated), backward from a fixed cotangent ``dy`` to x, gamma and beta.
  The cotangent is fed directly (TF ``output_gradients``, ``jax.vjp``, ``torch.autograd.grad``), so only BN runs.
- **lenet-bn**: the same step for LeNet-BN's four BN layers alone, at their shapes in ``keras_bn.lenet_bn`` with
  batch ``--batch`` (64x24x24x6, 64x8x8x16, 64x120, 64x84; ``lenet_bn_shapes``), all four in one call (one
  ``tf.function`` / ``jax.jit``; torch's ``BatchNorm2d``/``BatchNorm1d`` NCHW in the pytorch mode). BN is a
  small share of the LeNet step, so its ours-vs-Keras verdict cannot be decided there; here it can.
  ``--lenet-steps`` calls per timed call, ``--lenet-repeats`` rounds, like LeNet.
- **lenet**: LeNet-BN training steps, batch 64 (``--batch``), SGD with momentum on fixed random 28x28 images:
  Keras' ``train_on_batch`` (the train function ``fit`` runs), and a plain PyTorch loop for the torch modules.

Modes (one child process per backend, since ``KERAS_BACKEND`` is fixed at import; children run one at a time):

============  ==============================================================  ====================
mode          how                                                             variants
============  ==============================================================  ====================
tf.function   TF backend, ``tf.function`` / ``compile(jit_compile=False)``    keras, ours
tf xla        TF backend, ``jit_compile=True``                                keras, ours
jax jit       JAX backend, ``jax.jit`` / ``compile(jit_compile=True)``        keras, ours
keras torch   torch backend, eager (Keras' default there)                     keras, ours
pytorch       plain PyTorch, NCHW                                             torch.nn, torch_ref
============  ==============================================================  ====================

Within a child the variants run in interleaved rounds (``bench/_timing.py``), ``--warmup`` rounds discarded,
``--repeats`` (>= 7 for a result) timed for the layer step and ``--lenet-repeats`` (default 3x ``--repeats``:
LeNet's steps are short and their per-round ratios spread widely) for LeNet; each row reports the median and
quartiles. Ratios within a mode are medians of per-round ratios; ratios across processes (TF vs ``torch.nn``) are
ratios of medians.

Goals (issue #14): ours / Keras' layer <= 1.00 in every mode; TF ours / ``torch.nn.BatchNorm2d`` <= 1.25 for the
layer step; ``torch_ref`` / ``torch.nn`` <= 1.25 in the LeNet loop. Each ratio comes with a 95% distribution-free
interval (``_timing.ratio_interval``) and its verdict says PASS (the whole interval meets the goal), MISS (none of
it does) or PARITY (within noise: the interval spans the goal; not a PASS).

``--isa avx2`` caps the children's kernels at AVX2 (``bench/_isa.py``: oneDNN, ATen and XLA:CPU; TF's Eigen kernels
and the hardware stay this machine's); the JSON and the printout say so.

Memory floor. The machine's bandwidth is a ``--bandwidth-mib`` numpy copy (one thread; read + write bytes over
the median time). A BN training step must move at least 8 passes over the batch of B = N*H*W*C*4 bytes, since a
batch of tens of MB does not stay in cache between passes: forward reads x for the moments (one pass gives mean
and variance), reads x again to normalize and writes y (3B); backward reads dy and x for the two reductions
(sum dy, sum dy*x_hat), then reads dy and x again and writes dx (5B); gamma, beta and the statistics are
C-sized and ignored. Each layer row's effective GB/s is 8B over its median time: the fraction of the measured
bandwidth shows how far it is from the floor (above 100% is possible: the copy runs on one thread, the layers
on ``--threads``, and a kernel may keep part of the batch in cache).

Allocator. glibc's malloc hands the free top of its heap back to the OS (past ``M_TRIM_THRESHOLD``) and maps blocks
above ``M_MMAP_THRESHOLD`` afresh; its dynamic rule raises that threshold, up to 32 MiB, as large blocks are
freed. A step that then touches fresh pages pays a minor page fault per 4 KiB page, and whether it does depends on
what else ran in the process and in what order, not on the variant: torch.nn's LeNet step paid 0 to 950 faults
per step from one process to the next, which moved its time by up to 30% and the torch_ref / torch.nn ratio
between 1.18 and 1.31. ``--allocator steady`` (the default) gives every child glibc's maximum threshold, 32 MiB,
from the start and no trimming (:data:`ALLOCATORS`): LeNet's steps touch no fresh page in any variant (the state
in which torch.nn is fastest). The layer step's 51 MB buffers lie above any threshold glibc allows: where malloc
serves them (torch, JAX) they are mapped afresh every step, ours and the peer's alike, while TensorFlow's own
allocator keeps them. ``--allocator glibc`` keeps glibc's dynamic rule. The faults column shows what each variant
paid either way.

Threads are set deliberately and printed: TF intra-op ``--threads``, inter-op 1; torch ``set_num_threads``
``--threads``, inter-op 1; JAX (XLA:CPU) has no per-process setting and uses its own pool over all usable CPUs.

    nice -n 10 python bench/bench_modes.py --json docs/results/bench-modes.json   # the README's table
    python bench/bench_modes.py --shape 8,8,8,8 --lenet-steps 2 --repeats 3 --warmup 1 --bandwidth-mib 8  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _isa import ISAS, describe_isa, isa_environment, isa_record  # bench/_isa.py
from _steps import tf_batch_norm_step, tf_batch_norm_steps, torch_training_step  # bench/_steps.py
from _timing import interleaved_rounds, paired_ratio, ratio_interval, spread, verdict  # bench/_timing.py

from export.machine import describe_machine, machine_info

#: backend child -> the modes it measures, in table order
BACKENDS = {
    "tensorflow": ("tf.function", "tf xla"),
    "jax": ("jax jit",),
    "torch": ("keras torch", "pytorch"),
}
WORKLOADS = ("layer", "lenet-bn", "lenet")
MIN_REPEATS = 7  # fewer is a smoke run: the table says so
BN_PASSES = 8  # minimal passes over the batch per training step (module docstring)
_JSON_MARK = "BENCH_MODES_JSON "


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds of the layer step (>= 7)")
    parser.add_argument("--lenet-repeats", type=int, help="timed rounds of LeNet (default: 3x --repeats)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (tracing, compiling)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for TF and torch")
    parser.add_argument("--shape", default="64,56,56,64", help="N,H,W,C of the layer step's batch")
    parser.add_argument("--batch", type=int, default=64, help="LeNet-BN batch size")
    parser.add_argument("--lenet-steps", type=int, default=10, help="LeNet training steps per timed call")
    parser.add_argument("--bandwidth-mib", type=int, default=512, help="size of the copy that measures bandwidth")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    parser.add_argument("--isa", choices=tuple(ISAS), default="native", help="cap the kernels' ISA (bench/_isa.py)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    parser.add_argument(
        "--allocator", choices=tuple(ALLOCATORS), default="steady", help="glibc malloc settings of the children"
    )
    parser.add_argument("--json", help="write the table and every timing to this file")
    parser.add_argument("--child", choices=tuple(BACKENDS), help=argparse.SUPPRESS)  # internal: one backend
    args = parser.parse_args(argv)
    args.lenet_repeats = 3 * args.repeats if args.lenet_repeats is None else args.lenet_repeats
    if (
        min(args.repeats, args.lenet_repeats, args.threads, args.batch, args.lenet_steps, args.bandwidth_mib) < 1
        or args.warmup < 0
    ):
        parser.error(
            "--repeats, --lenet-repeats, --threads, --batch, --lenet-steps and --bandwidth-mib must be positive"
        )
    try:
        shape = [int(v) for v in args.shape.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 4 or min(shape) < 1:
        parser.error(f"--shape takes N,H,W,C as four positive integers; got {args.shape!r}")
    args.shape = shape
    backends = [b for b in args.backends.split(",") if b]
    if not backends or set(backends) - set(BACKENDS):
        parser.error(f"--backends takes a comma list of {', '.join(BACKENDS)}; got {args.backends!r}")
    args.backends = backends
    workloads = [w for w in args.workloads.split(",") if w]
    if not workloads or set(workloads) - set(WORKLOADS):
        parser.error(f"--workloads takes a comma list of {', '.join(WORKLOADS)}; got {args.workloads!r}")
    args.workloads = workloads
    return args


# ---------------------------------------------------------------------------------------------- children


def lenet_bn_shapes(batch: int) -> list[tuple[int, ...]]:
    """Input shapes (channels last) of LeNet-BN's BN layers on 28x28 images (keras_bn/model.py: valid 5x5
    convolutions and 2x2 pooling: 28 -> 24 -> 12 -> 8, then Dense 120 and 84)."""
    return [(batch, 24, 24, 6), (batch, 8, 8, 16), (batch, 120), (batch, 84)]


def _inputs(shape, batch: int):
    """Seeded batches shared by every backend: x, dy for the layer; images (NHWC) and labels for LeNet;
    (x, dy) per BN layer of LeNet-BN."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = (0.5 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    images = rng.random((batch, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, batch).astype(np.int64)
    small = [
        ((0.5 + rng.standard_normal(s)).astype(np.float32), rng.standard_normal(s).astype(np.float32))
        for s in lenet_bn_shapes(batch)
    ]
    return x, dy, images, labels, small


def _repeated(run, steps: int):
    """``run`` called ``steps`` times per timed call (a call of the small workloads is too short to time alone)."""

    def repeated():
        for _ in range(steps):
            out = run()
        return out

    return repeated


def _keras_lenet(variant: str, jit_compile: bool):
    import keras_bn

    model = keras_bn.lenet_bn(variant, seed=0)
    return keras_bn.compile_lenet(model, optimizer="sgd", lr=0.01, momentum=0.9, jit_compile=jit_compile)


def _lenet_runner(model, images, labels, steps: int):
    def run():
        for _ in range(steps):
            model.train_on_batch(images, labels)  # returns host-side logs: the step is done

    return run


def _tensorflow_child(args) -> tuple[dict, dict]:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)  # before any op: pools fixed at first use
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    import keras_bn

    x_np, dy_np, images, labels, small = _inputs(args.shape, args.batch)
    x, dy = tf.constant(x_np), tf.constant(dy_np)
    small_xs, small_dys = [tf.constant(x) for x, _ in small], [tf.constant(dy) for _, dy in small]

    layer, lenet_bn, lenet = {}, {}, {}
    for mode, jit in (("tf.function", False), ("tf xla", True)):
        for variant, make in (("keras", keras.layers.BatchNormalization), ("ours", keras_bn.BatchNorm)):
            layer[f"{mode}|{variant}"] = tf_batch_norm_step(make(), x, dy, jit=jit)
            four = tf_batch_norm_steps([make() for _ in small], small_xs, small_dys, jit=jit)
            lenet_bn[f"{mode}|{variant}"] = _repeated(four, args.lenet_steps)
            lenet[f"{mode}|{variant}"] = _lenet_runner(_keras_lenet(variant, jit), images, labels, args.lenet_steps)
    threads = {"tensorflow": f"intra_op={tf.config.threading.get_intra_op_parallelism_threads()} inter_op=1"}
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__}
    return {"layer": layer, "lenet-bn": lenet_bn, "lenet": lenet}, {"threads": threads, "versions": versions}


def _jax_child(args) -> tuple[dict, dict]:
    import jax
    import jax.numpy as jnp
    import keras

    import keras_bn

    x_np, dy_np, images, labels, small = _inputs(args.shape, args.batch)

    def layers_step(layers, xs, dys):
        """One jitted call: each layer's forward (training=True) and its vjp from its own cotangent."""
        xs, dys = [jnp.asarray(x) for x in xs], [jnp.asarray(dy) for dy in dys]
        for layer, x in zip(layers, xs, strict=True):
            layer.build(x.shape)
        trainable = [[v.value for v in layer.trainable_variables] for layer in layers]
        non_trainable = [[v.value for v in layer.non_trainable_variables] for layer in layers]

        @jax.jit
        def train_step(trainable, non_trainable, xs, dys):
            outputs = []
            for layer, weights, stats, x, dy in zip(layers, trainable, non_trainable, xs, dys, strict=True):

                def forward(weights, x, layer=layer, stats=stats):
                    return layer.stateless_call(weights, stats, x, training=True)

                y, pullback, new_stats = jax.vjp(forward, weights, x, has_aux=True)
                grads, dx = pullback(dy)
                outputs.append((y, dx, grads, new_stats))  # y returned: XLA must not drop the forward's last pass
            return outputs

        return lambda: jax.block_until_ready(train_step(trainable, non_trainable, xs, dys))

    layer, lenet_bn, lenet = {}, {}, {}
    for variant, make in (("keras", keras.layers.BatchNormalization), ("ours", keras_bn.BatchNorm)):
        layer[f"jax jit|{variant}"] = layers_step([make()], [x_np], [dy_np])
        four = layers_step([make() for _ in small], [x for x, _ in small], [dy for _, dy in small])
        lenet_bn[f"jax jit|{variant}"] = _repeated(four, args.lenet_steps)
        lenet[f"jax jit|{variant}"] = _lenet_runner(_keras_lenet(variant, True), images, labels, args.lenet_steps)
    cpus = machine_info()["usable_cpus"]
    threads = {"jax": f"XLA:CPU's own pool (no per-process setting; {cpus} usable CPUs)"}
    workloads = {"layer": layer, "lenet-bn": lenet_bn, "lenet": lenet}
    return workloads, {"threads": threads, "versions": {"jax": jax.__version__}}


def _torch_child(args) -> tuple[dict, dict]:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    import keras

    import keras_bn
    import torch_ref
    from torch_ref.model import lenet_bn as torch_lenet_bn

    x_np, dy_np, images, labels, small = _inputs(args.shape, args.batch)
    channels = args.shape[3]

    def layers_step(forwards, params, xs, dys):
        """One call: every forward, then one ``autograd.grad`` from all cotangents to each x and its params."""
        xs = [x.requires_grad_(True) for x in xs]
        inputs = [t for x, p in zip(xs, params, strict=True) for t in (x, *p)]

        def run():
            ys = [forward(x) for forward, x in zip(forwards, xs, strict=True)]
            return ys, torch.autograd.grad(ys, inputs, grad_outputs=dys)

        return run

    def keras_step(make, xs_np, dys_np):
        bns = [make() for _ in xs_np]
        for bn, x in zip(bns, xs_np, strict=True):
            bn.build(x.shape)
        forwards = [lambda x, bn=bn: bn(x, training=True) for bn in bns]
        params = [[bn.gamma.value, bn.beta.value] for bn in bns]
        xs = [torch.from_numpy(x.copy()) for x in xs_np]
        return layers_step(forwards, params, xs, [torch.from_numpy(dy.copy()) for dy in dys_np])

    def channels_first(array):  # NHWC -> NCHW; (N, C) stays
        return torch.from_numpy(array.transpose(0, 3, 1, 2).copy() if array.ndim == 4 else array.copy())

    layer, lenet_bn, lenet = {}, {}, {}
    small_xs, small_dys = [x for x, _ in small], [dy for _, dy in small]
    for variant, make in (("keras", keras.layers.BatchNormalization), ("ours", keras_bn.BatchNorm)):
        layer[f"keras torch|{variant}"] = keras_step(make, [x_np], [dy_np])
        lenet_bn[f"keras torch|{variant}"] = _repeated(keras_step(make, small_xs, small_dys), args.lenet_steps)
        lenet[f"keras torch|{variant}"] = _lenet_runner(_keras_lenet(variant, False), images, labels, args.lenet_steps)

    # Plain PyTorch: NCHW, Keras' defaults (eps 1e-3, momentum 0.01 in torch's convention) for the layer.
    x_nchw = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    dy_nchw = torch.from_numpy(dy_np.transpose(0, 3, 1, 2).copy())
    images_nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    labels_t = torch.from_numpy(labels)
    for variant, module, builder_arg in (
        ("torch.nn", torch.nn.BatchNorm2d, "torch"),
        ("torch_ref", torch_ref.BatchNorm2d, "ours"),
    ):
        bn = module(channels, eps=1e-3, momentum=0.01).train()
        layer[f"pytorch|{variant}"] = layers_step([bn], [[bn.weight, bn.bias]], [x_nchw], [dy_nchw])
        one_d = {"torch.nn": torch.nn.BatchNorm1d, "torch_ref": torch_ref.BatchNorm1d}[variant]
        bns = [(module if x.ndim == 4 else one_d)(x.shape[-1], eps=1e-3, momentum=0.01).train() for x in small_xs]
        params = [[bn.weight, bn.bias] for bn in bns]
        four = layers_step(bns, params, [channels_first(x) for x in small_xs], [channels_first(d) for d in small_dys])
        lenet_bn[f"pytorch|{variant}"] = _repeated(four, args.lenet_steps)
        model = torch_lenet_bn(builder_arg, seed=0)
        lenet[f"pytorch|{variant}"] = _torch_lenet_runner(model, images_nchw, labels_t, args.lenet_steps)
    kernels = torch.backends.cpu.get_cpu_capability()  # ATen's dispatch level: shows an --isa cap took effect
    threads = {"torch": f"set_num_threads={torch.get_num_threads()} interop=1, ATen kernels {kernels}"}
    versions = {"torch": torch.__version__, "keras": keras.__version__}
    return {"layer": layer, "lenet-bn": lenet_bn, "lenet": lenet}, {"threads": threads, "versions": versions}


def _torch_lenet_runner(model, images, labels, steps: int):
    step = torch_training_step(model, images, labels)

    def run():
        for _ in range(steps):
            loss = step()
        return loss.item()

    return run


def child_main(args) -> int:
    """Time one backend's variants and print one JSON line (seconds per call, per round)."""
    build = {"tensorflow": _tensorflow_child, "jax": _jax_child, "torch": _torch_child}[args.child]
    workloads, about = build(args)
    repeats = {"layer": args.repeats, "lenet-bn": args.lenet_repeats, "lenet": args.lenet_repeats}
    faults = {name: {} for name in args.workloads}
    seconds = {
        name: interleaved_rounds(workloads[name], repeats[name], args.warmup, page_faults=faults[name])
        for name in args.workloads
    }
    # what this process's malloc was given (glibc reads the variables at startup): the parent records it
    allocator = {name: os.environ.get(name) for name in _ALLOCATOR_VARIABLES}
    record = {"backend": args.child, "seconds": seconds, "minor_faults": faults, "allocator": allocator, **about}
    print(_JSON_MARK + json.dumps(record), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ parent


def memory_bandwidth(mib: int, repeats: int = 5) -> dict:
    """GB/s of a ``mib`` MiB numpy copy (bytes read + written over the median time), one thread."""
    import numpy as np

    source = np.ones(mib * 2**20 // 8, dtype=np.float64)
    target = np.empty_like(source)
    np.copyto(target, source)  # first touch: page faults are not bandwidth
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"bytes": 2 * source.nbytes, "median_s": median, "gb_per_s": 2 * source.nbytes / median / 1e9}


#: --allocator: glibc malloc variables for the children ("Allocator" above). 32 MiB is glibc's largest mmap threshold
#: on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), the one its dynamic rule ends at; setting a threshold turns that rule off.
ALLOCATORS: dict[str, dict[str, str]] = {
    "steady": {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)},
    "glibc": {},
}
_ALLOCATOR_VARIABLES = sorted({name for variables in ALLOCATORS.values() for name in variables})


def run_child(backend: str, argv: list[str], isa: str = "native", allocator: str = "steady") -> dict:
    """One backend's timings from a fresh process with KERAS_BACKEND, the cap of ``isa`` and the ``allocator``'s
    variables set; stderr shows."""
    env = isa_environment(isa) | ALLOCATORS[allocator] | {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", backend]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_JSON_MARK)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench_modes: the {backend} child failed (exit {done.returncode}); see its stderr above")
    return json.loads(lines[-1][len(_JSON_MARK) :])


def describe_allocator(name: str) -> str:
    """``--allocator``'s name and variables, for the printout and the README."""
    variables = ALLOCATORS[name]
    return name + (f" ({', '.join(f'{k}={v}' for k, v in variables.items())})" if variables else " (glibc's own rule)")


def _row(
    workload: str,
    key: str,
    seconds: list[float],
    per: int,
    moved_bytes: int,
    bandwidth: float,
    faults: list[int] | None = None,
) -> dict:
    """Median and quartiles per step (``per`` steps per timed call); GB/s over ``moved_bytes`` if given; the median
    of the process's minor page faults per step where ``faults`` (per timed call) were counted."""
    mode, variant = key.split("|")
    stats = {name: value / per for name, value in spread(seconds).items()}
    row = {"workload": workload, "mode": mode, "variant": variant, **{f"{k}_ms": 1e3 * v for k, v in stats.items()}}
    if faults:
        row["minor_faults_per_step"] = statistics.median(faults) / per
    if moved_bytes:
        row["gb_per_s"] = moved_bytes / stats["median"] / 1e9
        row["fraction_of_bandwidth"] = row["gb_per_s"] / bandwidth
    return row


def assemble(children: list[dict], args, bandwidth: dict, load_average: list[float]) -> dict:
    """The table: every (workload, mode, variant) row with median and quartiles, then the goals' ratios."""
    n, h, w, c = args.shape
    layer_bytes = BN_PASSES * n * h * w * c * 4
    lenet_bn_bytes = BN_PASSES * 4 * sum(math.prod(shape) for shape in lenet_bn_shapes(args.batch))
    seconds = {workload: {} for workload in WORKLOADS}
    faults = {workload: {} for workload in WORKLOADS}
    for child in children:
        for workload, timings in child["seconds"].items():
            seconds[workload].update(timings)
        for workload, counts in child.get("minor_faults", {}).items():
            faults[workload].update(counts)
    rows = []
    for key, values in seconds["layer"].items():
        rows.append(_row("layer", key, values, 1, layer_bytes, bandwidth["gb_per_s"], faults["layer"].get(key)))
    for key, values in seconds["lenet-bn"].items():
        per = args.lenet_steps
        rows.append(
            _row("lenet-bn", key, values, per, lenet_bn_bytes, bandwidth["gb_per_s"], faults["lenet-bn"].get(key))
        )
    alone = {(r["mode"], r["variant"]): r["median_ms"] for r in rows if r["workload"] == "lenet-bn"}
    for key, values in seconds["lenet"].items():
        row = _row("lenet", key, values, args.lenet_steps, 0, bandwidth["gb_per_s"], faults["lenet"].get(key))
        row["samples_per_s"] = 1e3 * args.batch / row["median_ms"]
        if (row["mode"], row["variant"]) in alone:
            # an estimate, not a measurement of BN inside the step: the layers alone, in a function of their own
            # (no fusion with the convolutions around them); a model without BN would be another model
            row["bn_alone_share"] = alone[row["mode"], row["variant"]] / row["median_ms"]
        rows.append(row)

    goals = []

    def goal(workload: str, claim: str, num: str, den: str, limit: float | None, paired: bool) -> None:
        if num not in seconds[workload] or den not in seconds[workload]:
            return
        a, b = seconds[workload][num], seconds[workload][den]
        ratio = paired_ratio(a, b) if paired else statistics.median(a) / statistics.median(b)
        low, high, coverage = ratio_interval(a, b, paired)
        goals.append(
            {"workload": workload, "claim": claim, "numerator": num, "denominator": den, "ratio": ratio}
            | {"ratio_kind": "median of per-round ratios" if paired else "ratio of medians"}
            | {"interval": [low, high], "interval_coverage": coverage}
            | {"goal": limit, "verdict": verdict(low, high, limit)}
        )

    for workload in WORKLOADS:
        for mode in (m for b in args.backends for m in BACKENDS[b] if m != "pytorch"):
            goal(workload, f"ours / Keras' layer, {mode}", f"{mode}|ours", f"{mode}|keras", 1.00, True)
    for mode in ("tf.function", "tf xla"):
        goal("layer", f"TF ours ({mode}) / torch.nn.BatchNorm2d", f"{mode}|ours", "pytorch|torch.nn", 1.25, False)
    goal("lenet", "torch_ref / torch.nn, PyTorch loop", "pytorch|torch_ref", "pytorch|torch.nn", 1.25, True)
    goal("layer", "torch_ref / torch.nn, layer step", "pytorch|torch_ref", "pytorch|torch.nn", None, True)
    goal("lenet-bn", "torch_ref / torch.nn, LeNet's BN layers", "pytorch|torch_ref", "pytorch|torch.nn", None, True)

    threads, versions = {}, {"python": platform.python_version()}
    for child in children:
        threads |= child["threads"]
        versions |= child["versions"]
    threads["numpy copy"] = "1 thread"
    machine = machine_info()
    isa = isa_record(args.isa, machine)
    return {
        "machine": machine,
        "isa": isa,
        "allocator": {
            "name": args.allocator,
            "variables": ALLOCATORS[args.allocator],
            "seen_by_children": {child["backend"]: child["allocator"] for child in children},
        },
        "machine_as_run": describe_isa(isa, describe_machine(machine)),
        "command": "python bench/bench_modes.py " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        # 1-minute load average before and after: on a shared machine it says how much else was running
        "load_average": {"start": load_average[0], "end": os.getloadavg()[0]},
        "settings": {
            "shape": args.shape,
            "batch": args.batch,
            "lenet_steps": args.lenet_steps,
            "repeats": args.repeats,
            "lenet_repeats": args.lenet_repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "smoke": min(args.repeats, args.lenet_repeats) < MIN_REPEATS,
        },
        "threads": threads,
        "versions": versions,
        "bandwidth": bandwidth,
        "layer_bytes_moved": layer_bytes,
        "lenet_bn_shapes": lenet_bn_shapes(args.batch),
        "lenet_bn_bytes_moved": lenet_bn_bytes,
        "rows": rows,
        "goals": goals,
        "seconds": seconds,
        "minor_faults": faults,
    }


def _faults(row: dict) -> str:
    return f"{row['minor_faults_per_step']:.0f}" if "minor_faults_per_step" in row else "-"


def print_table(result: dict) -> None:
    settings, bandwidth = result["settings"], result["bandwidth"]
    print(f"machine: {result['machine_as_run']} (figures hold for this CPU and ISA only)")
    print("threads: " + "; ".join(f"{k} {v}" for k, v in result["threads"].items()))
    load = result["load_average"]
    print(f"1-minute load average: {load['start']:.1f} at start, {load['end']:.1f} at end")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    moved = f"{bandwidth['bytes'] / 2**20:.0f} MiB moved"
    print(f"memory bandwidth: {bandwidth['gb_per_s']:.1f} GB/s (numpy copy, one thread, {moved})")
    shape = "x".join(map(str, settings["shape"]))
    print(
        f"{settings['repeats']} interleaved rounds (LeNet: {settings['lenet_repeats']}) per process "
        f"after {settings['warmup']} warm-up"
    )
    if settings["smoke"]:
        print(f"SMOKE RUN: fewer than {MIN_REPEATS} rounds, not a result")
    print(f"\nlayer step {shape} float32, fwd+bwd+update; GB/s over {result['layer_bytes_moved'] / 1e6:.3g} MB moved")
    print(f"{'mode':12s} {'variant':10s} {'median ms':>10s} {'IQR ms':>9s} {'GB/s':>7s} {'of bw':>6s} {'faults':>7s}")
    for r in (r for r in result["rows"] if r["workload"] == "layer"):
        print(
            f"{r['mode']:12s} {r['variant']:10s} {r['median_ms']:10.2f} {r['iqr_ms']:9.2f} "
            f"{r['gb_per_s']:7.1f} {r['fraction_of_bandwidth']:6.0%} {_faults(r):>7s}"
        )
    shapes = ", ".join("x".join(map(str, s)) for s in result["lenet_bn_shapes"])
    print(
        f"\nLeNet-BN's 4 BN layers alone ({shapes}) float32, fwd+bwd+update in one call, "
        f"{settings['lenet_steps']} calls per timed call; GB/s over {result['lenet_bn_bytes_moved'] / 1e6:.3g} MB "
        "(cache-resident: the floor does not apply)"
    )
    print(f"{'mode':12s} {'variant':10s} {'ms/call':>10s} {'IQR ms':>9s} {'GB/s':>7s} {'faults':>7s}")
    for r in (r for r in result["rows"] if r["workload"] == "lenet-bn"):
        print(
            f"{r['mode']:12s} {r['variant']:10s} {r['median_ms']:10.3f} {r['iqr_ms']:9.3f} {r['gb_per_s']:7.1f} "
            f"{_faults(r):>7s}"
        )
    print(f"\nLeNet-BN training, batch {settings['batch']}, {settings['lenet_steps']} steps per timed call")
    head = f"{'mode':12s} {'variant':10s} {'ms/step':>10s} {'IQR ms':>9s} {'samples/s':>10s} {'BN alone/step':>13s}"
    print(f"{head} {'faults':>7s}")
    for r in (r for r in result["rows"] if r["workload"] == "lenet"):
        share = f"{r['bn_alone_share']:13.0%}" if "bn_alone_share" in r else f"{'-':>13s}"
        print(
            f"{r['mode']:12s} {r['variant']:10s} {r['median_ms']:10.2f} {r['iqr_ms']:9.2f} "
            f"{r['samples_per_s']:10.0f} {share} {_faults(r):>7s}"
        )
    if any("bn_alone_share" in r for r in result["rows"]):
        print("BN alone/step: the lenet-bn call's median over the LeNet step's; an estimate of BN's share")
    print(
        "faults: the process's minor page faults per step (median): memory the C allocator returned to the OS and "
        "touched again, which moves a variant's time with what else ran in the process"
    )
    print(f"\n{'workload':8s} {'claim':45s} {'ratio':>6s} {'95% interval':>13s} {'goal':>6s}  verdict")
    for g in result["goals"]:
        limit = "-" if g["goal"] is None else f"<={g['goal']:.2f}"
        interval = f"{g['interval'][0]:.3f}..{g['interval'][1]:.3f}"
        print(f"{g['workload']:8s} {g['claim']:45s} {g['ratio']:6.3f} {interval:>13s} {limit:>6s}  {g['verdict']}")
    print("ratios are time / time: below 1 is faster; within a mode: median of per-round ratios")
    print("verdict: PASS if the whole interval meets the goal, MISS if none of it does, else PARITY (within noise)")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        return child_main(args)
    print(f"machine: {describe_isa(isa_record(args.isa, machine_info()), describe_machine())}", flush=True)
    print(f"allocator: {describe_allocator(args.allocator)}", flush=True)
    load_at_start = os.getloadavg()[0]
    bandwidth = memory_bandwidth(args.bandwidth_mib)
    child_argv = list(sys.argv[1:] if argv is None else argv)
    children = []
    for backend in args.backends:
        started = time.perf_counter()
        children.append(run_child(backend, child_argv, args.isa, args.allocator))
        print(f"[{backend}] {time.perf_counter() - started:.0f} s", flush=True)
    result = assemble(children, args, bandwidth, [load_at_start])
    print()
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
