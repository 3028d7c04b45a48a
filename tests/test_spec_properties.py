"""Properties of the spec that hold for every shape, axis and value (hypothesis), and its numerics.

Each property is an identity derived in SPEC.md, checked against an independent computation
(finite differences, plain NumPy on a concatenation, a direct simulation of Caffe's blobs,
correctly rounded sums), never against the spec itself.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from cases import case_id, momentum_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numerics import Tolerance, close

import spec

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw, max_rank: int = 5, max_side: int = 4):
    """(x float64, axis): random rank 2..5, any channel axis, >= 2 values per channel."""
    rank = draw(st.integers(2, max_rank))
    shape = draw(st.lists(st.integers(1, max_side), min_size=rank, max_size=rank))
    axis = draw(st.integers(-rank, rank - 1))
    others = [s for k, s in enumerate(shape) if k != axis % rank]
    if math.prod(others) < 2:
        shape[(axis + 1) % rank if rank > 1 else 0] = 2  # a non-channel axis of length 2
    seed = draw(st.integers(0, 2**32 - 1))
    offset = draw(st.sampled_from([0.0, 3.0, -50.0, 1e3]))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    x = offset + scale * np.random.default_rng(seed).normal(size=shape)
    return x, axis


def _params(x: np.ndarray, axis: int, seed: int = 0):
    c = x.shape[axis]
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, c), rng.normal(size=c)


def _stats_axes(x, axis):
    return tuple(a for a in range(x.ndim) if a != axis % x.ndim)


@SETTINGS
@given(batches())
def test_training_output_has_beta_mean_and_shrunk_gamma_variance(case):
    """Per channel: mean(y) = beta, var(y) = gamma^2 * var / (var + eps) (SPEC.md, Training forward)."""
    x, axis = case
    gamma, beta = _params(x, axis)
    y, mean, var = spec.batch_norm_train(x, gamma, beta, axis=axis, eps=1e-5)
    axes = _stats_axes(x, axis)
    # float64 sums of <= 256 values of size <= |beta| + |gamma| * sqrt(m): ~1e-13 absolute.
    np.testing.assert_allclose(y.mean(axis=axes), beta, rtol=0, atol=1e-10)
    np.testing.assert_allclose(y.var(axis=axes), gamma**2 * var / (var + 1e-5), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mean, x.mean(axis=axes), rtol=1e-12, atol=1e-12 * np.abs(x).max())


@SETTINGS
@given(batches(), st.floats(0.01, 100.0), st.floats(-1e3, 1e3))
def test_training_forward_is_invariant_to_affine_input_maps(case, a, b):
    """BN(a*x + b) with eps * a^2 equals BN(x) with eps: the statistics absorb the map exactly."""
    x, axis = case
    gamma, beta = _params(x, axis)
    y, _, _ = spec.batch_norm_train(x, gamma, beta, axis=axis, eps=1e-5)
    y2, _, _ = spec.batch_norm_train(a * x + b, gamma, beta, axis=axis, eps=1e-5 * a * a)
    # a*x + b loses ~|b|/(a*std) ulps of the data's information; bounded by ~1e-7 here.
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(batches())
def test_channel_axis_can_be_moved(case):
    """Channels-first and channels-last layouts of the same data give the same numbers."""
    x, axis = case
    gamma, beta = _params(x, axis)
    y, mean, var = spec.batch_norm_train(x, gamma, beta, axis=axis, eps=1e-3)
    moved = np.moveaxis(x, axis, -1)
    y2, mean2, var2 = spec.batch_norm_train(moved, gamma, beta, axis=-1, eps=1e-3)
    # Same values, different reduction order: float64 rounding only.
    np.testing.assert_allclose(np.moveaxis(y2, -1, axis), y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(mean2, mean, rtol=1e-12, atol=1e-12 * np.abs(x).max())
    np.testing.assert_allclose(var2, var, rtol=1e-10, atol=1e-300)


@SETTINGS
@given(batches())
def test_inference_with_batch_statistics_equals_torch_training_output(case):
    """SPEC.md §3 fed the batch's own biased statistics (NumPy's) gives §2's training output, and so
    does the spec's training forward: both against torch.nn.functional.batch_norm(training=True)."""
    torch = pytest.importorskip("torch")
    x, axis = case
    gamma, beta = _params(x, axis)
    axes = _stats_axes(x, axis)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    peer = torch.nn.functional.batch_norm(
        torch.from_numpy(np.moveaxis(x, axis, 1).copy()),
        None,
        None,
        torch.from_numpy(gamma),
        torch.from_numpy(beta),
        training=True,
        eps=1e-5,
    )
    want = np.moveaxis(peer.numpy(), 1, axis)
    # float64 both sides; the two means differ by a few ulp of max|x| (up to 1e3 here), which
    # gamma / sqrt(var + eps) amplifies (var + eps >= 1e-5): 1e-12 of that amplified magnitude.
    gain = float((gamma / np.sqrt(var + 1e-5)).max())
    tol = Tolerance(0.0, 1e-12 * max(1.0, float(np.abs(x).max()) * gain), "float64, mean rounding amplified")
    close(spec.batch_norm_infer(x, gamma, beta, mean, var, axis=axis, eps=1e-5), want, tol, what="infer(batch stats)")
    close(spec.batch_norm_train(x, gamma, beta, axis=axis, eps=1e-5)[0], want, tol, what="train")


@SETTINGS
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=4, min_side=2, max_side=4),
                  elements=st.floats(-1e6, 1e6, allow_subnormal=False)))  # fmt: skip
def test_normalized_values_are_bounded_for_arbitrary_inputs(x):
    """|x_hat| <= sqrt(m - 1) for any data (Samuelson's inequality); finite even for constant channels."""
    y, _, _ = spec.batch_norm_train(x, np.ones(x.shape[1]), np.zeros(x.shape[1]), axis=1, eps=1e-5)
    m = x.size // x.shape[1]
    assert np.isfinite(y).all()
    assert np.abs(y).max() <= math.sqrt(m - 1) * (1 + 1e-9)


@settings(max_examples=25, deadline=None)
@given(batches(max_rank=4, max_side=3), st.sampled_from([1e-5, 1e-3, 0.5]))
def test_backward_matches_central_finite_differences(case, eps):
    """dx, dgamma, dbeta of L = sum(y * dy) against (L(p + h) - L(p - h)) / 2h in float64."""
    x, axis = case
    x = x / np.abs(x).max() if np.abs(x).max() > 10 else x  # keep h relative to the data
    gamma, beta = _params(x, axis, seed=1)
    dy = np.random.default_rng(2).normal(size=x.shape)
    dx, dgamma, dbeta = spec.batch_norm_backward(dy, x, gamma, axis=axis, eps=eps)

    def loss(x_, g_, b_):
        return float(np.sum(spec.batch_norm_train(x_, g_, b_, axis=axis, eps=eps)[0] * dy))

    def numeric(arr, f, h):
        grad = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            grad[idx] = (f(plus) - f(minus)) / (2 * h)
        return grad

    std = float(np.sqrt(spec.moments(x, axis=axis)[2].min() + eps))
    h = 1e-5 * std
    # Central differences: truncation O(h^2 / std^3) and cancellation O(1e-16 * |L| / h); with
    # h = 1e-5 * std both sit near 1e-6 of the gradient scale, sum(|dy|) / std.
    scale = float(np.abs(dy).sum()) / std
    np.testing.assert_allclose(dx, numeric(x, lambda v: loss(v, gamma, beta), h), rtol=0, atol=2e-5 * scale)
    np.testing.assert_allclose(dgamma, numeric(gamma, lambda v: loss(x, v, beta), 1e-5), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dbeta, numeric(beta, lambda v: loss(x, gamma, v), 1e-5), rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    batches(max_rank=4, max_side=3), st.sampled_from([1e-5, 1e-3, 0.5]), st.sampled_from(["x", "gamma", "beta", "all"])
)
def test_jvp_matches_central_finite_differences(case, eps, moved):
    """The tangent dy of (x, gamma, beta) moved along (dx, dgamma, dbeta) against (y(p + h t) - y(p - h t)) / 2h."""
    x, axis = case
    x = x / np.abs(x).max() if np.abs(x).max() > 10 else x  # keep h relative to the data
    gamma, beta = _params(x, axis, seed=1)
    rng = np.random.default_rng(4)
    dx = rng.normal(size=x.shape) if moved in ("x", "all") else np.zeros(x.shape)
    dgamma = rng.normal(size=gamma.shape) if moved in ("gamma", "all") else None
    dbeta = rng.normal(size=beta.shape) if moved in ("beta", "all") else None
    dy = spec.batch_norm_jvp(x, gamma, dx, dgamma, dbeta, axis=axis, eps=eps)

    def y(t: float) -> np.ndarray:
        g = gamma if dgamma is None else gamma + t * dgamma
        b = beta if dbeta is None else beta + t * dbeta
        return spec.batch_norm_train(x + t * dx, g, b, axis=axis, eps=eps)[0]

    std = float(np.sqrt(spec.moments(x, axis=axis)[2].min() + eps))
    h = 1e-5 * std
    # As the backward's test: truncation O(h^2 / std^3), cancellation O(1e-16 * |y| / h), both ~1e-6 of
    # the tangent's scale, |t| / std for x's direction (|t| = O(1..3)) and O(1..3) for gamma's and beta's.
    scale = (float(np.abs(dx).max()) / std) + 3.0
    np.testing.assert_allclose(dy, (y(h) - y(-h)) / (2 * h), rtol=0, atol=2e-5 * scale)


@SETTINGS
@given(batches())
def test_backward_dx_sums_to_zero_per_channel(case):
    """sum_i dx_i = gamma/(m sigma) (m dbeta - m dbeta - dgamma sum_i x_hat_i) = 0 since sum x_hat = 0."""
    x, axis = case
    gamma, _ = _params(x, axis)
    dy = np.random.default_rng(3).normal(size=x.shape)
    dx, _, _ = spec.batch_norm_backward(dy, x, gamma, axis=axis, eps=1e-5)
    sigma = np.sqrt(spec.moments(x, axis=axis)[2].min() + 1e-5)
    scale = np.abs(dy).sum() * gamma.max() / sigma
    # x - mean carries ~ulp(max|x|) absolute error, so sum(x_hat) = 0 only to ~eps * max|x| / sigma:
    # with an offset of 1e3 and sigma ~ 1e-2 that condition number is 1e5.
    condition = 1.0 + np.abs(x).max() / sigma
    atol = 8 * np.finfo(np.float64).eps * scale * condition
    np.testing.assert_allclose(dx.sum(axis=_stats_axes(x, axis)), 0.0, atol=atol)


@SETTINGS
@given(batches(max_rank=3, max_side=6), st.lists(st.integers(0, 100), min_size=1, max_size=5))
def test_merge_moments_of_any_split_equals_moments_of_the_whole(case, cuts):
    """Chan's merge of replica moments = the moments of the concatenated data (empty replicas allowed)."""
    x, axis = case
    x = np.moveaxis(x, axis, 1)  # split along the batch axis 0, channels on 1
    n = x.shape[0]
    bounds = sorted({0, n, *(c % (n + 1) for c in cuts)})
    pieces = [x[a:b] for a, b in itertools.pairwise(bounds)] + [x[:0]]  # always one empty replica
    parts = [spec.moments(p) for p in pieces]
    count, mean, var = spec.merge_moments(parts)
    axes = _stats_axes(x, 1)
    np.testing.assert_array_equal(count, np.full(x.shape[1], x.size // x.shape[1]))
    np.testing.assert_allclose(mean, x.mean(axis=axes), rtol=1e-12, atol=1e-12 * np.abs(x).max())
    # Float64 rounding of a few hundred terms, relative to the variance or to the data's offset.
    np.testing.assert_allclose(var, x.var(axis=axes), rtol=1e-9, atol=1e-12 * np.abs(x).max() ** 2)
    count_r, mean_r, var_r = spec.merge_moments(parts[::-1])  # order does not matter
    np.testing.assert_allclose(mean_r, mean, rtol=1e-12, atol=1e-12 * np.abs(x).max())
    np.testing.assert_allclose(var_r, var, rtol=1e-9, atol=1e-12 * np.abs(x).max() ** 2)


# ---------------------------------------------------------------- conventions

CONVENTIONS = [c.name for c in spec.list_conventions()]


MOMENTUM_CONVERSIONS = [
    (0.99, "keras", "torch", 0.01),
    (0.9, "onnx", "torch", 0.1),
    (0.1, "torch", "keras", 0.9),
    (0.999, "caffe", "torch", 0.001),
    (0.9, "d2l", "onnx", 0.1),
    (0.99, "tf1", "keras", 0.99),
    (0.3, "torch", "d2l", 0.3),
]


@pytest.mark.parametrize(
    ("value", "src", "dst", "expected"),
    MOMENTUM_CONVERSIONS,
    ids=[case_id(convention=f"{src}-to-{dst}", detail=momentum_id(v)) for v, src, dst, _ in MOMENTUM_CONVERSIONS],
)
def test_convert_momentum_known_values(value, src, dst, expected):
    assert spec.convert_momentum(value, src, dst) == pytest.approx(expected, abs=1e-15)  # 1 - 0.99 in binary


@SETTINGS
@given(st.floats(0.0, 1.0), st.sampled_from(CONVENTIONS), st.sampled_from(CONVENTIONS))
def test_convert_momentum_round_trips(value, src, dst):
    back = spec.convert_momentum(spec.convert_momentum(value, src, dst), dst, src)
    assert back == pytest.approx(value, abs=2e-16)  # at most two roundings of 1 - v


@SETTINGS
@given(st.floats(0.0, 1.0), st.sampled_from(["keras", "onnx", "d2l"]), st.sampled_from(["keras", "onnx", "d2l"]))
def test_converted_momentum_gives_the_same_update(value, src, dst):
    """Biased-variance conventions differ only in how momentum is spelled: converting is exact."""
    rng = np.random.default_rng(5)
    args = (rng.normal(size=3), rng.uniform(0.5, 2, 3), rng.normal(size=3), rng.uniform(0.5, 2, 3), 10)
    a = spec.update_running_stats(*args, convention=src, momentum=value)
    b = spec.update_running_stats(*args, convention=dst, momentum=spec.convert_momentum(value, src, dst))
    np.testing.assert_allclose(a, b, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_each_convention_update_is_its_frameworks_formula(convention):
    """Written out per framework from the cited source lines (SPEC.md table), not via new_value_weight."""
    rng = np.random.default_rng(6)
    old_m, old_v, bm, bv = rng.normal(size=4), rng.uniform(0.5, 2, 4), rng.normal(size=4), rng.uniform(0.5, 2, 4)
    n, k = 12.0, 2  # values per channel; batches seen before (Caffe)
    conv = spec.get_convention(convention)
    mom = conv.default_momentum
    unbiased = bv * n / (n - 1)
    expected = {
        "keras": (old_m * mom + bm * (1 - mom), old_v * mom + bv * (1 - mom)),
        "torch": ((1 - mom) * old_m + mom * bm, (1 - mom) * old_v + mom * unbiased),
        "onnx": (old_m * mom + bm * (1 - mom), old_v * mom + bv * (1 - mom)),
        "tf1": (old_m - (old_m - bm) * (1 - mom), old_v - (old_v - unbiased) * (1 - mom)),
        "d2l": ((1 - mom) * old_m + mom * bm, (1 - mom) * old_v + mom * bv),
    }
    if convention == "caffe":
        s = sum(mom**j for j in range(k))  # scale factor after k batches
        blob_m, blob_v = old_m * s, old_v * s
        s_new = mom * s + 1
        expected["caffe"] = ((mom * blob_m + bm) / s_new, (mom * blob_v + unbiased) / s_new)
    got = spec.update_running_stats(old_m, old_v, bm, bv, n, convention=convention, num_batches_tracked=k)
    np.testing.assert_allclose(got, expected[convention], rtol=1e-14, atol=1e-15)  # float64 reassociation


@SETTINGS
@given(st.floats(0.5, 1.0), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_caffe_update_equals_a_simulation_of_caffes_blob_arithmetic(fraction, steps, seed):
    """batch_norm_layer.cpp: s = f*s + 1; blob0 = f*blob0 + mean; blob1 = f*blob1 + m/(m-1)*var; stat = blob/s."""
    rng = np.random.default_rng(seed)
    blob_mean, blob_var, s = np.zeros(3), np.zeros(3), 0.0  # Caffe zero-fills its three blobs
    mean, var = np.full(3, 123.0), np.full(3, 456.0)  # anything: the first step replaces it
    for k in range(steps):
        x = rng.normal(size=(int(rng.integers(2, 9)), 3))
        m = x.shape[0]
        bm, bv = x.mean(axis=0), x.var(axis=0)
        s = fraction * s + 1.0
        blob_mean = fraction * blob_mean + bm
        blob_var = fraction * blob_var + m / (m - 1) * bv
        mean, var = spec.update_running_stats(
            mean, var, bm, bv, m, convention="caffe", momentum=fraction, num_batches_tracked=k
        )
        np.testing.assert_allclose(mean, blob_mean / s, rtol=1e-12, atol=1e-13)  # float64, a dozen steps
        np.testing.assert_allclose(var, blob_var / s, rtol=1e-12, atol=1e-13)
    got_blobs = spec.caffe_blobs(mean, var, steps, fraction)
    np.testing.assert_allclose(got_blobs[0], blob_mean, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got_blobs[1], blob_var, rtol=1e-12, atol=1e-13)
    assert got_blobs[2] == pytest.approx(s, rel=1e-12)


@SETTINGS
@given(st.integers(1, 15), st.integers(0, 2**32 - 1))
def test_torch_momentum_none_is_the_cumulative_average(steps, seed):
    rng = np.random.default_rng(seed)
    mean, var = np.zeros(2), np.ones(2)
    seen_mean, seen_var = [], []
    for k in range(steps):
        x = rng.normal(size=(int(rng.integers(2, 7)), 2))
        bm, bv = x.mean(axis=0), x.var(axis=0)
        mean, var = spec.update_running_stats(
            mean, var, bm, bv, x.shape[0], convention="torch", momentum=None, num_batches_tracked=k
        )
        seen_mean.append(bm)
        seen_var.append(x.var(axis=0, ddof=1))
    np.testing.assert_allclose(mean, np.mean(seen_mean, axis=0), rtol=1e-12, atol=1e-14)  # float64 averaging
    np.testing.assert_allclose(var, np.mean(seen_var, axis=0), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- numerics


def exact_variance(column: np.ndarray) -> float:
    """Biased variance with correctly rounded sums: the float64 truth, independent of the spec."""
    v = [float(t) for t in column]
    mean = math.fsum(v) / len(v)
    return math.fsum((t - mean) ** 2 for t in v) / len(v)


def naive_float32_variance(column: np.ndarray) -> float:
    """E[x^2] - E[x]^2 in float32, as Keras' synchronized BN computes it (keras/src/backend/tensorflow/nn.py)."""
    x = column.astype(np.float32)
    return float(np.mean(x * x, dtype=np.float32) - np.mean(x, dtype=np.float32) ** 2)


LARGE_OFFSET_SPLITS = {
    "whole": None,
    "2-equal": (0.5,),
    "2-unequal": (0.1,),
    "3-unequal": (0.05, 0.4),
    "5-with-empty": (0.0, 0.2, 0.2, 0.7),
}


@pytest.mark.parametrize("n", [512, 4096])
@pytest.mark.parametrize("split", list(LARGE_OFFSET_SPLITS))
def test_large_offset_variance_within_1e_3_of_float64_truth(split, n):
    """SPEC.md numerics: x = 1e4 + 1e-2 * N(0, 1) in float32; variance within 1e-3 relative."""
    rng = np.random.default_rng(n)
    x = (1e4 + 1e-2 * rng.normal(size=(n, 3))).astype(np.float32)
    truth = np.array([exact_variance(x[:, c]) for c in range(3)])
    fractions = LARGE_OFFSET_SPLITS[split]
    if fractions is None:
        _, _, var = spec.batch_norm_train(x, np.ones(3, np.float32), np.zeros(3, np.float32), axis=1)
    else:
        cuts = [0, *(int(f * n) for f in fractions), n]
        _, _, var = spec.merge_moments([spec.moments(x[a:b]) for a, b in itertools.pairwise(cuts)])
    rel = np.abs(var - truth) / truth
    print(f"\n[large offset n={n} {split}] spec relative error {rel.max():.3g}")
    assert rel.max() <= 1e-3


def test_naive_float32_formula_fails_the_large_offset_requirement():
    """The point of two-pass + Chan: E[x^2] - E[x]^2 in float32 misses 1e-3 by orders of magnitude."""
    rng = np.random.default_rng(4096)
    x = (1e4 + 1e-2 * rng.normal(size=(4096, 3))).astype(np.float32)
    truth = np.array([exact_variance(x[:, c]) for c in range(3)])
    naive = np.array([naive_float32_variance(x[:, c]) for c in range(3)])
    rel = np.abs(naive - truth) / truth
    print(f"\n[large offset naive float32 E[x^2]-E[x]^2] values {naive}, truth {truth}, relative error {rel.max():.3g}")
    # float32 ulp at E[x^2] ~ 1e8 is 8, so the difference is a multiple of ~8 (or 0): off by >= 100%.
    assert rel.min() > 1e-3 and rel.min() >= 0.99


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs_are_reduced_in_at_least_float32(dtype):
    """4096 values near 100: a float16 running sum overflows (max 65504), bfloat16 keeps 8 bits."""
    import ml_dtypes  # ships with TensorFlow and JAX; provides NumPy's bfloat16

    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    rng = np.random.default_rng(3)
    x = (100.0 + 5.0 * rng.normal(size=(4096, 2))).astype(np_dtype)
    y, mean, var = spec.batch_norm_train(x, np.ones(2, np.float32), np.zeros(2, np.float32), axis=1)
    assert y.dtype == np_dtype
    truth_mean = np.array([math.fsum(x[:, c].astype(np.float64)) / 4096 for c in range(2)])
    truth_var = np.array([exact_variance(x[:, c].astype(np.float64)) for c in range(2)])
    # The spec reduces in float64: results are float64-accurate for the half-precision *values*.
    np.testing.assert_allclose(mean, truth_mean, rtol=1e-12)
    np.testing.assert_allclose(var, truth_var, rtol=1e-9)
    # A half-precision accumulator would not: show the failure this requirement prevents.
    naive = np.zeros((), np_dtype)
    with np.errstate(over="ignore"):  # the overflow is the point
        for v in x[:, 0]:
            naive = (naive + v).astype(np_dtype)
    assert not np.isfinite(float(naive)) or abs(float(naive) / 4096 - truth_mean[0]) > 1.0


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.999, 0.99999, 1.0])
@pytest.mark.parametrize("steps", [0, 1, 4, 1000])
def test_caffe_scale_factor_is_accurate_near_fraction_one(fraction, steps):
    """s_n = sum_{k<n} f^k; (1 - f^n) / (1 - f) would lose ~1e-11 to cancellation at f = 0.99999."""
    truth = math.fsum(fraction**k for k in range(steps))
    _, _, s = spec.caffe_blobs(np.zeros(1), np.zeros(1), steps, fraction)
    assert s == pytest.approx(truth, rel=4e-15, abs=0.0)  # a few float64 ulps (pow, log1p, expm1)
