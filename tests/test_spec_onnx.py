"""ONNX as an independent source: its own conformance cases and its reference evaluator.

- The four ``test_batchnorm_*`` node cases (the ones ``onnx.backend.test.loader.load_node_model_tests()``
  returns; we import only their module, which registers exactly those, instead of all ~1500 ops).
- The five ``pytorch-converted/test_BatchNorm*`` models (opset 6, is_test=1) with their .pb data.
- ``onnx.reference.ReferenceEvaluator`` on BatchNormalization-15 models, training_mode 0 and 1,
  over the golden vectors and random cases.

``pytest -s`` prints the largest errors seen against each source.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from _peer_errors import PeerErrors
from numerics import Tolerance
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import spec
from spec.vectors import load_case

ONNX_DATA = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"
VECTOR_DIR = Path(spec.__file__).resolve().parent / "vectors"
MANIFEST = json.loads((VECTOR_DIR / "manifest.json").read_text())

PEERS = PeerErrors()  # its largest errors are printed after the module (conftest.py)
agree = PEERS.agree


# ---------------------------------------------------------------- ONNX node conformance cases


def _node_cases() -> dict:
    import onnx.backend.test.case.node.batch_normalization  # noqa: F401  (registers its cases on import)
    from onnx.backend.test.case.node import _NodeTestCases

    return {c.name: c for c in _NodeTestCases if c.name.startswith("test_batchnorm")}


NODE_CASES = _node_cases()


def test_all_four_onnx_batchnorm_node_cases_are_here():
    assert sorted(NODE_CASES) == [
        "test_batchnorm_epsilon",
        "test_batchnorm_epsilon_training_mode",
        "test_batchnorm_example",
        "test_batchnorm_example_training_mode",
    ]


@pytest.mark.slow  # imports all ~1500 ONNX node cases (~10 s) to prove the shortcut above loses nothing
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # other operators' cases overflow on purpose (Cast, Log)
def test_node_cases_are_those_of_load_node_model_tests():
    from onnx.backend.test.loader import load_node_model_tests

    full = {c.name: c for c in load_node_model_tests() if c.name.startswith("test_batchnorm")}
    assert sorted(full) == sorted(NODE_CASES)
    for name, case in full.items():
        for got, want in zip(
            case.data_sets[0][0] + case.data_sets[0][1],
            NODE_CASES[name].data_sets[0][0] + NODE_CASES[name].data_sets[0][1],
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)


def _attributes(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("name", sorted(NODE_CASES))
def test_onnx_node_case_through_spec(name):
    case = NODE_CASES[name]
    (node,) = case.model.graph.node
    assert case.model.opset_import[0].version == 15
    attrs = _attributes(node)
    eps = float(attrs.get("epsilon", 1e-5))  # the operator's documented defaults
    momentum = float(attrs.get("momentum", 0.9))
    ((inputs, outputs),) = case.data_sets
    x, scale, bias, mean, var = inputs
    # ONNX computed these expectations in float32 NumPy; |y| <= ~6 here, so a few float32 ulps
    # (1.2e-7 relative) of the intermediates bound the difference: 1e-5 relative + 1e-6 absolute.
    # ONNX's own declared tolerance for these cases is looser (rtol 1e-3, atol 1e-7).
    tol = Tolerance(1e-5, 1e-6, "ONNX's float32 NumPy expectations, |y| <= ~6: a few float32 ulps")
    if attrs.get("training_mode", 0):
        y, batch_mean, batch_var = spec.batch_norm_train(x, scale, bias, axis=1, eps=eps)
        count = x.size // x.shape[1]
        new_mean, new_var = spec.update_running_stats(
            mean, var, batch_mean, batch_var, count, convention="onnx", momentum=momentum
        )
        want_y, want_mean, want_var = outputs
        agree("onnx node cases", y, want_y, tol, what=f"{name}: Y")
        agree("onnx node cases", new_mean, want_mean, tol, what=f"{name}: running_mean")
        agree("onnx node cases", new_var, want_var, tol, what=f"{name}: running_var")
    else:
        (want_y,) = outputs
        y = spec.batch_norm_infer(x, scale, bias, mean, var, axis=1, eps=eps)
        agree("onnx node cases", y, want_y, tol, what=f"{name}: Y")
    assert y.dtype == want_y.dtype == np.float32


# ---------------------------------------------------------------- pytorch-converted models

PYTORCH_CONVERTED = sorted(p.name for p in (ONNX_DATA / "pytorch-converted").glob("test_BatchNorm*"))


def test_all_five_pytorch_converted_batchnorm_cases_are_here():
    assert PYTORCH_CONVERTED == [
        "test_BatchNorm1d_3d_input_eval",
        "test_BatchNorm2d_eval",
        "test_BatchNorm2d_momentum_eval",
        "test_BatchNorm3d_eval",
        "test_BatchNorm3d_momentum_eval",
    ]


def _read_pb(path: Path) -> np.ndarray:
    tensor = TensorProto()
    tensor.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(tensor)


@pytest.mark.parametrize("name", PYTORCH_CONVERTED)
def test_pytorch_converted_case_through_spec(name):
    folder = ONNX_DATA / "pytorch-converted" / name
    model = onnx.load(str(folder / "model.onnx"))
    (node,) = model.graph.node
    attrs = _attributes(node)
    assert node.op_type == "BatchNormalization" and attrs["is_test"] == 1  # inference BN
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    scale, bias, mean, var = (weights[n] for n in node.input[1:])
    data_sets = sorted(folder.glob("test_data_set_*"))
    assert data_sets
    for data in data_sets:
        x, want = _read_pb(data / "input_0.pb"), _read_pb(data / "output_0.pb")
        y = spec.batch_norm_infer(x, scale, bias, mean, var, axis=1, eps=float(attrs["epsilon"]))
        # PyTorch produced these in float32; |y| is O(1), so 1e-5 relative + 1e-6 absolute is a
        # few float32 ulps of slack (the epsilon attribute is the float32 PyTorch wrote).
        agree("onnx pytorch-converted", y, want, rtol=1e-5, atol=1e-6, what=f"{name}/{data.name}")


# ---------------------------------------------------------------- onnx.reference.ReferenceEvaluator

_ONNX_TYPE = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}


def _evaluator(
    x_dtype: str, p_dtype: str, rank: int, *, training: bool, eps: float, momentum: float
) -> ReferenceEvaluator:
    """A single BatchNormalization-15 node (T for X/Y, T1 for scale/B, T2 for the statistics)."""
    t, t1 = _ONNX_TYPE[x_dtype], _ONNX_TYPE[p_dtype]
    dims = ["N", "C", *(f"D{k}" for k in range(rank - 2))]
    inputs = [helper.make_tensor_value_info("X", t, dims)]
    inputs += [helper.make_tensor_value_info(n, t1, ["C"]) for n in ("scale", "B", "input_mean", "input_var")]
    outputs = [helper.make_tensor_value_info("Y", t, dims)]
    if training:
        outputs += [helper.make_tensor_value_info(n, t1, ["C"]) for n in ("running_mean", "running_var")]
    node = helper.make_node(
        "BatchNormalization",
        ["X", "scale", "B", "input_mean", "input_var"],
        [o.name for o in outputs],
        epsilon=eps,
        momentum=momentum,
        training_mode=int(training),
    )
    graph = helper.make_graph([node], "bn", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    return ReferenceEvaluator(model)


def _run(ev: ReferenceEvaluator, x, scale, bias, mean, var, axis: int):
    """ONNX's channel axis is 1: move ours there and back."""
    p = scale.dtype
    outs = ev.run(None, {"X": np.moveaxis(x, axis, 1), "scale": scale, "B": bias,
                         "input_mean": np.asarray(mean, p), "input_var": np.asarray(var, p)})  # fmt: skip
    return [np.moveaxis(outs[0], 1, axis), *outs[1:]]


def f32(value: float) -> float:
    """ONNX float attributes (epsilon, momentum) are float32: the value the runtime really uses."""
    return float(np.float32(value))


def _y_tolerance(dtype: str) -> dict:
    # ReferenceEvaluator computes in the input precision (float16 promoted to float32 by NumPy
    # mixing with float32 parameters, then rounded back). |y| <= ~8 in the vectors:
    #   float64: the epsilon attribute is float32 (1e-5 is stored as 1e-5 - 2.5e-13, 1e-3 as
    #            1e-3 + 4.7e-11), which moves y by <= |y| * d_eps / (2 (var + eps)) ~ 1e-10 relative
    #            for var >= 0.25; 1e-9 relative leaves room for reordered float64 sums;
    #   float32: ~10 ulps at |y| ~ 8 -> 1e-5 relative + 2e-6 absolute;
    #   float16: one float16 ulp at |y| in [4, 8) is 2^-8 ~ 3.9e-3 and rounding may differ by one ulp.
    return {"float64": {"rtol": 1e-9, "atol": 1e-9}, "float32": {"rtol": 1e-5, "atol": 2e-6}}.get(
        dtype, {"rtol": 2e-3, "atol": 4e-3}
    )


def _vectors(function: str, exclude: tuple[str, ...] = ()) -> list[str]:
    return [e["name"] for e in MANIFEST["cases"] if e["function"] == function and e["name"] not in exclude]


# The float32 large-offset vector is checked separately: ONNX's float32 mean is off by up to an
# ulp of 1e4 (~1e-3), which is 0.1 standard deviations of that data.
@pytest.mark.parametrize("name", _vectors("batch_norm_train", exclude=("train_nc_float32_large_offset",)))
def test_reference_evaluator_training_mode_on_vectors(name):
    case = load_case(VECTOR_DIR / f"{name}.json")
    a, i, o = case["attributes"], case["inputs"], case["outputs"]
    c = i["gamma"].shape[0]
    running_mean, running_var = np.linspace(-1, 1, c), np.linspace(0.5, 2, c)
    ev = _evaluator(i["x"].dtype.name, i["gamma"].dtype.name, i["x"].ndim, training=True, eps=a["eps"], momentum=0.9)
    y, new_mean, new_var = _run(ev, i["x"], i["gamma"], i["beta"], running_mean, running_var, a["axis"])
    agree("onnx.reference", y, o["y"], **_y_tolerance(i["x"].dtype.name), what=f"{name}: Y")
    count = i["x"].size // c
    want_mean, want_var = spec.update_running_stats(
        running_mean, running_var, o["mean"], o["var"], count, convention="onnx", momentum=f32(0.9)
    )
    # Running stats come back in the parameter dtype: float64 -> 1e-12 (reordered sums; the momentum
    # is the float32 attribute on both sides); float32 -> ~10 ulps of values O(1).
    tol = {"rtol": 1e-12, "atol": 1e-12} if i["gamma"].dtype == np.float64 else {"rtol": 1e-5, "atol": 1e-6}
    if i["x"].dtype == np.float16:  # the float16 mean itself is accumulated in float32 then rounded to float16
        tol = {"rtol": 2e-3, "atol": 2e-3}
    agree("onnx.reference", new_mean, want_mean, **tol, what=f"{name}: running_mean")
    agree("onnx.reference", new_var, want_var, **tol, what=f"{name}: running_var")


@pytest.mark.parametrize("name", _vectors("batch_norm_infer"))
def test_reference_evaluator_inference_mode_on_vectors(name):
    case = load_case(VECTOR_DIR / f"{name}.json")
    a, i, o = case["attributes"], case["inputs"], case["outputs"]
    ev = _evaluator(i["x"].dtype.name, i["gamma"].dtype.name, i["x"].ndim, training=False, eps=a["eps"], momentum=0.9)
    (y,) = _run(ev, i["x"], i["gamma"], i["beta"], i["mean"], i["var"], a["axis"])
    agree("onnx.reference", y, o["y"], **_y_tolerance(i["x"].dtype.name), what=f"{name}: Y")


def test_reference_evaluator_onnx_sequence_vector():
    """Three training steps feeding running stats back in, then inference: the onnx convention."""
    case = load_case(VECTOR_DIR / "sequence_onnx_0.9.json")
    a, i, o = case["attributes"], case["inputs"], case["outputs"]
    train = _evaluator("float32", "float32", 4, training=True, eps=a["eps"], momentum=a["momentum"])
    infer = _evaluator("float32", "float32", 4, training=False, eps=a["eps"], momentum=a["momentum"])
    rm, rv = i["running_mean"], i["running_var"]
    # float32 end to end in ONNX; values O(1): 1e-5 relative + 2e-6 absolute is ~10 float32 ulps.
    tol = Tolerance(1e-5, 2e-6, "float32 ONNX steps of O(1) values: ~10 float32 ulps")
    for k, x in enumerate(i["x"]):
        y, rm, rv = _run(train, x, i["gamma"], i["beta"], rm, rv, a["axis"])
        agree("onnx.reference", y, o["y"][k], tol, what=f"step {k}: Y")
        agree("onnx.reference", rm, o["running_mean"][k], tol, what=f"step {k}: running_mean")
        agree("onnx.reference", rv, o["running_var"][k], tol, what=f"step {k}: running_var")
    (y_eval,) = _run(infer, i["x_eval"], i["gamma"], i["beta"], rm, rv, a["axis"])
    agree("onnx.reference", y_eval, o["y_eval"], tol, what="inference after 3 steps")


def test_reference_evaluator_large_offset_float32():
    case = load_case(VECTOR_DIR / "train_nc_float32_large_offset.json")
    i, o = case["inputs"], case["outputs"]
    ev = _evaluator("float32", "float32", 2, training=True, eps=1e-5, momentum=0.9)
    y, _, new_var = _run(ev, i["x"], i["gamma"], i["beta"], np.zeros(2), np.zeros(2), 1)
    # ONNX's float32 mean of values ~1e4 can be off by ~ulp(1e4) = 9.8e-4 (its x.var() is then
    # consistent with that mean); divided by sigma ~1e-2 that shifts x_hat by up to ~0.1, times gamma <= 1.5.
    agree("onnx.reference (large offset, float32 mean)", y, o["y"], rtol=0, atol=0.15, what="Y")
    # Its variance is two-pass (x.var()) but around that float32 mean: a mean error d adds d^2, and
    # d ~ ulp(1e4) = 9.8e-4 gives d^2 / var ~ 1e-2. (Measured: 1.4e-3, just outside SPEC.md 8.2's
    # 1e-3; the naive E[x^2] - E[x]^2 would be off by 1e4 or more.) With input_var = 0 the output
    # is (1 - 0.9f) * var, and 1 - 0.9f = 0.100000024 in float32.
    var = new_var / (1 - np.float32(0.9))
    agree(
        "onnx.reference (large offset, float32 variance)",
        var,
        o["var"],
        rtol=1e-2,
        atol=0,
        what="variance",
        rel_floor=0,
    )


@pytest.mark.xfail(
    strict=True,
    reason="onnx 1.23 reference: x.mean(axis) and x.var(axis) in float32 "
    "(onnx/reference/ops/op_batch_normalization.py:39-40), 1.4e-3 off on this vector",
)
def test_reference_evaluator_large_offset_variance_within_1em3():
    """SPEC.md §8.2: the training variance at x = 1e4 + 1e-2 N(0, 1) within 1e-3 relative of float64."""
    case = load_case(VECTOR_DIR / "train_nc_float32_large_offset.json")
    i, o = case["inputs"], case["outputs"]
    ev = _evaluator("float32", "float32", 2, training=True, eps=1e-5, momentum=0.9)
    _, _, new_var = _run(ev, i["x"], i["gamma"], i["beta"], np.zeros(2), np.zeros(2), 1)
    var = new_var / (1 - np.float32(0.9))  # input_var = 0: the output is (1 - 0.9f) * var
    rel = np.abs(var / o["var"] - 1.0)
    assert rel.max() <= 1e-3, f"relative error {rel.max():.3g}"


@pytest.mark.parametrize(
    ("shape", "dtype", "momentum", "eps"),
    [
        ((7, 4), "float64", 0.9, 1e-5),
        ((3, 2, 9), "float32", 0.5, 1e-3),
        ((2, 3, 5, 4), "float32", 0.99, 1e-5),
        ((2, 2, 3, 3, 3), "float64", 0.1, 1e-2),
    ],
    ids=["nc-float64", "ncl-float32", "nchw-float32", "ncdhw-float64"],
)
def test_reference_evaluator_random_training_steps(shape, dtype, momentum, eps):
    rng = np.random.default_rng(sum(shape))
    c = shape[1]
    gamma, beta = rng.uniform(0.5, 1.5, c).astype(dtype), rng.normal(size=c).astype(dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    train = _evaluator(dtype, dtype, len(shape), training=True, eps=eps, momentum=momentum)
    sm, sv = rm.astype(np.float64), rv.astype(np.float64)
    # float64: the spec gets ONNX's float32 epsilon/momentum, so y differs only by reordered sums (1e-12);
    # float32: ~10 ulps of O(1) values.
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == "float64" else {"rtol": 1e-5, "atol": 2e-6}
    # The evaluator also forms (1 - momentum) in float32 (1 - 0.1f = 0.9f, off by 1.5e-9 from the
    # float64 difference), i.e. <= 6e-8 relative on that weight: 1e-7 relative for running stats.
    stat_tol = tol if dtype != "float64" else {"rtol": 1e-7, "atol": 1e-9}
    for step in range(4):
        x = (rng.normal(size=shape) * 2.0 + step).astype(dtype)
        y, rm, rv = _run(train, x, gamma, beta, rm, rv, 1)
        want_y, m, v = spec.batch_norm_train(x, gamma, beta, axis=1, eps=f32(eps))
        sm, sv = spec.update_running_stats(sm, sv, m, v, x.size // c, convention="onnx", momentum=f32(momentum))
        agree("onnx.reference", y, want_y, **tol, what=f"step {step}: Y")
        agree("onnx.reference", rm, sm, **stat_tol, what=f"step {step}: running_mean")
        agree("onnx.reference", rv, sv, **stat_tol, what=f"step {step}: running_var")
