"""What XLA compiles one BN training step into, Keras' layer vs ours: load-independent figures (issue #14).

Timings on a shared machine drift; the compiled program does not. For the layer step of ``bench_modes``
(64x56x56x64 float32, forward with ``training=True``, backward from a fixed ``dy``; ``--shape``) this prints,
per mode (TensorFlow ``jit_compile=True``, JAX ``jax.jit``) and variant, from the *optimized* HLO:

- ``kernels``: fusions launched at the top level of the program;
- ``x-sized reads`` / ``writes``: operands and results of those kernels that have the batch's shape, each
  one pass over B = N*H*W*C*4 bytes (XLA:CPU writes an elementwise expression out before reducing it, so a
  reduction of ``x - shift`` costs a write and two reads where one of ``x`` costs one read);
- ``in branches``: the same counts inside ``conditional`` branches, which run only when taken (ours: the
  mean's refinement, only for data with a large offset, SPEC.md §8.5);
- JAX only: XLA's own ``cost_analysis()`` bytes accessed and flops (both branches of a conditional counted);
- ``tf.function`` rows: the plain TensorFlow graph (no XLA), where every op is a kernel of its own: ops that
  move data, and their x-sized inputs (reads) and outputs (writes), on the traced graph before Grappler.

    python bench/xla_cost.py                       # both backends, the bench_modes shape
    python bench/xla_cost.py --backends jax --shape 64,24,24,6
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from export.machine import describe_machine

BACKENDS = ("tensorflow", "jax")
_JSON_MARK = "XLA_COST_JSON "
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>\S+?)(?:\{[^}]*\})? (?P<op>[\w\-]+)\((?P<args>[^)]*)\)"
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="64,56,56,64", help="N,H,W,C of the layer step's batch")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.shape = [int(v) for v in args.shape.split(",")]
    except ValueError:
        args.shape = []
    if len(args.shape) != 4 or min(args.shape) < 1:
        parser.error("--shape takes N,H,W,C as four positive integers")
    args.backends = [b for b in args.backends.split(",") if b]
    if not args.backends or set(args.backends) - set(BACKENDS):
        parser.error(f"--backends takes a comma list of {', '.join(BACKENDS)}")
    return args


def _computations(hlo: str) -> dict[str, list[str]]:
    """The HLO module's computations by name (``ENTRY`` for the entry), each as its instruction lines."""
    found, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            name = "ENTRY" if header.group(1) else header.group(2)
            found[name] = []
        elif name and line.startswith("  "):
            found[name].append(line)
    return found


def passes(hlo: str, big_shape: str) -> dict:
    """Top-level kernels and x-sized reads/writes of the entry computation, and of conditional branches."""
    computations = _computations(hlo)

    def count(lines: list[str]) -> tuple[int, int, int, list[str]]:
        shapes, fusions, reads, writes, branches = {}, 0, 0, 0, []
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            shapes[match["name"]] = match["shape"]
            op = match["op"]
            if op == "conditional":
                branches += re.findall(r"(?:true_computation|false_computation)=%([\w.\-]+)", line)
                branches += re.findall(r"%([\w.\-]+)", line.split("branch_computations={", 1)[-1].split("}")[0])
                continue
            if op not in ("fusion", "custom-call", "dot", "reduce", "convolution"):
                continue
            fusions += 1
            args = re.sub(r"/\*.*?\*/", "", match["args"])
            operands = {a.strip().lstrip("%") for a in args.split(",")}
            reads += sum(shapes.get(a) == big_shape for a in operands)
            writes += match["shape"] == big_shape
        return fusions, reads, writes, branches

    fusions, reads, writes, branches = count(computations.get("ENTRY", []))
    branch_reads = branch_writes = 0
    for branch in set(b for b in branches if "computation" not in b or b in computations):
        _, r, w, _ = count(computations.get(branch, []))
        branch_reads, branch_writes = branch_reads + r, branch_writes + w
    return {
        "fusions": fusions,
        "reads": reads,
        "writes": writes,
        "conditionals": len(branches) // 2,
        "branch_reads": branch_reads,
        "branch_writes": branch_writes,
    }


def _tensorflow_child(shape) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_bn

    rng = np.random.default_rng(0)
    x = tf.constant((0.5 + rng.standard_normal(shape)).astype(np.float32))
    dy = tf.constant(rng.standard_normal(shape).astype(np.float32))
    result = {}
    for variant, make in (("keras", keras.layers.BatchNormalization), ("ours", keras_bn.BatchNorm)):
        step = _tf_step(tf, make())
        step(x, dy)  # builds the layer outside the compiled function's trace
        hlo = step.experimental_get_compiler_ir(x, dy)(stage="optimized_hlo")
        result[f"xla|{variant}"] = passes(hlo, _hlo_shape(shape))
        graph = _tf_step(tf, make(), jit=False).get_concrete_function(x, dy).graph
        result[f"graph|{variant}"] = graph_passes(graph, shape)
    return result


#: graph ops that move no data (or only alias it)
_FREE_OPS = {"Const", "Placeholder", "Identity", "IdentityN", "StopGradient", "Reshape", "NoOp", "ReadVariableOp"}


def graph_passes(graph, shape) -> dict:
    import tensorflow as tf

    """TF graph (``tf.function`` without XLA): every op is its own kernel, so each x-sized input is a read and
    each x-sized output a write. Counted on the traced graph, before Grappler merges duplicate ops."""
    big = tf.TensorShape(shape)
    ops = [op for op in graph.get_operations() if op.type not in _FREE_OPS]
    reads = sum(t.shape == big for op in ops for t in op.inputs)
    writes = sum(bool(op.outputs) and op.outputs[0].shape == big for op in ops)
    return {"fusions": len(ops), "reads": reads, "writes": writes, "conditionals": 0}


def _tf_step(tf, layer, *, jit: bool = True):
    """bench_modes' TensorFlow layer step (bench/_steps.py), compiled by XLA (``jit``) or a plain graph."""

    @tf.function(jit_compile=jit)
    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return y, *tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=dy)

    return step


def _jax_child(shape) -> dict:
    import jax
    import keras
    import numpy as np

    import keras_bn

    rng = np.random.default_rng(0)
    x = jax.numpy.asarray((0.5 + rng.standard_normal(shape)).astype(np.float32))
    dy = jax.numpy.asarray(rng.standard_normal(shape).astype(np.float32))
    result = {}
    for variant, make in (("keras", keras.layers.BatchNormalization), ("ours", keras_bn.BatchNorm)):
        layer = make()
        layer.build(x.shape)
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def train_step(trainable, non_trainable, x, dy, layer=layer):
            def forward(trainable, x):
                return layer.stateless_call(trainable, non_trainable, x, training=True)

            y, pullback, new_stats = jax.vjp(forward, trainable, x, has_aux=True)
            return y, *pullback(dy), new_stats

        compiled = jax.jit(train_step).lower(trainable, non_trainable, x, dy).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        result[variant] = passes(compiled.as_text(), _hlo_shape(shape)) | {
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "flops": float(cost.get("flops", 0.0)),
        }
    return result


def _hlo_shape(shape) -> str:
    return "f32[" + ",".join(map(str, shape)) + "]"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        build = {"tensorflow": _tensorflow_child, "jax": _jax_child}[args.child]
        print(_JSON_MARK + json.dumps(build(args.shape)), flush=True)
        return 0
    print(f"machine: {describe_machine()} (the compiled program depends on XLA's version and CPU target)")
    shape = "x".join(map(str, args.shape))
    print(f"layer step {shape} float32, fwd+bwd+update; one x-sized pass = {4 * math.prod(args.shape) / 1e6:.1f} MB")
    print(
        f"{'mode':11s} {'variant':8s} {'kernels':>7s} {'reads':>6s} {'writes':>6s} {'passes':>6s}"
        f" {'in branches r/w':>15s} {'XLA bytes MB':>12s} {'GFLOP':>6s}"
    )
    child_argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [sys.executable, str(Path(__file__).resolve()), *child_argv, "--child", backend]
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith(_JSON_MARK)]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"xla_cost: the {backend} child failed (exit {done.returncode}); see its stderr above")
        for key, c in json.loads(lines[-1][len(_JSON_MARK) :]).items():
            mode, variant = key.split("|") if "|" in key else ("jax jit", key)
            name = {"xla": "tf xla", "graph": "tf.function"}.get(mode, mode)
            mb = f"{c['bytes_accessed'] / 1e6:12.1f}" if "bytes_accessed" in c else f"{'-':>12s}"
            gflop = f"{c['flops'] / 1e9:6.3f}" if "flops" in c else f"{'-':>6s}"
            branch = f"{c['branch_reads']}/{c['branch_writes']}" if c["conditionals"] else "-"
            print(
                f"{name:11s} {variant:8s} {c['fusions']:7d} {c['reads']:6d} {c['writes']:6d} "
                f"{c['reads'] + c['writes']:6d} {branch:>15s} {mb} {gflop}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
