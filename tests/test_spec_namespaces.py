"""spec's array-generic formulas give the same numbers on NumPy, keras.ops and torch tensors.

Oracles are independent of spec: NumPy's own float64 ``mean``/``var``, autograd of the textbook
forward (torch), the hand-written affine map and the Python-number path of ``new_value_weight``
(which the golden vectors pin). Inputs are float32 in [-3, 3] around an offset of 10, so every
float32 result carries a relative rounding of a few ulp (6e-8 each) times the reduction depth:
tests/numerics.py's "rerounded" float32 bound, 1e-5 + 1e-5 relative (values of order 1), leaves a 10x
margin and catches any wrong term.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from cases import case, momentum_id
from numerics import close, tolerance

import spec

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
ops = keras.ops

TOL = tolerance("rerounded", "float32", "y")
AXES = (0, 2)  # (N, C, L): channels on axis 1
NAMESPACES = {
    "numpy": (np, np.asarray),
    "keras": (ops, ops.convert_to_tensor),
    "torch": (torch, torch.as_tensor),
}


def _numpy(a) -> np.ndarray:
    return np.asarray(a.detach() if hasattr(a, "detach") else a, np.float64)


@pytest.fixture
def batch(rng) -> tuple[np.ndarray, np.ndarray]:
    x = (10.0 + rng.uniform(-3, 3, (6, 3, 5))).astype(np.float32)
    mask = np.broadcast_to(rng.random((6, 1, 5)) > 0.3, x.shape).astype(np.float32)
    return x, mask


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("refine", [True, False], ids=["refined", "plain"])
@pytest.mark.parametrize("name", NAMESPACES)
def test_shifted_moments_match_numpy_float64(name, refine, masked, batch):
    xp, tensor = NAMESPACES[name]
    x, mask = batch
    weights = mask if masked else np.ones_like(x)
    stats = spec.shifted_moments(tensor(x), AXES, weights=tensor(mask) if masked else None, refine=refine, xp=xp)
    xd, wd = x.astype(np.float64), weights.astype(np.float64)
    count = wd.sum(axis=AXES)
    mean = (wd * xd).sum(axis=AXES) / count
    var = (wd * (xd - mean[None, :, None]) ** 2).sum(axis=AXES) / count
    for got, want in ((stats.count, count), (stats.mean, mean), (stats.var, var)):
        close(_numpy(got).reshape(-1) * np.ones(3), want, TOL)


def _two_replicas(work):
    """Run ``work(rank, all_reduce_sum)`` for ranks 0 and 1 in threads that exchange sums like a collective."""
    barrier, posted, results = threading.Barrier(2, timeout=30), [None, None], [None, None]

    def replica(rank: int) -> None:
        def all_reduce_sum(values):
            posted[rank] = values
            barrier.wait()
            total = [a + b for a, b in zip(*posted, strict=True)]
            barrier.wait()  # neither replica posts its next round before both have read this one
            return total

        results[rank] = work(rank, all_reduce_sum)

    threads = [threading.Thread(target=replica, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_shifted_moments_sum_over_replicas(batch):
    """Two replicas of unequal size (2 and 4 rows) exchanging sums equal one batch of both."""
    x, _ = batch
    parts = [torch.as_tensor(x[:2]), torch.as_tensor(x[2:])]
    results = _two_replicas(
        lambda rank, reduce: spec.shifted_moments(parts[rank], AXES, all_reduce_sum=reduce, xp=torch)
    )
    xd = x.astype(np.float64)
    for stats in results:
        np.testing.assert_allclose(_numpy(stats.count).reshape(-1), np.full(3, 30.0))
        close(_numpy(stats.mean).reshape(-1), xd.mean(axis=AXES), TOL)
        close(_numpy(stats.var).reshape(-1), xd.var(axis=AXES), TOL)


def _autograd_reference(x, gamma, dy, mask, eps):
    """Oracle: torch autograd (float64) through y = gamma * (x - mean) / sqrt(var + eps), weighted moments."""
    w = torch.as_tensor(mask, dtype=torch.float64)
    xt = torch.as_tensor(x, dtype=torch.float64).requires_grad_()
    gt = torch.as_tensor(gamma, dtype=torch.float64).requires_grad_()
    count = w.sum(dim=AXES, keepdim=True)
    mean = (w * xt).sum(dim=AXES, keepdim=True) / count
    var = (w * (xt - mean) ** 2).sum(dim=AXES, keepdim=True) / count
    inv_sigma = torch.rsqrt(var + eps)
    y = gt.view(1, -1, 1) * (xt - mean) * inv_sigma
    y.backward(torch.as_tensor(dy, dtype=torch.float64))
    x_hat = ((xt - mean) * inv_sigma).detach().float().numpy()
    scale = (gt.view(1, -1, 1) * inv_sigma).detach().float().numpy()
    return x_hat, scale, count.float().numpy(), xt.grad.numpy(), gt.grad.numpy()


def test_backward_closed_form_over_replicas(batch, rng):
    """dx from global sums on each replica; each replica's dgamma/dbeta are its own, and add up to the total."""
    x, _ = batch
    gamma = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    dy = rng.uniform(-1, 1, x.shape).astype(np.float32)
    x_hat, scale, count, dx_want, dgamma_want = _autograd_reference(x, gamma, dy, np.ones_like(x), 1e-3)
    rows = [slice(0, 2), slice(2, None)]

    def work(rank, reduce):
        part = rows[rank]
        args = (torch.as_tensor(dy[part]), torch.as_tensor(x_hat[part]), torch.as_tensor(scale))
        return spec.backward_closed_form(*args, AXES, count=torch.as_tensor(count), all_reduce_sum=reduce, xp=torch)

    results = _two_replicas(work)
    dx = np.concatenate([_numpy(r[0]) for r in results])
    close(dx, dx_want, TOL)
    local_dgamma = [_numpy(r[1]).reshape(-1) for r in results]
    close(local_dgamma[0], (dy[:2] * x_hat[:2]).astype(np.float64).sum(axis=AXES), TOL)
    close(sum(local_dgamma), dgamma_want, TOL)


def _close_gradients(got, dx_want, dgamma_want, dy) -> None:
    """(dx, dgamma, dbeta) from a spec backward against autograd's dx, dgamma and the hand-summed dbeta."""
    dx, dgamma, dbeta = got
    close(_numpy(dx), dx_want, TOL)
    close(_numpy(dgamma).reshape(-1), dgamma_want, TOL)
    close(_numpy(dbeta).reshape(-1), dy.astype(np.float64).sum(axis=AXES), TOL)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("name", NAMESPACES)
def test_backward_closed_form_matches_autograd(name, masked, batch, rng):
    xp, tensor = NAMESPACES[name]
    x, mask = batch
    gamma = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    dy = rng.uniform(-1, 1, x.shape).astype(np.float32)
    x_hat, scale, count, dx_want, dgamma_want = _autograd_reference(
        x, gamma, dy, mask if masked else np.ones_like(x), 1e-3
    )
    dx, dgamma, dbeta = spec.backward_closed_form(
        tensor(dy),
        tensor(x_hat),
        tensor(scale),
        AXES,
        count=tensor(count),
        weights=tensor(mask) if masked else None,
        xp=xp,
    )
    _close_gradients((dx, dgamma, dbeta), dx_want, dgamma_want, dy)


@pytest.mark.parametrize("centered", [False, True], ids=["no-beta", "beta"])
@pytest.mark.parametrize("name", NAMESPACES)
def test_inference_affine_is_the_hand_written_map(name, centered, rng):
    xp, tensor = NAMESPACES[name]
    mean, gamma, beta = (rng.uniform(-2, 2, 4).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.0, 3.0, 4).astype(np.float32)
    scale, shift = spec.inference_affine(
        tensor(mean), tensor(var), tensor(gamma), tensor(beta) if centered else None, eps=1e-5, xp=xp
    )
    want_scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
    want_shift = (beta if centered else 0.0) - mean.astype(np.float64) * want_scale
    close(_numpy(scale), want_scale, TOL)
    close(_numpy(shift), want_shift, TOL)


# (convention, momentum, batches counted)
COUNTERS = [("caffe", 0.999, 7), ("caffe", 0.5, 3), ("caffe", 1.0, 4), ("caffe", 0.0, 2), ("torch", None, 9)]
WEIGHTS = [
    case(name, convention, momentum, n, peer=name, convention=convention, detail=f"{momentum_id(momentum)}-n{n}")
    for name in ("keras", "torch")
    for convention, momentum, n in COUNTERS
]


@pytest.mark.parametrize(("name", "convention", "momentum", "n"), WEIGHTS)
def test_new_value_weight_on_a_counter_tensor_equals_the_number_path(name, convention, momentum, n):
    """float64 counter tensors (the layers' num_batches_tracked) give the Python path's weight to 1e-15."""
    xp, tensor = NAMESPACES[name]
    conv = spec.get_convention(convention)
    got = spec.new_value_weight(conv, momentum, tensor(np.float64(n)), xp=xp)
    np.testing.assert_allclose(_numpy(got), spec.new_value_weight(conv, momentum, n), rtol=1e-15)


@pytest.mark.parametrize("name", NAMESPACES)
def test_variance_for_update_applies_bessel_where_the_convention_does(name):
    xp, tensor = NAMESPACES[name]
    var, count = tensor(np.array([2.0, 2.0])), tensor(np.array([2.0, 5.0]))
    unbiased = spec.variance_for_update(spec.get_convention("torch"), var, count, xp=xp)
    np.testing.assert_array_equal(_numpy(unbiased), [4.0, 2.5])  # 2 * 2 / 1, 2 * 5 / 4: exact in binary
    biased = spec.variance_for_update(spec.get_convention("keras"), var, count, xp=xp)
    np.testing.assert_array_equal(_numpy(biased), [2.0, 2.0])


def _centered_reference(x, mask, eps):
    """``(x - mean, 1 / sqrt(var + eps))`` in float64 from the weighted moments, cast to x's float32."""
    xd, wd = x.astype(np.float64), mask.astype(np.float64)
    count = wd.sum(axis=AXES, keepdims=True)
    mean = (wd * xd).sum(axis=AXES, keepdims=True) / count
    var = (wd * (xd - mean) ** 2).sum(axis=AXES, keepdims=True) / count
    return (xd - mean).astype(np.float32), (1.0 / np.sqrt(var + eps)).astype(np.float32)


@pytest.mark.parametrize("form", ["fresh", "overwrite-centered", "centered-offset"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("name", NAMESPACES)
def test_backward_coefficient_form_matches_autograd(name, masked, form, batch, rng):
    """The coefficient form (what the layers call) against torch autograd, as the closed form above.

    ``centered-offset``: ``centered = x - shift`` with ``x - mean = centered - centered_offset`` (keras_bn passes
    ShiftedMoments' shift and delta), the offset folded into the per-channel sums. The offset, up to 0.5 per
    channel on values of order 3, shifts no term by more than float32 rounding of order-1 values."""
    xp, tensor = NAMESPACES[name]
    x, mask = batch
    weights = mask if masked else np.ones_like(x)
    gamma = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    dy = rng.uniform(-1, 1, x.shape).astype(np.float32)
    _, scale, count, dx_want, dgamma_want = _autograd_reference(x, gamma, dy, weights, 1e-3)
    centered, inv_sigma = _centered_reference(x, weights, 1e-3)
    options = {"overwrite_centered": form == "overwrite-centered"}
    if form == "centered-offset":
        offset = rng.uniform(-0.5, 0.5, (1, 3, 1)).astype(np.float32)
        centered, options = centered + offset, {"centered_offset": tensor(offset)}
    dx, dgamma, dbeta = spec.backward_coefficient_form(
        tensor(dy),
        tensor(centered),
        tensor(inv_sigma),
        tensor(scale),
        AXES,
        count=tensor(count),
        weights=tensor(mask) if masked else None,
        xp=xp,
        **options,
    )
    _close_gradients((dx, dgamma, dbeta), dx_want, dgamma_want, dy)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_backward_coefficient_form_equals_the_reference_closed_form_in_float64(masked, batch, rng):
    """Why the NumPy reference keeps its own form: the two differ by float64 rounding only.

    Values are of order 1 and each channel sums m = 30 of them, so either form rounds by at most
    ~m ulp (30 * 2.2e-16 ~ 7e-15); 1e-13 is a 15x margin, and any wrong term would be O(1) off.
    """
    x, mask = (a.astype(np.float64) for a in batch)
    weights = mask if masked else np.ones_like(x)
    gamma = rng.uniform(0.5, 2.0, (1, 3, 1))
    dy = rng.uniform(-1, 1, x.shape)
    stats = spec.shifted_moments(x, AXES, weights=weights if masked else None, refine=False)
    inv_sigma = 1.0 / np.sqrt(stats.var + 1e-3)
    centered = x - stats.mean
    kwargs = {"count": stats.count, "weights": weights if masked else None}
    want = spec.backward_closed_form(dy, centered * inv_sigma, gamma * inv_sigma, AXES, **kwargs)
    got = spec.backward_coefficient_form(dy, centered, inv_sigma, gamma * inv_sigma, AXES, **kwargs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", NAMESPACES)
def test_shifted_moments_returns_its_centered_values_and_a_number_count(name, batch):
    """``return_centered`` gives ``x - shift`` exactly; ``count_as_number`` a Python number where no sum is needed."""
    xp, tensor = NAMESPACES[name]
    x, mask = batch
    stats, centered = spec.shifted_moments(tensor(x), AXES, return_centered=True, count_as_number=True, xp=xp)
    np.testing.assert_array_equal(_numpy(centered), _numpy(tensor(x) - stats.shift))
    if name == "keras":  # a traced batch size is unknown until run time: the count stays an array
        np.testing.assert_array_equal(_numpy(stats.count).reshape(-1), np.full(3, 30.0))
    else:
        assert isinstance(stats.count, float) and stats.count == 30.0
    masked = spec.shifted_moments(tensor(x), AXES, weights=tensor(mask), count_as_number=True, xp=xp)
    np.testing.assert_array_equal(_numpy(masked.count).reshape(-1), mask.astype(np.float64).sum(axis=AXES))
    plain = spec.shifted_moments(tensor(x), AXES, xp=xp)  # the default keeps its keepdims count
    assert not isinstance(plain.count, float)


@pytest.mark.parametrize("name", NAMESPACES)
def test_multiply_add_is_x_times_a_plus_b(name, rng):
    xp, tensor = NAMESPACES[name]
    x, b = (rng.uniform(-2, 2, (4, 3, 5)).astype(np.float32) for _ in range(2))
    a = rng.uniform(-2, 2, (1, 3, 1)).astype(np.float32)
    got = spec.namespace(xp).multiply_add(tensor(x), tensor(a), tensor(b))
    # one float32 product and sum of values of order 1: torch may fuse them (one rounding fewer),
    # so 2 ulp of the result's magnitude (~6) bounds the difference from the two-rounding NumPy form
    np.testing.assert_allclose(_numpy(got), x * a + b, rtol=0, atol=2 * 6 * 2**-23)


def test_torch_multiply_add_reuses_only_a_temporary_it_may(rng):
    """``overwrite`` writes into the named operand only where autograd does not record and shapes fit."""
    ns = spec.namespace(torch)
    x, b = (torch.as_tensor(rng.uniform(-2, 2, (4, 3, 5)).astype(np.float32)) for _ in range(2))
    a = torch.as_tensor(rng.uniform(-2, 2, (1, 3, 1)).astype(np.float32))
    want = x * a + b
    with torch.no_grad():
        into_x = ns.multiply_add(x.clone(), a, b, overwrite="x")
        x_copy = x.clone()
        assert ns.multiply_add(x_copy, a, b, overwrite="x").data_ptr() == x_copy.data_ptr()
        b_copy = b.clone()
        assert ns.multiply_add(x, a, b_copy, overwrite="b").data_ptr() == b_copy.data_ptr()
        small = a.clone()  # the result is x-sized: a per-channel operand cannot hold it
        assert ns.multiply_add(small, x, b, overwrite="x").shape == x.shape
        torch.testing.assert_close(small, a, rtol=0, atol=0)
    torch.testing.assert_close(into_x, want)
    recorded = x.clone().requires_grad_()
    y = ns.multiply_add(recorded, a, b, overwrite="x")  # autograd records: out of place
    assert y.data_ptr() != recorded.data_ptr() and y.requires_grad
    torch.testing.assert_close(recorded.detach(), x, rtol=0, atol=0)


# channels-last shapes: (shape, whether the plain namespace views them as wider rows); odd row counts and 16 or
# more channels keep ATen's own loop
TILE_SHAPES = {
    "NHWC-6ch": ((64, 24, 24, 6), True),
    "NHWC-1ch": ((8, 4, 4, 1), True),
    "NHWC-15ch": ((32, 8, 8, 15), True),
    "NC-3ch": ((128, 3), True),
    "NHWC-16ch": ((16, 8, 8, 16), False),
    "odd-rows-6ch": ((3, 5, 7, 6), False),
}


@pytest.mark.parametrize("shape_id", list(TILE_SHAPES))
def test_plain_torch_namespace_gives_the_bits_of_the_checked_one_on_channels_last_tensors(shape_id, rng):
    """Namespace(torch, plain_tensors=True) may run per-channel elementwise ops on x viewed as wider rows (the
    vectors repeated): every element gets the same operands, so subtract and both in-place multiply_adds must
    equal the checked namespace's results bit for bit, written into the same buffers."""
    shape, tiled = TILE_SHAPES[shape_id]
    plain, checked = spec.arrays.Namespace(torch, plain_tensors=True), spec.namespace(torch)
    x, dy = (torch.as_tensor(rng.uniform(-3, 3, shape).astype(np.float32)) for _ in range(2))
    a, b = (torch.as_tensor(rng.uniform(-2, 2, (1,) * (len(shape) - 1) + shape[-1:]).astype(np.float32)) for _ in "ab")
    assert (plain._channel_tiles(x, (x, a)) is not None) is tiled
    with torch.no_grad():
        assert torch.equal(plain.subtract(x, a), checked.subtract(x, a))
        out_plain, out_checked = torch.empty_like(x), torch.empty_like(x)
        assert plain.subtract(x, a, out=out_plain) is out_plain
        checked.subtract(x, a, out=out_checked)
        assert torch.equal(out_plain, out_checked)
        into_x = x.clone()
        assert plain.multiply_add(into_x, a, b, overwrite="x") is into_x
        assert torch.equal(into_x, checked.multiply_add(x.clone(), a, b, overwrite="x"))
        into_b = dy.clone()
        assert plain.multiply_add(x, a, into_b, overwrite="b") is into_b
        assert torch.equal(into_b, checked.multiply_add(x, a, dy.clone(), overwrite="b"))


def test_tiling_refused_for_a_channels_first_vector_makes_no_view():
    """NCHW x whose last dim (a width, 8) is below the tiling width, with a (1, C, 1, 1) vector: not tileable, and
    deciding so must not cost ATen calls (views of x made and dropped were 2 per step per such op)."""
    from torch.profiler import ProfilerActivity, profile

    plain = spec.arrays.Namespace(torch, plain_tensors=True)
    x, vector = torch.ones(64, 16, 8, 8), torch.ones(1, 16, 1, 1)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        assert plain._channel_tiles(x, (x, vector)) is None
    assert [event.name for event in prof.events() if event.name.startswith("aten::")] == []


@pytest.mark.parametrize("name", NAMESPACES)
def test_variance_for_update_takes_a_python_count(name):
    xp, tensor = NAMESPACES[name]
    var = tensor(np.array([2.0, 3.0]))
    got = spec.variance_for_update(spec.get_convention("torch"), var, 5.0, xp=xp)
    np.testing.assert_array_equal(_numpy(got), [2.5, 3.75])  # 2 * 5 / 4, 3 * 5 / 4: exact in binary
    assert np.all(_numpy(spec.variance_for_update(spec.get_convention("torch"), var, 1.0, xp=xp)) == [2.0, 3.0])


@pytest.mark.parametrize(
    ("ratio", "needed"), [(0.0, False), (8.0, False), (8.3, True), (1e6, True)], ids=["0", "8", "8.3", "1e6"]
)
def test_refinement_matters_from_the_hand_derived_threshold(ratio, needed):
    """SPEC.md §8.5 by hand: float32 (u = 2**-24), n = 200,704 values per channel (64x56x56):
    gamma = (n + 1) u = 0.01196, and refinement is needed iff gamma (sigma + |shift|)^2 > sigma^2, i.e.
    iff |shift| / sigma > 1 / sqrt(gamma) - 1 = 8.14. One channel above it is enough."""
    n, sigma = 200_704.0, 0.5
    shift = np.array([0.0, ratio * sigma], np.float32)
    got = spec.refinement_matters(n, shift, np.full(2, sigma**2, np.float32), 2.0**-24)
    assert bool(got) is needed


@pytest.mark.parametrize(
    ("offset", "spread", "refined"), [(0.5, 1.0, False), (1e4, 1e-2, True)], ids=["ordinary", "offset-1e4"]
)
@pytest.mark.parametrize("name", NAMESPACES)
def test_refinement_when_needed_runs_only_for_large_offsets(name, offset, spread, refined, rng):
    """``refine="when_needed"``: ordinary data keep the plain two-pass (delta = 0, one reduction less), data with
    |mean| / std = 1e6 get the refinement; both within SPEC.md §8's accuracy of NumPy's float64 statistics of the
    same float32 values: 1e-5 relative for ordinary data (rerounded float32), 1e-3 for the offset variance (§8.2).
    """
    xp, tensor = NAMESPACES[name]
    x = (offset + spread * rng.standard_normal((64, 3, 50))).astype(np.float32)
    stats = spec.shifted_moments(tensor(x), AXES, refine=spec.REFINE_WHEN_NEEDED, xp=xp)
    assert bool(np.any(_numpy(stats.delta) != 0)) is refined
    xd = x.astype(np.float64)
    close(_numpy(stats.mean).reshape(-1), xd.mean(axis=AXES), TOL)
    np.testing.assert_allclose(_numpy(stats.var).reshape(-1), xd.var(axis=AXES), rtol=1e-3 if refined else 1e-5)
    plain = spec.shifted_moments(tensor(x), AXES, refine=False, xp=xp)
    if not refined:  # the skipped branch is the plain two-pass, bit for bit
        np.testing.assert_array_equal(_numpy(stats.var), _numpy(plain.var))


def test_refine_rejects_other_values():
    with pytest.raises(ValueError, match="refine must be True, False or 'when_needed'"):
        spec.shifted_moments(np.ones((2, 3)), (0,), refine="sometimes")


@pytest.mark.parametrize("name", NAMESPACES)
def test_where_takes_a_python_bool_and_picks_an_operand(name):
    """A condition known on the host picks one operand as it is (no array op); an array condition selects."""
    xp, tensor = NAMESPACES[name]
    ns = spec.namespace(xp)
    a, b = tensor(np.array([1.0, 2.0])), tensor(np.array([3.0, 4.0]))
    assert ns.where(True, a, b) is a and ns.where(False, a, b) is b
    np.testing.assert_array_equal(_numpy(ns.where(tensor(np.array([True, False])), a, b)), [1.0, 4.0])


@pytest.mark.parametrize("name", NAMESPACES)
def test_asarray_rounds_a_python_number_once_to_the_dtype(name):
    """0.1 straight to float64 is NumPy's float64(0.1), not float32(0.1) widened (1.5e-9 off); cast follows a
    dtype name or another array's dtype object."""
    xp, tensor = NAMESPACES[name]
    ns = spec.namespace(xp)
    like64, like32 = tensor(np.zeros(2)), tensor(np.zeros(2, np.float32))
    for dtype, want in (("float64", np.float64(0.1)), (like64.dtype, np.float64(0.1)), (like32.dtype, np.float32(0.1))):
        got = ns.asarray(0.1, dtype)
        assert _numpy(got) == want and str(want.dtype) in str(got.dtype)
    widened = ns.cast(ns.asarray(0.1, "float32"), "float64")
    assert _numpy(widened) == np.float64(np.float32(0.1)) != np.float64(0.1) and "float64" in str(widened.dtype)
    assert "float64" in str(ns.cast(like32, like64.dtype).dtype)
