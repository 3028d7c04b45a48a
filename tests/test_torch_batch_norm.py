"""torch_ref.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d (peer) and the NumPy spec.

Tolerances. float64: both sides are exact formulas in double, differing only in summation order,
so 1e-12 relative to the largest value. float32: ours computes moments in float32, ATen's CPU
kernel accumulates them in double; a float32 pairwise sum over m <= 1e3 values carries about
log2(m) * 6e-8 ~ 1e-6 relative error, so 1e-5 relative (~80 ulp) bounds every output, gradient
and running statistic with room, and still fails on any formula error (those are O(1/m) >= 1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import case
from numerics import close, tolerance

import spec
import torch_ref

TOL = {dtype: tolerance("summation-order", dtype) for dtype in (torch.float32, torch.float64)}

# (ours, peer, input shape with channels at dim 1)
SHAPES = {
    "1d-NC": (torch_ref.BatchNorm1d, torch.nn.BatchNorm1d, (16, 5)),
    "1d-NCL": (torch_ref.BatchNorm1d, torch.nn.BatchNorm1d, (8, 5, 7)),
    "2d-NCHW": (torch_ref.BatchNorm2d, torch.nn.BatchNorm2d, (6, 4, 5, 3)),
    "3d-NCDHW": (torch_ref.BatchNorm3d, torch.nn.BatchNorm3d, (4, 3, 3, 4, 2)),
}
# (momentum, affine, track_running_stats)
CONFIGS = {
    "momentum0.1": (0.1, True, True),
    "momentumNone": (None, True, True),
    "no-affine": (0.1, False, True),
    "no-tracking": (0.1, True, False),
}


def _pair(shape_id: str, config_id: str, dtype: torch.dtype):
    ours_cls, peer_cls, shape = SHAPES[shape_id]
    momentum, affine, track = CONFIGS[config_id]
    channels = shape[1]
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    ours, peer = ours_cls(channels, **kwargs), peer_cls(channels, **kwargs)
    if affine:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            ours.weight.copy_(torch.rand(channels, generator=gen, dtype=dtype) + 0.5)
            ours.bias.copy_(torch.randn(channels, generator=gen, dtype=dtype))
    peer.load_state_dict(ours.state_dict())  # checkpoints load across implementations
    return ours, peer, shape


STEP_CASES = [
    case(
        shape_id,
        config_id,
        dtype,
        peer=f"torch.nn.BatchNorm{shape_id.split('-')[0]}",
        layout=shape_id.split("-")[1],
        dtype=str(dtype).removeprefix("torch."),
        detail=config_id,
    )
    for shape_id in SHAPES
    for dtype in (torch.float32, torch.float64)
    for config_id in CONFIGS
]


@pytest.mark.parametrize(("shape_id", "config_id", "dtype"), STEP_CASES)
def test_training_steps_match_torch_nn(shape_id: str, config_id: str, dtype: torch.dtype) -> None:
    """20 training steps (forward, backward, SGD on gamma/beta), then eval: every tensor equal to torch.nn's."""
    ours, peer, shape = _pair(shape_id, config_id, dtype)
    tol = TOL[dtype]
    gen = torch.Generator().manual_seed(7)
    channel_shape = (1, -1) + (1,) * (len(shape) - 2)
    for step in range(20):
        # Per-channel offsets and scales far from (0, 1), so moments and running stats move.
        loc = (torch.randn(shape[1], generator=gen, dtype=dtype) * 3).view(channel_shape)
        scale = (torch.rand(shape[1], generator=gen, dtype=dtype) * 4 + 0.1).view(channel_shape)
        x = torch.randn(shape, generator=gen, dtype=dtype) * scale + loc
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        x_ours, x_peer = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_peer = ours(x_ours), peer(x_peer)
        y_ours.backward(dy)
        y_peer.backward(dy)
        close(y_ours.detach(), y_peer.detach(), tol, scale="magnitude", what=f"step {step} y")
        close(x_ours.grad, x_peer.grad, tol, scale="magnitude", what=f"step {step} dx")
        if ours.affine:
            close(ours.weight.grad, peer.weight.grad, tol, scale="magnitude", what=f"step {step} dweight")
            close(ours.bias.grad, peer.bias.grad, tol, scale="magnitude", what=f"step {step} dbias")
            with torch.no_grad():  # each follows its own gradients, so differences would compound
                for module in (ours, peer):
                    for p in module.parameters():
                        p -= 0.1 * p.grad
                        p.grad = None
        if ours.track_running_stats:
            close(ours.running_mean, peer.running_mean, tol, scale="magnitude", what=f"step {step} running_mean")
            close(ours.running_var, peer.running_var, tol, scale="magnitude", what=f"step {step} running_var")
            assert int(ours.num_batches_tracked) == int(peer.num_batches_tracked) == step + 1
    ours.eval()
    peer.eval()
    x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 1
    close(ours(x), peer(x), tol, scale="magnitude", what="eval y")
    assert y_ours.dtype == dtype


# momentum reassigned between training steps, as a schedule would (torch.nn reads self.momentum every forward)
MOMENTUM_SCHEDULES = {
    "fixed-to-fixed": [0.1, 0.1, 0.5, 0.5, 0.02],
    "fixed-to-cumulative": [0.1, 0.1, None, None, 0.3],
}


@pytest.mark.parametrize(
    ("schedule_id", "dtype"),
    [
        case(schedule_id, dtype, peer="torch.nn.BatchNorm2d", layout="NCHW", dtype=str(dtype)[6:], detail=schedule_id)
        for schedule_id in MOMENTUM_SCHEDULES
        for dtype in (torch.float32, torch.float64)
    ],
)
def test_momentum_reassigned_between_steps_takes_effect_as_in_torch_nn(schedule_id: str, dtype: torch.dtype) -> None:
    """The update rule is cached by (momentum, convention): a new momentum must still apply from the next step."""
    ours, peer, shape = _pair("2d-NCHW", "momentum0.1", dtype)
    gen = torch.Generator().manual_seed(3)
    for step, momentum in enumerate(MOMENTUM_SCHEDULES[schedule_id]):
        ours.momentum = peer.momentum = momentum
        x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 1
        ours(x), peer(x)
        # the statistics' own rounding only (SUMMATION-ORDER tolerance, see the module docstring)
        close(ours.running_mean, peer.running_mean, TOL[dtype], scale="magnitude", what=f"step {step} running_mean")
        close(ours.running_var, peer.running_var, TOL[dtype], scale="magnitude", what=f"step {step} running_var")


def test_momentum_reassigned_out_of_range_raises_on_every_step() -> None:
    """A momentum outside [0, 1] set after construction is refused by spec's check each step (never cached)."""
    bn = torch_ref.BatchNorm1d(3).train()
    bn.momentum = 1.5
    x = torch.randn(8, 3)
    for _ in range(2):
        with pytest.raises(ValueError, match="momentum"):
            bn(x)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
def test_forward_backward_and_running_stats_match_spec(momentum: float | None, rng: np.random.Generator) -> None:
    """float64, 2-D: y, dx, dgamma, dbeta vs spec.batch_norm_train/backward; stats vs spec.update_running_stats."""
    bn = torch_ref.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    gamma, beta = rng.uniform(0.5, 1.5, 3), rng.normal(size=3)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
    mean, var = np.zeros(3), np.ones(3)
    for step in range(5):
        x = rng.normal(2.0, 3.0, size=(4, 3, 5, 5))
        dy = rng.normal(size=x.shape)
        xt = torch.from_numpy(x).requires_grad_()
        y = bn(xt)
        y.backward(torch.from_numpy(dy))
        y_ref, batch_mean, batch_var = spec.batch_norm_train(x, gamma, beta, axis=1, eps=1e-5)
        dx_ref, dgamma_ref, dbeta_ref = spec.batch_norm_backward(dy, x, gamma, axis=1, eps=1e-5)
        mean, var = spec.update_running_stats(
            mean, var, batch_mean, batch_var, 4 * 5 * 5, convention="torch", momentum=momentum, num_batches_tracked=step
        )
        # float64 on both sides, different summation order: 1e-12 relative.
        np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(xt.grad.numpy(), dx_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(bn.weight.grad.numpy(), dgamma_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bn.bias.grad.numpy(), dbeta_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(bn.running_var.numpy(), var, rtol=1e-12, atol=1e-14)
        bn.zero_grad()


@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=["momentum0.1", "momentum0.5", "momentumNone"])
def test_spec_torch_convention_matches_torch_nn(momentum: float | None, rng: np.random.Generator) -> None:
    """spec.update_running_stats(convention='torch') reproduces torch.nn.BatchNorm1d's buffers, incl. None."""
    peer = torch.nn.BatchNorm1d(4, momentum=momentum, dtype=torch.float64)
    mean, var = np.zeros(4), np.ones(4)
    for step in range(6):
        x = rng.normal(1.0, 2.0, size=(5, 4))
        peer(torch.from_numpy(x))
        _, batch_mean, batch_var = spec.batch_norm_train(x, np.ones(4), np.zeros(4), axis=1)
        mean, var = spec.update_running_stats(
            mean, var, batch_mean, batch_var, 5, convention="torch", momentum=momentum, num_batches_tracked=step
        )
        # float64 both; torch divides var_sum by (n - 1), the spec multiplies var by n / (n - 1).
        np.testing.assert_allclose(peer.running_mean.numpy(), mean, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(peer.running_var.numpy(), var, rtol=1e-13, atol=1e-15)


def test_low_precision_input_is_computed_in_float32() -> None:
    """bfloat16 input: computed in float32 and cast back, like ATen; agrees with torch.nn to bfloat16 rounding."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 4, 6, 6, generator=gen) * 2 + 1).to(torch.bfloat16)
    ours, peer = torch_ref.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    y_ours, y_peer = ours(x), peer(x)
    assert y_ours.dtype == torch.bfloat16
    # Both round a float32 result to bfloat16 (8 bits of mantissa): at most 1 ulp = 2^-7 relative apart.
    close(
        y_ours.float(), y_peer.float(), tolerance("summation-order", "bfloat16"), scale="magnitude", what="bfloat16 y"
    )
    close(ours.running_var, peer.running_var, TOL[torch.float32], scale="magnitude", what="running_var")


CHECKPOINT_CONFIGS = {
    "default": {},
    "no-affine": {"affine": False},
    "no-bias": {"bias": False},
    "no-tracking": {"track_running_stats": False},
}


@pytest.mark.parametrize("config_id", list(CHECKPOINT_CONFIGS))
@pytest.mark.parametrize("dim", ["1d", "2d", "3d"])
def test_state_dict_keys_shapes_and_loading_match_torch_nn(dim: str, config_id: str) -> None:
    kwargs = CHECKPOINT_CONFIGS[config_id]
    ours = getattr(torch_ref, f"BatchNorm{dim}")(5, **kwargs)
    peer = getattr(torch.nn, f"BatchNorm{dim}")(5, **kwargs)
    ours_sd, peer_sd = ours.state_dict(), peer.state_dict()
    assert list(ours_sd) == list(peer_sd)
    assert {k: (v.shape, v.dtype) for k, v in ours_sd.items()} == {k: (v.shape, v.dtype) for k, v in peer_sd.items()}
    assert ours_sd._metadata[""]["version"] == peer_sd._metadata[""]["version"]
    if "running_mean" in peer_sd:  # non-default values must survive both directions
        with torch.no_grad():
            peer.running_mean.copy_(torch.arange(5.0))
            peer.num_batches_tracked.fill_(17)
        ours.load_state_dict(peer.state_dict())
        assert torch.equal(ours.running_mean, torch.arange(5.0)) and int(ours.num_batches_tracked) == 17
        peer.reset_running_stats()
        peer.load_state_dict(ours.state_dict())
        assert torch.equal(peer.running_mean, torch.arange(5.0)) and int(peer.num_batches_tracked) == 17


def _drop(sd: dict, key: str) -> dict:
    return {k: v for k, v in sd.items() if k != key}


BAD_STATE_DICTS = {
    "missing-running_var": (lambda sd: _drop(sd, "running_var"), "running_var"),
    "missing-weight": (lambda sd: _drop(sd, "weight"), "weight"),
    "extra-key": (lambda sd: {**sd, "running_std": torch.ones(4)}, "running_std"),
    "wrong-shape-bias": (lambda sd: {**sd, "bias": torch.zeros(5)}, "bias"),
    "wrong-shape-running_mean": (lambda sd: {**sd, "running_mean": torch.zeros(2, 2)}, "running_mean"),
}


@pytest.mark.parametrize("case", list(BAD_STATE_DICTS))
def test_bad_state_dict_raises_naming_the_key(case: str) -> None:
    """Strict loading (torch's own machinery, RuntimeError as torch.nn raises) names the offending key."""
    edit, key = BAD_STATE_DICTS[case]
    ours = torch_ref.BatchNorm2d(4)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(RuntimeError, match=rf'"?{key}"?'):
        ours.load_state_dict(edit(torch.nn.BatchNorm2d(4).state_dict()))
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


BAD_INPUTS = {
    "1d-rank4": (lambda: torch_ref.BatchNorm1d(3), torch.zeros(2, 3, 4, 4), ValueError, "2D or 3D"),
    "2d-rank3": (lambda: torch_ref.BatchNorm2d(3), torch.zeros(2, 3, 4), ValueError, "4D"),
    "3d-rank4": (lambda: torch_ref.BatchNorm3d(3), torch.zeros(2, 3, 4, 4), ValueError, "5D"),
    "channels": (lambda: torch_ref.BatchNorm2d(3), torch.zeros(2, 4, 4, 4), ValueError, "4 channels"),
    "one-value-per-channel": (lambda: torch_ref.BatchNorm1d(3), torch.zeros(1, 3), ValueError, "more than 1 value"),
    "integer-input": (lambda: torch_ref.BatchNorm1d(3), torch.zeros(2, 3, dtype=torch.long), TypeError, "floating"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises(case: str) -> None:
    make, x, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        make()(x)


BAD_CONSTRUCTOR_ARGUMENTS = {
    # torch.nn accepts every one of these at construction (a stricter drop-in).
    "num_features-0": ({"num_features": 0}, ValueError, "num_features"),
    "num_features-float": ({"num_features": 3.0}, ValueError, "num_features"),
    "num_features-bool": ({"num_features": True}, ValueError, "num_features"),
    "eps-nan": ({"eps": float("nan")}, ValueError, "eps"),
    "eps-str": ({"eps": "1e-5"}, ValueError, "eps"),
    "momentum-1.5": ({"momentum": 1.5}, ValueError, "momentum"),
    "momentum-bool": ({"momentum": True}, ValueError, "momentum"),
    "affine-int": ({"affine": 1}, TypeError, "affine"),
    "track_running_stats-str": ({"track_running_stats": "yes"}, TypeError, "track_running_stats"),
    "bias-none": ({"bias": None}, TypeError, "bias"),
}


@pytest.mark.parametrize("case", list(BAD_CONSTRUCTOR_ARGUMENTS))
def test_bad_constructor_arguments_raise_naming_the_argument(case: str) -> None:
    kwargs, error, message = BAD_CONSTRUCTOR_ARGUMENTS[case]
    with pytest.raises(error, match=message):
        torch_ref.BatchNorm1d(**{"num_features": 3, **kwargs})


@pytest.mark.parametrize("channel_dim", [1, -1], ids=["NCL-dim1", "NLC-dim-1"])
def test_gradcheck_float64(channel_dim: int) -> None:
    """Closed-form backward, its double backward and the jvp vs finite differences (gradcheck, float64)."""
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def y(a, w, b):
        return torch_ref.batch_norm_train(a, w, b, 1e-5, channel_dim=channel_dim)[0]

    assert torch.autograd.gradcheck(y, (x, weight, bias), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(y, (x, weight, bias))


@pytest.mark.parametrize(
    ("shape", "channel_dim"),
    [((6, 5, 4, 3), -1), ((6, 5, 4, 3), 3), ((6, 5, 4, 3), 2), ((8, 7, 5), -1), ((16, 5), 1)],
    ids=["NHWC-dim-1", "NHWC-dim3", "NHcW-dim2", "NLC-dim-1", "NC-dim1"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_batch_norm_train_at_any_channel_dim_matches_torch_nn_on_moved_channels(
    shape: tuple[int, ...], channel_dim: int, dtype: torch.dtype
) -> None:
    """``batch_norm_train(..., channel_dim=d)`` (channels_last for Keras' torch backend) against ATen's BN on the
    same values with the channels moved to dim 1: y, batch statistics and the gradients of x, weight, bias."""
    gen = torch.Generator().manual_seed(3)
    x = (2.0 + 3.0 * torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_()
    channels = shape[channel_dim]
    weight = (torch.rand(channels, generator=gen, dtype=dtype) + 0.5).requires_grad_()
    bias = torch.randn(channels, generator=gen, dtype=dtype).requires_grad_()
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    y, mean, var = torch_ref.batch_norm_train(x, weight, bias, 1e-5, channel_dim=channel_dim)
    grads = torch.autograd.grad(y, [x, weight, bias], dy)

    x_peer = x.detach().movedim(channel_dim, 1).requires_grad_()
    y_peer = torch.nn.functional.batch_norm(x_peer, None, None, weight, bias, training=True, eps=1e-5)
    grads_peer = torch.autograd.grad(y_peer, [x_peer, weight, bias], dy.movedim(channel_dim, 1))
    x_moved = x.detach().movedim(channel_dim, 1)
    dims = [0, *range(2, x.dim())]
    tol = TOL[dtype]
    close(y, y_peer.movedim(1, channel_dim), tol, scale="magnitude", what="y")
    close(mean, x_moved.mean(dim=dims), tol, scale="magnitude", what="batch mean")
    close(var, x_moved.var(dim=dims, unbiased=False), tol, scale="magnitude", what="biased batch variance")
    close(grads[0], grads_peer[0].movedim(1, channel_dim), tol, scale="magnitude", what="dx")
    close(grads[1], grads_peer[1], tol, scale="magnitude", what="dweight")
    close(grads[2], grads_peer[2], tol, scale="magnitude", what="dbias")


def test_batch_norm_train_refuses_a_channel_dim_out_of_range() -> None:
    with pytest.raises(ValueError, match="channel_dim 4 is out of range for 4D input"):
        torch_ref.batch_norm_train(torch.zeros(2, 3, 4, 5), None, None, channel_dim=4)


def test_large_offset_float32_is_at_least_as_accurate_as_torch_nn(capsys) -> None:
    """x = 1e4 + U(-1, 1) in float32: error of y against spec's float64 on the same x, ours vs torch.nn.

    The reference must be at least as accurate as what it checks. torch.nn accumulates the mean in
    double but subtracts it in float32 after rounding it to float32 (ulp(1e4) ~ 1e-3, so y errs by
    ~1e-3 / std); ours corrects a float32 mean estimate by the mean of the residuals (~ulp(std)).
    Bound for ours: a few float32 ulps of |y| <= 1.8, i.e. 1e-5; the first pass alone errs ~1e-3.
    """
    gen = torch.Generator().manual_seed(0)
    x = 1e4 + (torch.rand(32, 8, 16, 16, generator=gen) * 2 - 1)
    exact, _, _ = spec.batch_norm_train(x.double().numpy(), np.ones(8), np.zeros(8), axis=1, eps=1e-5)
    errors = {}
    for name, module in (("torch.nn", torch.nn.BatchNorm2d(8)), ("torch_ref", torch_ref.BatchNorm2d(8))):
        errors[name] = float(np.abs(module(x).detach().double().numpy() - exact).max())
    with capsys.disabled():
        print(f"\n[x = 1e4 + U(-1,1), float32] max |y - y_float64|: {errors}")
    assert errors["torch_ref"] <= errors["torch.nn"]
    assert errors["torch_ref"] <= 1e-5


EMPTY_BATCH_CONFIGS = {
    "momentum0.1": {"momentum": 0.1},
    "momentumNone": {"momentum": None},
    "no-affine": {"affine": False},
    "no-tracking": {"track_running_stats": False},
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config_id", list(EMPTY_BATCH_CONFIGS))
def test_empty_batch_returns_empty_output_and_leaves_statistics(config_id: str, training: bool) -> None:
    """0 rows (issue 9): an empty output and gradients; statistics unchanged, counter +1 in training, as torch.nn."""
    kwargs = EMPTY_BATCH_CONFIGS[config_id]
    ours, peer = torch_ref.BatchNorm2d(4, **kwargs), torch.nn.BatchNorm2d(4, **kwargs)
    ours.train(training), peer.train(training)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x_ours, x_peer = (torch.zeros(0, 4, 3, 3, requires_grad=True) for _ in range(2))
    y_ours, y_peer = ours(x_ours), peer(x_peer)
    assert y_ours.shape == y_peer.shape == (0, 4, 3, 3)
    y_ours.sum().backward()
    y_peer.sum().backward()
    assert x_ours.grad.shape == x_peer.grad.shape
    for (name, p_ours), (_, p_peer) in zip(ours.named_parameters(), peer.named_parameters(), strict=True):
        assert torch.equal(p_ours.grad, p_peer.grad), name  # zeros on both sides
    for key, value in ours.state_dict().items():
        if key == "num_batches_tracked":
            assert int(value) == int(peer.num_batches_tracked) == int(before[key]) + training
        else:
            assert torch.equal(value, before[key]), key


def test_version_1_checkpoint_without_counter_loads_as_in_torch_nn() -> None:
    """Checkpoints from before num_batches_tracked (state_dict version 1) load; the counter starts at 0."""
    old = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        old.running_mean.fill_(2.0)
    state = old.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    for module in (torch_ref.BatchNorm2d(3), torch.nn.BatchNorm2d(3)):
        module.load_state_dict(state)
        assert torch.equal(module.running_mean, torch.full((3,), 2.0)) and int(module.num_batches_tracked) == 0


MIXED_DTYPES = {
    "float64-into-float32": (torch.float32, torch.float64, False),
    "float32-into-float64": (torch.float64, torch.float32, False),
    "float32-into-bfloat16": (torch.bfloat16, torch.float32, False),
    "bfloat16-into-float32": (torch.float32, torch.bfloat16, True),
    "float16-into-float32": (torch.float32, torch.float16, True),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(MIXED_DTYPES))
def test_mixed_dtypes_follow_torch_nn(case: str, training: bool) -> None:
    """Input and module dtypes must agree, except float16/bfloat16 input into float32 parameters (as torch.nn)."""
    module_dtype, input_dtype, accepted = MIXED_DTYPES[case]
    x = torch.randn(4, 3, dtype=torch.float32).to(input_dtype)
    for module in (torch.nn.BatchNorm1d(3, dtype=module_dtype), torch_ref.BatchNorm1d(3, dtype=module_dtype)):
        module.train(training)
        if accepted:
            assert module(x).dtype == input_dtype
        else:
            with pytest.raises(RuntimeError, match="mixed dtype"):
                module(x)


@pytest.mark.parametrize(
    "eps, training, message",
    [(0.0, True, "positive"), (-1.0, True, "positive"), (-1.0, False, "non-negative"), (0.0, False, None)],
    ids=["eps0-train", "eps-1-train", "eps-1-eval", "eps0-eval"],
)
def test_eps_range_is_checked_at_forward_as_torch_nn(eps: float, training: bool, message: str | None) -> None:
    """torch.nn takes any eps at construction; training needs eps > 0, eval eps >= 0 (same messages)."""
    x = torch.randn(4, 3)
    for module in (torch.nn.BatchNorm1d(3, eps=eps), torch_ref.BatchNorm1d(3, eps=eps)):
        module.train(training)
        if message is None:
            assert torch.isfinite(module(x)).all()
        else:
            with pytest.raises(ValueError, match=f"eps must be {message}"):
                module(x)


def _refuse(*args, **kwargs):
    raise AssertionError("torch_ref called a library batch norm or NumPy")


ATEN_BATCH_NORM = [
    (torch.nn.functional, "batch_norm"),
    (torch, "batch_norm"),
    (torch, "native_batch_norm"),
    (torch, "_native_batch_norm_legit"),
]
NUMPY_BRIDGE = [(torch.Tensor, "numpy"), (torch, "from_numpy")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_aten_batch_norm_on_the_path(training: bool, monkeypatch) -> None:
    """From scratch: forward, update and backward never reach ATen's BN kernels."""
    for owner, name in ATEN_BATCH_NORM:
        monkeypatch.setattr(owner, name, _refuse)
    bn = torch_ref.BatchNorm2d(3, momentum=None).train(training)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    bn(x).sum().backward()
    assert x.grad is not None and int(bn.num_batches_tracked) == int(training)


# (convention, momentum in PyTorch's meaning): every update rule, the counter-driven ones included
UPDATE_RULES = [
    ("torch", 0.1),
    ("torch", None),
    ("d2l", 0.1),
    ("keras", 0.01),
    ("onnx", 0.1),
    ("tf1", 0.3),
    ("caffe", 0.001),
]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shapes become constants: fixed-shape batches
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("convention, momentum", UPDATE_RULES, ids=[f"{c}-momentum{m}" for c, m in UPDATE_RULES])
def test_traced_update_records_torch_ops_with_the_eager_bits(
    convention: str, momentum: float | None, dtype: torch.dtype, monkeypatch
) -> None:
    """Eager CPU training updates the running statistics inside its recorded replay, after the forward (float64,
    like ATen's CPU kernel); a user's graph capture must record the update itself (``torch.jit.trace`` here, with
    NumPy refused while tracing), after the Function. Oracle: the eager module, whose steps run another
    mechanism (a replay) on the same float64 operations: the buffers are equal bit for bit over several batches."""
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 3, 4, 4, generator=gen, dtype=dtype) * (i + 1) + i for i in range(4)]
    eager, traced = (torch_ref.BatchNorm2d(3, momentum=momentum, convention=convention, dtype=dtype) for _ in "ab")
    with monkeypatch.context() as numpy_refused:
        for owner, name in NUMPY_BRIDGE:
            numpy_refused.setattr(owner, name, _refuse)
        traced_forward = torch.jit.trace(traced, batches[0], check_trace=False)  # traces (and runs) batch 0
    eager(batches[0])
    for x in batches[1:]:
        eager(x)
        traced_forward(x)
    assert int(traced.num_batches_tracked) == int(eager.num_batches_tracked) == len(batches)
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(traced, name), getattr(eager, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["float32", "float64", "float16"])
@pytest.mark.parametrize("convention, momentum", UPDATE_RULES, ids=[f"{c}-momentum{m}" for c, m in UPDATE_RULES])
def test_host_and_torch_updates_have_the_same_bits(convention: str, momentum: float | None, dtype: torch.dtype) -> None:
    """spec's update runs as NumPy on the buffers' host memory (direct calls, synchronized steps) or as torch ops
    (eager steps, recorded with the forward; graph captures). Oracle: the two are independent implementations of
    the same float64 operations, so over several batches the buffers stay equal bit for bit (float16 buffers:
    rounded through float32 both ways, test_host_update_rounds_half_buffers_as_torch_does)."""
    gen = torch.Generator().manual_seed(3)
    statistics_dtype = torch.float32 if dtype == torch.float16 else dtype  # half input computes in float32
    host, ops = (torch_ref.BatchNorm1d(4, momentum=momentum, convention=convention, dtype=dtype) for _ in "ab")
    for step in range(5):
        mean = (torch.randn(4, generator=gen, dtype=torch.float64) * (step + 1) + 3.0).to(statistics_dtype)
        var = (torch.rand(4, generator=gen, dtype=torch.float64) * (step + 1)).to(statistics_dtype)
        for bn, on_host in ((host, True), (ops, False)):
            bn.num_batches_tracked.add_(1)  # counted first, as the module's forward does
            buffers = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
            update = torch_ref.batch_norm._Update(*buffers, 9, momentum, convention)
            torch_ref.batch_norm._update_statistics(update, mean, var, host=on_host)
    for name in ("running_mean", "running_var"):
        assert torch.equal(getattr(host, name), getattr(ops, name)), name
    assert not torch.equal(host.running_var, torch.ones(4, dtype=dtype))  # the buffers moved


def _double_rounding_variance(count: int) -> float:
    """A float32 batch variance whose Bessel-corrected value ``v * count / (count - 1)`` (float64) lies so close
    above a float16 halfway point that rounding it to float16 directly and through float32 differ."""
    steps = np.arange(-3000, 3000, dtype=np.float32) * np.float32(2.0**-14)  # float32 spacing just below 1024
    for v in np.float32(1024.5 * (count - 1) / count) + steps:
        unbiased = float(v) * count / (count - 1)
        if np.float16(unbiased) != np.float16(np.float32(unbiased)):
            return float(v)
    raise AssertionError(f"no float32 variance near 1024.5 * {count - 1} / {count} rounds differently")


def test_host_update_rounds_half_buffers_as_torch_does() -> None:
    """float16 buffers on the host path: the float64 average is rounded as torch's ``copy_`` rounds it (through
    float32), not as NumPy's direct float64 -> float16 conversion would. Oracle: torch's own conversion of the
    hand-computed average (momentum 1: the buffer becomes the unbiased batch variance), on a value chosen so
    that the two roundings differ."""
    count = 7
    var = _double_rounding_variance(count)
    unbiased = var * count / (count - 1)
    bn = torch_ref.BatchNorm1d(1, momentum=1.0).half()
    bn.num_batches_tracked.add_(1)  # the caller counts the batch first, as the module's forward does
    torch_ref.batch_norm.update_running_stats_(
        bn.running_mean, bn.running_var, bn.num_batches_tracked, torch.zeros(1), torch.tensor([var]), count, 1.0
    )
    expected = torch.tensor([unbiased], dtype=torch.float64).to(torch.float16)
    assert float(np.float16(unbiased)) != float(expected[0])  # the case tells the two roundings apart
    assert torch.equal(bn.running_var, expected)


def _plain_namespace_seen(run) -> bool:
    """Whether torch_ref lets spec skip its per-op in-place checks for a tensor inside ``run(probe)``."""
    seen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch_ref.batch_norm._namespace_for(x).plain_tensors)
        return x.sum()

    run(probe)
    return seen[0]


def _without_grad(probe) -> None:
    with torch.no_grad():
        probe(torch.randn(3, 2))


# context -> (runs the probe there, whether the per-op checks may be skipped)
NAMESPACE_CONTEXTS = {
    "eager-no-grad": (_without_grad, True),
    "grad-recording": (lambda probe: probe(torch.randn(3, 2)), False),
    "torch.func.vmap": (lambda probe: torch.func.vmap(probe)(torch.randn(3, 2)), False),
    "torch.func.grad": (lambda probe: torch.func.grad(probe)(torch.randn(3, 2)), False),
    "torch.func.grad-no-grad-inside": (
        lambda probe: torch.func.grad(lambda x: _no_grad_sum(probe, x))(torch.randn(3)),
        False,
    ),
}


def _no_grad_sum(probe, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        probe(x)
    return x.sum()


@pytest.mark.parametrize("context", list(NAMESPACE_CONTEXTS))
def test_in_place_checks_are_skipped_only_for_plain_tensors_outside_autograd(context: str) -> None:
    """torch_ref checks once per forward/backward what spec's Namespace would check before each in-place op: plain
    tensors, autograd not recording, no torch.func transform. Only then may it skip the per-op checks."""
    run, plain = NAMESPACE_CONTEXTS[context]
    assert _plain_namespace_seen(run) is plain
