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

``--workload lenet``: the whole LeNet-BN training step of ``bench_modes``' ``lenet`` workload (``train_on_batch``
with ``jit_compile=True``, batch ``--batch``, SGD with momentum), the very function Keras runs, for TensorFlow
(``tf.function(jit_compile=True)``) and JAX (``jax.jit``). Per variant, from the optimized program
(:func:`program`): kernels launched at the top level, conditionals (and the bytes inside their branches), while
loops, custom calls, host transfers, reductions run by YNNPACK vs by XLA's own loops (a tree of ``reduce-window``
then ``reduce``: XLA:CPU hands a reduction to YNNPACK unless its operand is a multiply, among others,
``xla/backends/cpu/ynn_support.cc``, ``IsReduceOpOffloadedToYnn``), bytes read and written by the top-level
kernels, and XLA's own ``HloCostAnalysis`` (bytes accessed, flops; both branches of a conditional counted; for
TensorFlow's program through JAX's copy of XLA, where JAX is installed). TensorFlow also says how the step is
dispatched, counted in a profile of a few ``train_on_batch`` calls: compiled programs run, and host-side ops
around them (Keras' metric resets, input conversion) per step.

    python bench/xla_cost.py                       # both backends, the bench_modes shape
    python bench/xla_cost.py --backends jax --shape 64,24,24,6
    python bench/xla_cost.py --workload lenet      # the whole LeNet-BN train step, TF XLA and JAX
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from export.machine import describe_machine

BACKENDS = ("tensorflow", "jax")
WORKLOADS = ("layer", "lenet")
_JSON_MARK = "XLA_COST_JSON "
# a tuple shape (a multi-output fusion, a conditional) is parenthesized and may hold spaces and /*index=N*/ comments
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>\([^()]*\)|\S+?)(?:\{[^}]*\})? (?P<op>[\w\-]+)"
    r"\((?P<args>[^)]*)\)"
)
#: HLO ops that launch nothing (aliases, constants, tuple plumbing)
_FREE_HLO = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
#: HLO ops that move data between the host and the compiled program
_HOST_HLO = {"send", "send-done", "recv", "recv-done", "infeed", "outfeed"}
_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4}
_ELEMENT_BYTES |= {"f64": 8, "s64": 8, "u64": 8}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="64,56,56,64", help="N,H,W,C of the layer step's batch")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    parser.add_argument("--workload", choices=WORKLOADS, default="layer", help="the layer step, or LeNet-BN's step")
    parser.add_argument("--batch", type=int, default=64, help="LeNet-BN batch size (--workload lenet)")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be positive")
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
    """Top-level kernels and x-sized reads/writes of the entry computation, and of conditional branches.

    Every instruction that launches work is a kernel (a fusion, a bare ``reduce-window`` or ``multiply`` alike), and
    an operand or result is x-sized when it holds as many bytes as ``big_shape``, whatever its shape: a layer may
    view the batch as (rows, C), and XLA keeps that shape. ``windows``: the window of each top-level
    ``reduce-window`` over an x-sized operand (the first level of XLA:CPU's tree for a sum it does not hand to
    YNNPACK), e.g. ``32x32x32x1`` for a sum over a 4-D batch's leading axes and ``32x1`` over (rows, C): equal passes,
    several times apart in time (README, "Benchmarks").
    """
    computations = _computations(hlo)
    big_bytes = _shape_bytes(big_shape)

    def count(lines: list[str]) -> tuple[int, int, int, list[str], list[str]]:
        shapes, fusions, reads, writes, branches, windows = {}, 0, 0, 0, [], []
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
            if op in _FREE_HLO:
                continue
            fusions += 1
            args = re.sub(r"/\*.*?\*/", "", match["args"])
            operands = {a.strip().lstrip("%") for a in args.split(",")}
            x_sized = sum(_shape_bytes(shapes.get(a, "")) == big_bytes for a in operands)
            reads += x_sized
            writes += sum(_shape_bytes(array) == big_bytes for array in _arrays(match["shape"]))  # a tuple's each
            window = _window(op, line, computations)
            if x_sized and window:
                windows.append(window)
        return fusions, reads, writes, branches, windows

    fusions, reads, writes, branches, windows = count(computations.get("ENTRY", []))
    branch_reads = branch_writes = 0
    for branch in set(b for b in branches if "computation" not in b or b in computations):
        _, r, w, _, _ = count(computations.get(branch, []))
        branch_reads, branch_writes = branch_reads + r, branch_writes + w
    return {
        "fusions": fusions,
        "reads": reads,
        "writes": writes,
        "conditionals": len(branches) // 2,
        "branch_reads": branch_reads,
        "branch_writes": branch_writes,
        "windows": sorted(windows),
    }


def _window(op: str, line: str, computations: dict[str, list[str]]) -> str | None:
    """The window size of a ``reduce-window`` kernel, bare or the root of the fusion it calls (``32x32x32x1``)."""
    if op == "fusion":
        op, line = _root(computations.get(_called(line) or "", [])) or ("", "")
    found = re.search(r"window=\{size=([\dx]+)", line) if op == "reduce-window" else None
    return found.group(1) if found else None


def _arrays(shape: str) -> list[str]:
    """The arrays of an HLO shape: itself, or each element of a tuple (a multi-output fusion's results)."""
    return re.findall(r"\w+\[[\d,]*\]", shape)


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape: an array (``f32[64,120]``) or a tuple of arrays."""
    return sum(
        _ELEMENT_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape)
    )


def _root(lines: list[str]) -> tuple[str, str] | None:
    """``(op, line)`` of a computation's ROOT instruction."""
    for line in lines:
        if line.lstrip().startswith("ROOT "):
            match = _INSTRUCTION.match(line)
            return (match["op"], line) if match else None
    return None


def _called(line: str, key: str = "calls") -> str | None:
    found = re.search(rf"{key}=%([\w.\-]+)", line)
    return found.group(1) if found else None


def program(hlo: str) -> dict:
    """What a whole compiled program runs, from XLA's optimized HLO (module docstring, ``--workload lenet``).

    ``kernels`` and ``bytes``: the entry computation's instructions that launch work, and the bytes each reads and
    writes (operands + results: what it moves when nothing stays in cache between kernels); a conditional counts
    its predicate and result, the kernels inside its branches are ``branch_kernels`` / ``branch_bytes`` (run only
    when taken). ``conditionals``, ``while_loops``, ``custom_calls``, ``host_transfers`` and the reductions count
    top-level instructions: ``ynn_reductions`` are handed to YNNPACK, ``loop_reductions`` are sums XLA:CPU runs in
    its own loops as a ``reduce-window`` tree (a kernel per level, then a small final ``reduce``; counted once).
    """
    computations = _computations(hlo)
    found = Counter()
    tree_levels = set()  # the entry's reduce-window sums, by name

    def root_of(name: str | None) -> tuple[str, str]:
        found_root = _root(computations.get(name, [])) if name else None
        return found_root or ("", "")

    def walk(name: str, prefix: str = "") -> None:
        shapes = {}
        for line in computations.get(name, []):
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            shapes[match["name"]] = match["shape"]
            op = match["op"]
            if op in _FREE_HLO:
                continue
            operands = re.findall(r"%([\w.\-]+)", re.sub(r"/\*.*?\*/", "", match["args"]))
            if op == "conditional":  # passes its operands by reference: what it moves is its branches'
                operands = operands[:1]
            found[prefix + "kernels"] += 1
            found[prefix + "bytes"] += _shape_bytes(match["shape"]) + sum(
                _shape_bytes(shapes.get(a, "")) for a in operands
            )
            if op == "conditional":
                found[prefix + "conditionals"] += 1
                branches = re.findall(r"(?:true_computation|false_computation)=%([\w.\-]+)", line)
                listed = re.search(r"branch_computations=\{([^}]*)\}", line)
                branches += re.findall(r"%([\w.\-]+)", listed.group(1)) if listed else []
                for branch in branches:
                    walk(branch, "branch_")
                continue
            if prefix:  # inside a branch only the work is counted
                continue
            root_op, root_line = root_of(_called(line))
            if op == "while":
                found["while_loops"] += 1
            elif op == "custom-call":
                found["custom_calls"] += 1
            elif op in _HOST_HLO:
                found["host_transfers"] += 1
            elif root_op == "reduce" and "__ynn_fusion" in line:
                found["ynn_reductions"] += 1
            elif root_op == "reduce-window" and root_of(_called(root_line, "to_apply"))[0] == "add":
                # a sum (max pooling is a reduce-window too, of max); a window over another window's partial sums is
                # a further level of the same sum's tree, not another sum
                tree_levels.add(match["name"])
                found["loop_reductions"] += not tree_levels.intersection(operands)

    walk("ENTRY")
    keys = ("kernels", "bytes", "conditionals", "branch_kernels", "branch_bytes", "while_loops", "custom_calls")
    return {key: found[key] for key in (*keys, "host_transfers", "ynn_reductions", "loop_reductions")}


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
        result[variant] = passes(compiled.as_text(), _hlo_shape(shape)) | _cost_fields(compiled.cost_analysis())
    return result


def _lenet_data(args):
    """bench_modes' LeNet batch (the same seeded images and labels, NHWC) and its model builder."""
    from bench_modes import _inputs, _keras_lenet  # bench/bench_modes.py (bench/ is on sys.path: the script's dir)

    _, _, images, labels, _ = _inputs(args.shape, args.batch)
    return images, labels, _keras_lenet


def _compiled_train_step(model):
    """The ``tf.function(jit_compile=True)`` that Keras' ``train_on_batch`` calls: ``one_step_on_data``, which
    ``train_function`` holds wrapped by ``_autoconvert_optionals`` (keras/src/backend/tensorflow/trainer.py,
    ``_make_function``)."""
    for cell in model.train_function.__closure__ or ():
        wrapped = getattr(cell.cell_contents, "__wrapped__", None)
        if hasattr(wrapped, "experimental_get_compiler_ir"):
            return wrapped
    raise SystemExit("xla_cost: Keras' train_function no longer wraps one compiled one_step_on_data; update this tool")


def _xla_cost_analysis(hlo: str) -> dict:
    """XLA's ``HloCostAnalysis`` of an optimized HLO module's text (TensorFlow's), run by JAX's copy of XLA:CPU;
    empty where JAX is not installed."""
    try:
        import jax
        from jax._src.lib import xla_client
    except ImportError:
        return {}
    module = xla_client.hlo.hlo_module_from_text(hlo)
    return _cost_fields(xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))


def _cost_fields(cost) -> dict:
    """XLA's ``HloCostAnalysis`` (a dict, or JAX's one-element list of it) as recorded here: bytes accessed, flops."""
    cost = cost[0] if isinstance(cost, list) else cost
    return {"bytes_accessed": float(cost.get("bytes accessed", 0.0)), "flops": float(cost.get("flops", 0.0))}


def _tf_dispatch(model, images, labels, steps: int = 5) -> dict:
    """Per ``train_on_batch`` call, counted in a TensorFlow profile of ``steps`` calls: compiled XLA programs run,
    and the host-side TF ops executed around them (by type)."""
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            model.train_on_batch(images, labels)
        tf.profiler.experimental.stop()
        (trace,) = Path(logdir).rglob("*.xplane.pb")
        space = xplane_pb2.XSpace.FromString(trace.read_bytes())
    events = Counter(
        plane.event_metadata[event.metadata_id].name
        for plane in space.planes
        for line in plane.lines
        for event in line.events
    )
    ops = Counter()
    for name, count in events.items():
        if name.startswith("EagerLocalExecute: ") and not name.startswith("EagerLocalExecute: __inference_"):
            ops[name.removeprefix("EagerLocalExecute: ")] += count
    return {
        "xla_programs": events["CpuExecutable::ExecuteAsyncOnStream"] / steps,
        "host_ops": {name: count / steps for name, count in sorted(ops.items())},
    }


def _tensorflow_lenet_child(args) -> dict:
    import tensorflow as tf

    images, labels, build = _lenet_data(args)
    result = {}
    for variant in ("keras", "ours"):
        model = build(variant, True)
        model.train_on_batch(images, labels)  # builds the model and Keras' train function
        data = (tf.constant(images), tf.constant(labels), None)
        hlo = _compiled_train_step(model).experimental_get_compiler_ir(data)(stage="optimized_hlo")
        result[f"xla|{variant}"] = program(hlo) | _xla_cost_analysis(hlo) | _tf_dispatch(model, images, labels)
    return result


def _jax_lenet_child(args) -> dict:
    import jax

    images, labels, build = _lenet_data(args)
    result = {}
    for variant in ("keras", "ours"):
        model = build(variant, True)
        model.train_on_batch(images, labels)  # builds the model, its optimizer and metrics
        # the state and the jit train_on_batch runs (keras/src/backend/jax/trainer.py: _get_jax_state,
        # make_train_function)
        owners = (model.trainable_variables, model.non_trainable_variables, model.optimizer.variables)
        state = tuple([v.value for v in variables] for variables in (*owners, model.metrics_variables))
        lowered = jax.jit(model.train_step, donate_argnums=0).lower(state, (images, labels, None))
        compiled = lowered.compile()
        result[variant] = program(compiled.as_text()) | _cost_fields(compiled.cost_analysis())
    return result


def _hlo_shape(shape) -> str:
    return "f32[" + ",".join(map(str, shape)) + "]"


def _cost_analysis_columns(c: dict, mb_width: int, mb_decimals: int) -> tuple[str, str]:
    """XLA's cost analysis as printed: MB accessed and GFLOP, or "-" where the backend gave none."""
    mb = f"{c['bytes_accessed'] / 1e6:{mb_width}.{mb_decimals}f}" if "bytes_accessed" in c else "-".rjust(mb_width)
    gflop = f"{c['flops'] / 1e9:6.3f}" if "flops" in c else "-".rjust(6)
    return mb, gflop


def _print_lenet(mode: str, variant: str, c: dict) -> None:
    mb, gflop = _cost_analysis_columns(c, mb_width=9, mb_decimals=2)
    branch = f"{c['branch_kernels']}/{c['branch_bytes'] / 1e6:.2f}" if c["conditionals"] else "-"
    print(
        f"{mode:8s} {variant:7s} {c['kernels']:7d} {c['bytes'] / 1e6:9.2f} {c['conditionals']:4d} {branch:>12s} "
        f"{c['while_loops']:5d} {c['custom_calls']:6d} {c['host_transfers']:4d} "
        f"{c['ynn_reductions']:>4d}/{c['loop_reductions']:<4d} {mb} {gflop}"
    )


def _print_lenet_dispatch(variant: str, c: dict) -> None:
    ops = ", ".join(f"{name} {count:g}" for name, count in c["host_ops"].items()) or "none"
    print(f"  tf xla {variant:7s} per train_on_batch: {c['xla_programs']:g} XLA program(s); host-side TF ops: {ops}")


def _windows_column(windows: list[str]) -> str:
    """``32x32x32x1 (2)`` for two reduce-windows with that window; ``-`` for none."""
    return ", ".join(f"{w} ({n})" for w, n in sorted(Counter(windows).items())) or "-"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        children = {
            "layer": {"tensorflow": _tensorflow_child, "jax": _jax_child},
            "lenet": {"tensorflow": _tensorflow_lenet_child, "jax": _jax_lenet_child},
        }
        build = children[args.workload][args.child]
        print(_JSON_MARK + json.dumps(build(args.shape if args.workload == "layer" else args)), flush=True)
        return 0
    print(f"machine: {describe_machine()} (the compiled program depends on XLA's version and CPU target)")
    if args.workload == "lenet":
        print(
            f"LeNet-BN training step (train_on_batch, jit_compile=True), batch {args.batch}, SGD momentum 0.9; "
            "the whole program, top-level kernels"
        )
        print(
            f"{'mode':8s} {'variant':7s} {'kernels':>7s} {'MB r+w':>9s} {'cond':>4s} {'in branches':>12s} "
            f"{'while':>5s} {'custom':>6s} {'host':>4s} {'ynn/loop sums':>13s} {'XLA MB':>9s} {'GFLOP':>6s}"
        )
    else:
        shape = "x".join(map(str, args.shape))
        print(
            f"layer step {shape} float32, fwd+bwd+update; one x-sized pass = {4 * math.prod(args.shape) / 1e6:.1f} MB"
        )
        print(
            f"{'mode':11s} {'variant':8s} {'kernels':>7s} {'reads':>6s} {'writes':>6s} {'passes':>6s}"
            f" {'in branches r/w':>15s} {'XLA bytes MB':>12s} {'GFLOP':>6s}  x-sized reduce-window"
        )
    child_argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    dispatch = []
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
            if args.workload == "lenet":
                _print_lenet(name, variant, c)
                if "xla_programs" in c:
                    dispatch.append((variant, c))
                continue
            mb, gflop = _cost_analysis_columns(c, mb_width=12, mb_decimals=1)
            branch = f"{c['branch_reads']}/{c['branch_writes']}" if c["conditionals"] else "-"
            print(
                f"{name:11s} {variant:8s} {c['fusions']:7d} {c['reads']:6d} {c['writes']:6d} "
                f"{c['reads'] + c['writes']:6d} {branch:>15s} {mb} {gflop}  {_windows_column(c.get('windows', []))}"
            )
    if args.workload == "lenet":
        print(
            "MB r+w: bytes the top-level kernels read and write; in branches: kernels/MB inside conditionals (run only "
            "when taken); ynn/loop sums: reductions run by YNNPACK / by XLA's reduce-window loops; XLA MB, GFLOP: "
            "XLA's HloCostAnalysis (both branches counted)"
        )
        for variant, c in dispatch:
            _print_lenet_dispatch(variant, c)
    return 0


if __name__ == "__main__":
    sys.exit(main())
