"""Bad input raises ValueError naming the problem; non-finite values stay inside their channel."""

from __future__ import annotations

import numpy as np
import pytest
from cases import case
from hypothesis import given, settings
from hypothesis import strategies as st

import spec

X = np.arange(12.0).reshape(4, 3)  # (N=4, C=3)
G, B = np.ones(3), np.zeros(3)


def _update(**overrides):
    args = {
        "running_mean": np.zeros(3),
        "running_var": np.ones(3),
        "batch_mean": np.zeros(3),
        "batch_var": np.ones(3),
        "count": 4,
        "convention": "keras",
    }
    args.update(overrides)
    positional = [args.pop(k) for k in ("running_mean", "running_var", "batch_mean", "batch_var", "count")]
    return spec.update_running_stats(*positional, **args)


BAD_CALLS = {
    "rank-1-x": (lambda: spec.batch_norm_train(np.ones(3), G, B), "x must have rank >= 2"),
    "rank-0-x-infer": (lambda: spec.batch_norm_infer(np.float64(1.0), G, B, G, G), "x must have rank >= 2"),
    "axis-out-of-range": (lambda: spec.batch_norm_train(X, G, B, axis=2), "axis 2 is out of range for x of rank 2"),
    "axis-negative-out-of-range": (lambda: spec.batch_norm_infer(X, G, B, G, G, axis=-3), "axis -3 is out of range"),
    "axis-not-int": (lambda: spec.batch_norm_train(X, G, B, axis=1.0), "axis must be an int"),
    "gamma-length": (lambda: spec.batch_norm_train(X, np.ones(4), B), "gamma must have shape (3,)"),
    "beta-length": (lambda: spec.batch_norm_train(X, G, np.zeros(2)), "beta must have shape (3,)"),
    "gamma-2d": (lambda: spec.batch_norm_backward(X, X, np.ones((1, 3))), "gamma must have shape (3,)"),
    "mean-length": (lambda: spec.batch_norm_infer(X, G, B, np.zeros(2), G), "mean must have shape (3,)"),
    "var-length": (lambda: spec.batch_norm_infer(X, G, B, B, np.ones(5)), "var must have shape (3,)"),
    "var-negative": (lambda: spec.batch_norm_infer(X, G, B, B, np.array([1.0, -1.0, 1.0])), "var must be >= 0"),
    "eps-zero": (lambda: spec.batch_norm_train(X, G, B, eps=0.0), "eps must be > 0 and finite, got 0.0"),
    "eps-negative": (lambda: spec.batch_norm_infer(X, G, B, B, G, eps=-1e-5), "eps must be > 0"),
    "eps-nan": (lambda: spec.batch_norm_backward(X, X, G, eps=float("nan")), "eps must be > 0 and finite, got nan"),
    "eps-inf": (lambda: spec.batch_norm_train(X, G, B, eps=np.inf), "eps must be > 0 and finite, got inf"),
    "eps-bool": (lambda: spec.batch_norm_train(X, G, B, eps=True), "eps must be a real number, got bool True"),
    "eps-numpy-bool": (lambda: spec.batch_norm_infer(X, G, B, B, G, eps=np.True_), "eps must be a real number"),
    "eps-text": (lambda: spec.batch_norm_train(X, G, B, eps="1e-5"), "eps must be a real number, got str '1e-5'"),
    "eps-array": (lambda: spec.batch_norm_backward(X, X, G, eps=np.array([1e-5])), "eps must be a real number"),
    "eps-0d-array": (lambda: spec.batch_norm_train(X, G, B, eps=np.array(1e-5)), "eps must be a real number"),
    "eps-list": (lambda: spec.batch_norm_infer(X, G, B, B, G, eps=[1e-5]), "eps must be a real number"),
    "integer-x": (lambda: spec.batch_norm_train(np.ones((4, 3), dtype=np.int64), G, B), "x must be a floating-point"),
    "dy-shape": (lambda: spec.batch_norm_backward(np.ones((4, 2)), X, G), "dy must have the shape of x"),
    "one-value-per-channel": (
        lambda: spec.batch_norm_train(np.ones((1, 3)), G, B),
        "training needs more than one value per channel",
    ),
    "one-value-per-channel-nchw": (
        lambda: spec.batch_norm_train(np.ones((1, 3, 1, 1)), G, B, axis=1),
        "more than one value per channel to estimate a variance, got 1",
    ),
    "one-value-per-channel-backward": (
        lambda: spec.batch_norm_backward(np.ones((1, 3)), np.ones((1, 3)), G),
        "more than one value per channel",
    ),
    "masked-to-zero-values": (
        lambda: spec.batch_norm_train(np.ones((3, 2, 2)), np.ones(2), np.zeros(2), axis=-1, mask=np.zeros((3, 2))),
        "estimate a variance, got 0",
    ),
    "masked-to-one-value": (
        lambda: spec.batch_norm_train(
            np.ones((3, 2, 2)), np.ones(2), np.zeros(2), axis=-1, mask=[[1, 0], [0, 0], [0, 0]]
        ),
        "more than one value per channel",
    ),
    "mask-negative": (
        lambda: spec.moments(X, axis=1, mask=np.array([1.0, -1.0, 1.0, 1.0])),
        "mask weights must be >= 0, got min -1.0",
    ),
    "mask-nan": (
        lambda: spec.batch_norm_train(X, G, B, mask=np.array([1.0, np.nan, 1.0, 1.0])),
        "mask weights must be finite",
    ),
    "mask-inf": (
        lambda: spec.moments(X, axis=1, mask=np.array([1.0, np.inf, 1.0, 1.0])),
        "mask weights must be finite",
    ),
    "mask-text": (lambda: spec.moments(X, axis=1, mask=np.array(["1", "1", "0", "1"])), "mask must hold booleans"),
    "mask-shape": (lambda: spec.moments(X, axis=1, mask=np.ones(5)), "does not broadcast to x of shape (4, 3)"),
    "unknown-convention": (lambda: _update(convention="pytorch"), "unknown convention 'pytorch'; known: keras, torch"),
    "unknown-convention-convert": (lambda: spec.convert_momentum(0.9, "keras", "mxnet"), "unknown convention 'mxnet'"),
    "momentum-above-1": (lambda: _update(momentum=1.5), "momentum for convention 'keras' must be in [0, 1], got 1.5"),
    "momentum-negative-torch": (lambda: _update(convention="torch", momentum=-0.1), "must be in [0, 1]"),
    "momentum-nan": (lambda: _update(convention="onnx", momentum=float("nan")), "must be in [0, 1]"),
    "momentum-text": (lambda: _update(momentum="fast"), "momentum must be a number"),
    "momentum-numeric-text": (lambda: _update(momentum="0.9"), "momentum must be a number in [0, 1], got '0.9'"),
    "momentum-bool": (lambda: _update(momentum=True), "momentum must be a number in [0, 1], got True"),
    "momentum-array": (lambda: _update(momentum=np.array([0.9])), "momentum must be a number"),
    "momentum-none-keras": (lambda: _update(momentum=None), "momentum=None (cumulative average) is only defined"),
    "caffe-fraction-above-1": (
        lambda: _update(convention="caffe", momentum=1.01, num_batches_tracked=0),
        "convention 'caffe' must be in [0, 1]",
    ),
    "torch-none-without-counter": (
        lambda: _update(convention="torch", momentum=None),
        "needs num_batches_tracked",
    ),
    "caffe-without-counter": (lambda: _update(convention="caffe"), "needs num_batches_tracked"),
    "negative-counter": (
        lambda: _update(convention="torch", momentum=None, num_batches_tracked=-1),
        "num_batches_tracked must be >= 0",
    ),
    "counter-float": (
        lambda: _update(convention="torch", momentum=None, num_batches_tracked=1.5),
        "num_batches_tracked must be an integer, got float 1.5",
    ),
    "counter-integral-float": (
        lambda: _update(convention="caffe", num_batches_tracked=2.0),
        "num_batches_tracked must be an integer, got float 2.0",
    ),
    "counter-text": (
        lambda: _update(convention="caffe", num_batches_tracked="3"),
        "num_batches_tracked must be an integer, got str '3'",
    ),
    "counter-bool": (
        lambda: _update(convention="torch", momentum=None, num_batches_tracked=True),
        "num_batches_tracked must be an integer, got bool True",
    ),
    "counter-float-unused-by-fixed-momentum": (
        lambda: _update(convention="torch", momentum=0.1, num_batches_tracked=0.5),
        "num_batches_tracked must be an integer",
    ),
    "counter-negative-caffe-blobs": (lambda: spec.caffe_blobs(G, G, -2), "num_batches_tracked must be >= 0, got -2"),
    "counter-float-caffe-blobs": (lambda: spec.caffe_blobs(G, G, 2.5), "num_batches_tracked must be an integer"),
    "counter-float-new-value-weight": (
        lambda: spec.new_value_weight(spec.get_convention("torch"), None, 3.7),
        "num_batches_tracked must be an integer",
    ),
    "unbiased-count-1": (lambda: _update(convention="torch", count=1), "needs count > 1"),
    "biased-count-below-1": (lambda: _update(count=0.5), "count must be >= 1 (or 0, an empty batch), got 0.5"),
    "count-negative": (lambda: _update(count=-4), "count must be >= 0, got -4.0"),
    "count-negative-channel": (lambda: _update(count=np.array([4.0, -1.0, 4.0])), "count must be >= 0"),
    "count-nan": (lambda: _update(count=float("nan")), "count must be finite, got nan"),
    "count-inf": (lambda: _update(convention="torch", count=np.inf), "count must be finite, got inf"),
    "count-text": (lambda: _update(count="4"), "count must be a number or an array of numbers"),
    "count-bool": (lambda: _update(count=True), "count must be a number or an array of numbers, got dtype bool"),
    "count-shape": (lambda: _update(count=np.full(2, 4.0)), "count must be a scalar or have shape (3,)"),
    "running-var-negative": (
        lambda: _update(running_var=np.array([1.0, -0.5, 1.0])),
        "running_var must be >= 0 in every channel, got min -0.5",
    ),
    "stat-shape": (lambda: _update(batch_mean=np.zeros(4)), "batch_mean must have shape (3,) like running_mean"),
    "negative-batch-var": (lambda: _update(batch_var=-np.ones(3)), "batch_var must be >= 0"),
    "convert-none": (lambda: spec.convert_momentum(None, "torch", "keras"), "has no fixed-momentum equivalent"),
    "merge-nothing": (lambda: spec.merge_moments([]), "needs at least one (count, mean, var) part"),
    "merge-bad-part": (lambda: spec.merge_moments([(1.0, 0.0)]), "part 0 must be (count, mean, var)"),
    "merge-negative-count": (
        lambda: spec.merge_moments([(2.0, 0.0, 1.0), (-1.0, 0.0, 1.0)]),
        "part 1 count must be >= 0, got -1.0",
    ),
    "merge-nan-count": (
        lambda: spec.merge_moments([(2.0, 0.0, 1.0), (np.nan, 0.0, 1.0)]),
        "part 1 count must be finite",
    ),
    "merge-different-channel-counts": (
        lambda: spec.merge_moments([(G * 4, np.zeros(3), G), (np.full(4, 4.0), np.zeros(4), np.ones(4))]),
        "part 1 has mean of shape (4,) but part 0 has (3,): every part must describe the same channels",
    ),
    "merge-mean-var-shapes-differ": (
        lambda: spec.merge_moments([(G * 4, np.zeros(3), np.ones(2))]),
        "part 0 has count, mean, var of shapes (3,), (3,), (2,)",
    ),
    "merge-count-shape": (
        lambda: spec.merge_moments([(np.full(2, 4.0), np.zeros(3), G)]),
        "count must be a scalar or match them",
    ),
    "merge-one-channel-empty-everywhere": (
        lambda: spec.merge_moments([([3.0, 0.0, 2.0], np.zeros(3), G), ([1.0, 0.0, 0.0], np.zeros(3), G)]),
        "every part has count 0 in channel 1; there are no values to merge",
    ),
    "merge-two-channels-empty-everywhere": (
        lambda: spec.merge_moments([([0.0, 5.0, 0.0], np.zeros(3), G)] * 2),
        "every part has count 0 in channels [0, 2]",
    ),
    "merge-negative-var": (lambda: spec.merge_moments([(2.0, 0.0, -1.0)]), "part 0 has a negative variance"),
    "merge-all-empty": (lambda: spec.merge_moments([(0.0, 0.0, 0.0)] * 2), "every part has count 0"),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_value_error_naming_the_problem(name):
    call, message = BAD_CALLS[name]
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, by design
@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 5),
    st.integers(0, 3),
    st.sampled_from([np.nan, np.inf, -np.inf]),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["float16", "float32", "float64"]),
)
def test_non_finite_input_stays_in_its_channel(rank, channel_seed, bad, seed, dtype):
    """A NaN/Inf in x makes its own channel's y NaN (inf - inf) and leaves every other channel bit-identical."""
    rng = np.random.default_rng(seed)
    shape = [int(v) for v in rng.integers(2, 4, size=rank)]
    axis = int(rng.integers(-rank, rank))
    c = shape[axis]
    x = rng.normal(size=shape).astype(dtype)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    clean, _, _ = spec.batch_norm_train(x, gamma, beta, axis=axis)
    channel = channel_seed % c
    index = [int(rng.integers(0, s)) for s in shape]
    index[axis] = channel
    dirty = x.copy()
    dirty[tuple(index)] = bad
    y, mean, var = spec.batch_norm_train(dirty, gamma, beta, axis=axis)
    in_channel = np.moveaxis(y, axis, 0)[channel]
    others = np.delete(np.moveaxis(y, axis, 0), channel, axis=0)
    assert np.isnan(in_channel).all()
    assert np.isnan(var[channel])
    np.testing.assert_array_equal(others, np.delete(np.moveaxis(clean, axis, 0), channel, axis=0))
    dx, dgamma, _ = spec.batch_norm_backward(np.ones_like(dirty), dirty, gamma, axis=axis)
    assert np.isnan(np.moveaxis(dx, axis, 0)[channel]).all() and np.isnan(dgamma[channel])
    assert np.isfinite(np.delete(np.moveaxis(dx, axis, 0), channel, axis=0)).all()


def test_nan_in_a_parameter_stays_in_its_channel():
    x = np.random.default_rng(0).normal(size=(5, 3, 2))
    gamma = np.array([1.0, np.nan, 1.0])
    y = spec.batch_norm_infer(x, gamma, B, B, G, axis=1)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()


def test_zero_variance_channel_outputs_beta_and_finite_gradients():
    """Constant channel: var = 0, x_hat = 0 exactly, y = beta; dx = gamma/sqrt(eps) * (dy - mean(dy))."""
    x = np.random.default_rng(1).normal(size=(6, 3))
    x[:, 1] = 0.75  # a dyadic constant: its float64 mean is exact, so x - mean is exactly 0
    beta = np.array([0.1, -0.2, 0.3])
    y, _, var = spec.batch_norm_train(x, G * 2.0, beta, axis=1, eps=1e-3)
    assert var[1] == 0.0
    np.testing.assert_array_equal(y[:, 1], np.full(6, -0.2))
    dy = np.random.default_rng(2).normal(size=x.shape)
    dx, dgamma, _ = spec.batch_norm_backward(dy, x, G * 2.0, axis=1, eps=1e-3)
    assert dgamma[1] == 0.0
    # Closed form with x_hat = 0; float64 arithmetic on O(60) values: 1e-12 relative.
    np.testing.assert_allclose(dx[:, 1], 2.0 / np.sqrt(1e-3) * (dy[:, 1] - dy[:, 1].mean()), rtol=1e-12, atol=1e-12)


def test_two_values_per_channel_is_the_smallest_legal_training_batch():
    """m = 2: x_hat = +-sqrt(var / (var + eps)) ~ +-1 whatever the two values are."""
    y, mean, var = spec.batch_norm_train(np.array([[1.0, -3.0], [5.0, 7.0]]), np.ones(2), np.zeros(2), eps=1e-5)
    np.testing.assert_array_equal(mean, [3.0, 2.0])
    np.testing.assert_array_equal(var, [4.0, 25.0])
    np.testing.assert_allclose(np.abs(y), np.sqrt(var / (var + 1e-5)) * np.ones((2, 1)), rtol=1e-15)


def test_merge_ignores_empty_replicas_whatever_their_mean():
    """An empty replica may report any mean (NumPy gives NaN); it must not touch the result."""
    parts = [([3.0], [1.0], [2.0]), ([0.0], [np.nan], [np.nan]), ([5.0], [-1.0], [0.5])]
    count, mean, var = spec.merge_moments(parts)
    assert count[0] == 8.0
    np.testing.assert_allclose(mean, [(3 * 1.0 + 5 * -1.0) / 8], rtol=1e-15)
    # M2 = 3*2 + 5*0.5 + d^2 * 3*5/8 with d = -2: (6 + 2.5 + 7.5) / 8 = 2
    np.testing.assert_allclose(var, [2.0], rtol=1e-15)


# ----------------------------------------------------------------------------------- empty training batch (SPEC §9)

# (layout, shape, channel axis, what is empty)
EMPTY_BATCHES = [
    ("nc", (0, 3), 1, "0-rows"),
    ("nchw", (0, 3, 4, 4), 1, "0-rows"),
    ("nhwc", (0, 4, 4, 3), -1, "0-rows"),
    ("ncl", (2, 3, 0), 1, "empty-length"),
]


@pytest.mark.parametrize(
    ("shape", "axis", "dtype"),
    [
        case(shape, axis, dtype, layout=layout, dtype=dtype, detail=empty)
        for layout, shape, axis, empty in EMPTY_BATCHES
        for dtype in ("float16", "float32", "float64")
    ],
)
def test_empty_training_batch_gives_empty_output_and_no_statistic(shape, axis, dtype):
    x = np.zeros(shape, dtype)
    y, mean, var = spec.batch_norm_train(x, G, B, axis=axis)
    assert y.shape == shape and y.dtype == x.dtype
    assert np.isnan(mean).all() and np.isnan(var).all() and mean.shape == var.shape == (3,)
    dx, dgamma, dbeta = spec.batch_norm_backward(x, x, G, axis=axis)
    assert dx.shape == shape and dx.dtype == x.dtype
    # Sums over no values are exactly 0 (PyTorch's weight/bias gradients for an empty batch, test below).
    np.testing.assert_array_equal(dgamma, np.zeros(3))
    np.testing.assert_array_equal(dbeta, np.zeros(3))


# Every convention, with the counter its update needs (Caffe always, torch for momentum=None).
EMPTY_UPDATES = {
    **{c.name: {"convention": c.name} for c in spec.list_conventions() if c.name != "caffe"},
    "caffe": {"convention": "caffe", "num_batches_tracked": 5},
    "torch-cumulative": {"convention": "torch", "momentum": None, "num_batches_tracked": 5},
}


@pytest.mark.parametrize("name", list(EMPTY_UPDATES))
def test_empty_batch_leaves_moving_statistics_unchanged(name):
    running_mean, running_var = np.array([0.5, -2.0, 3.0]), np.array([1.5, 0.25, 4.0])
    _, mean, var = spec.batch_norm_train(np.zeros((0, 3)), G, B)
    new_mean, new_var = spec.update_running_stats(running_mean, running_var, mean, var, 0, **EMPTY_UPDATES[name])
    np.testing.assert_array_equal(new_mean, running_mean)  # bit-identical: nothing was averaged in
    np.testing.assert_array_equal(new_var, running_var)


@pytest.mark.parametrize("convention", ["keras", "torch"])  # biased and unbiased (Bessel) updates
def test_an_empty_channel_keeps_its_statistics_and_the_others_update(convention):
    running_mean, running_var = np.array([0.5, -2.0, 3.0]), np.array([1.5, 0.25, 4.0])
    batch_mean, batch_var = np.array([1.0, np.nan, 2.0]), np.array([2.0, np.nan, 0.5])
    count = np.array([8.0, 0.0, 8.0])
    new_mean, new_var = spec.update_running_stats(
        running_mean, running_var, batch_mean, batch_var, count, convention=convention
    )
    full_mean, full_var = spec.update_running_stats(
        running_mean, running_var, np.nan_to_num(batch_mean), np.nan_to_num(batch_var), 8, convention=convention
    )
    assert (new_mean[1], new_var[1]) == (running_mean[1], running_var[1])
    np.testing.assert_array_equal(new_mean[[0, 2]], full_mean[[0, 2]])
    np.testing.assert_array_equal(new_var[[0, 2]], full_var[[0, 2]])


def test_empty_batch_matches_pytorch():
    """Peer oracle: torch.nn.BatchNorm2d on 0 rows returns an empty output, keeps its running statistics, gives
    zero weight/bias gradients, and still increments num_batches_tracked (SPEC.md §9)."""
    torch = pytest.importorskip("torch")
    running_mean, running_var = np.array([0.5, -2.0, 3.0]), np.array([1.5, 0.25, 4.0])
    bn = torch.nn.BatchNorm2d(3, momentum=None).double().train()
    bn.running_mean.copy_(torch.from_numpy(running_mean))
    bn.running_var.copy_(torch.from_numpy(running_var))
    bn.num_batches_tracked.fill_(5)
    x = np.zeros((0, 3, 4, 4))
    bn(torch.from_numpy(x)).sum().backward()
    y, mean, var = spec.batch_norm_train(x, G, B, axis=1)
    new_mean, new_var = spec.update_running_stats(
        running_mean, running_var, mean, var, 0, convention="torch", momentum=None, num_batches_tracked=5
    )
    _, dgamma, dbeta = spec.batch_norm_backward(x, x, G, axis=1)
    np.testing.assert_array_equal(bn.running_mean.numpy(), new_mean)
    np.testing.assert_array_equal(bn.running_var.numpy(), new_var)
    np.testing.assert_array_equal(bn.weight.grad.numpy(), dgamma)
    np.testing.assert_array_equal(bn.bias.grad.numpy(), dbeta)
    assert int(bn.num_batches_tracked) == 6  # the empty step counts, as SPEC.md §9 says


# ------------------------------------------------------------------------------------------------ python -m spec


def _vector_dir(tmp_path, case: str) -> list[str]:
    if case == "missing-dir":
        return ["--check-vectors", str(tmp_path / "nowhere")]
    if case == "manifest-not-json":
        (tmp_path / "manifest.json").write_text("not json")
        return ["--check-vectors", str(tmp_path)]
    if case == "manifest-wrong-layout":
        (tmp_path / "manifest.json").write_text("{}")
        return ["--check-vectors", str(tmp_path)]
    if case == "write-into-a-file":
        (tmp_path / "file").write_text("")
        return ["--write-vectors", str(tmp_path / "file" / "vectors")]
    raise AssertionError(case)


CLI_ERRORS = {
    "missing-dir": "No such file or directory",
    "manifest-not-json": "Expecting value",
    "manifest-wrong-layout": "missing key 'cases'",
    "write-into-a-file": "Not a directory",
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_python_m_spec_bad_dir_exits_2_with_one_line(tmp_path, capsys, case):
    from spec.__main__ import main

    argv = _vector_dir(tmp_path, case)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m spec: error: ")
    assert argv[1] in err and CLI_ERRORS[case] in err


def test_python_m_spec_bad_argument_exits_2_with_one_line(capsys):
    from spec.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--check-vectors", "a", "--write-vectors", "b"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("python -m spec: error: argument --write-vectors: not allowed with argument --check-vectors")


def test_python_m_spec_error_has_no_traceback_in_a_real_process(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "spec", "--check-vectors", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
