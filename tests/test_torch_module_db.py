"""torch_ref.BatchNorm1d/2d/3d on PyTorch's own module test data (``common_modules.module_db``).

The torch wheel ships the sample inputs and error inputs that PyTorch's ``test/test_modules.py``
runs on ``torch.nn.BatchNorm1d/2d/3d``. This file walks them (read from the installed torch at
test time, never copied) in float32 and float64, training and eval, and checks what
test_modules.py checks, with checks written here: forward, running statistics and counter,
gradients, gradcheck/gradgradcheck, state_dict round trips, pickle/deepcopy, non-contiguous and
channels_last input, factory kwargs, dtype conversion, repr, and the error inputs with torch's
messages. The oracle is ``torch.nn.BatchNorm*d`` on the same state, or finite differences.

Tolerances. float64: exact formulas in double differing in summation order: 1e-12 relative to
the largest value. float32: ours accumulates in float32 (corrected two-pass), ATen in double;
the samples have <= 200 values per channel in [-9, 9], so pairwise sums carry ~log2(200) * 6e-8
~ 5e-7 relative error: 1e-5 relative bounds every output, gradient and statistic with margin
and still fails on any formula error (those are O(1/m) >= 5e-3 here).

Deliberate differences from ``torch.nn`` are listed in ``DIFFERENCES`` and tested there.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from _bn_state import randomize_bn_state_
from cases import case
from numerics import EXACT, Tolerance, close, tolerance
from torch import nn

# torch's test utilities import expecttest (in the project's test extra); a missing one must fail, not skip.
from torch.testing._internal import common_modules

import torch_ref

ModuleErrorEnum = common_modules.ModuleErrorEnum

OURS = {
    nn.BatchNorm1d: torch_ref.BatchNorm1d,
    nn.BatchNorm2d: torch_ref.BatchNorm2d,
    nn.BatchNorm3d: torch_ref.BatchNorm3d,
}
INFOS = [info for info in common_modules.module_db if info.module_cls in OURS]
TOL = {dtype: tolerance("summation-order", dtype) for dtype in (torch.float32, torch.float64)}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MODES = {"train": True, "eval": False}


def _samples(info, dtype: torch.dtype, training: bool, requires_grad: bool = True) -> list:
    torch.manual_seed(0)  # make_tensor draws from the global generator
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training)


def _peer(info) -> str:
    return f"torch.nn.{info.module_cls.__name__}"


def _sample_rows() -> list[tuple]:
    """(info, index, description) of every BatchNorm sample module_db lists."""
    return [
        (info, index, sample.desc or "default")
        for info in INFOS
        for index, sample in enumerate(_samples(info, torch.float64, True, requires_grad=False))
    ]


def _with_dtypes(rows: list[tuple]) -> list:
    """(info, index, dtype) rows, ids ``{peer}-{dtype}-{sample}`` (tests/cases.py's order)."""
    return [
        case(info, index, dtype, peer=_peer(info), dtype=name, detail=desc)
        for info, index, desc in rows
        for name, dtype in DTYPES.items()
    ]


SAMPLE_ROWS = _sample_rows()
assert len(SAMPLE_ROWS) >= 20, f"module_db lists only {len(SAMPLE_ROWS)} BatchNorm samples: did torch change it?"
SAMPLES = [case(info, index, peer=_peer(info), detail=desc) for info, index, desc in SAMPLE_ROWS]
MODE_PARAMS = [pytest.param(training, id=name) for name, training in MODES.items()]


def _pair(info, index: int, dtype: torch.dtype, training: bool):
    """(ours, peer, sample) built as test_modules.py builds them: construct, then .to(dtype); same state."""
    sample = _samples(info, dtype, training)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    peer = info.module_cls(*args, **kwargs).to(dtype)
    ours = OURS[info.module_cls](*args, **kwargs).to(dtype)
    randomize_bn_state_(peer, seed=11)
    ours.load_state_dict(peer.state_dict())
    return ours.train(training), peer.train(training), sample


def _input(sample) -> torch.Tensor:
    return sample.forward_input.args[0]


def _twins(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()


def _assert_same_state(ours: nn.Module, peer: nn.Module, tol: Tolerance, what: str) -> None:
    ours_sd, peer_sd = ours.state_dict(), peer.state_dict()
    assert list(ours_sd) == list(peer_sd)
    for key, ref in peer_sd.items():
        if key == "num_batches_tracked":
            assert int(ours_sd[key]) == int(ref), f"{what}: num_batches_tracked {int(ours_sd[key])} vs {int(ref)}"
        else:
            close(ours_sd[key], ref, tol, scale="magnitude", what=f"{what}: {key}", same_dtype=True)


@pytest.mark.parametrize("training", MODE_PARAMS)
@pytest.mark.parametrize("info, index, dtype", _with_dtypes(SAMPLE_ROWS))
def test_forward_and_running_statistics_match_torch_nn(info, index, dtype, training) -> None:
    """Two forward calls: outputs, running mean/var and num_batches_tracked equal torch.nn's after each."""
    ours, peer, sample = _pair(info, index, dtype, training)
    x = _input(sample)
    for call in range(2):
        close(ours(x), peer(x), TOL[dtype], scale="magnitude", what=f"call {call} y", same_dtype=True)
        _assert_same_state(ours, peer, TOL[dtype], f"call {call}")


@pytest.mark.parametrize("training", MODE_PARAMS)
@pytest.mark.parametrize("info, index, dtype", _with_dtypes(SAMPLE_ROWS))
def test_gradients_match_torch_nn(info, index, dtype, training) -> None:
    ours, peer, sample = _pair(info, index, dtype, training)
    x_ours, x_peer = _twins(_input(sample))
    y_ours, y_peer = ours(x_ours), peer(x_peer)
    dy = torch.randn(y_peer.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    y_ours.backward(dy)
    y_peer.backward(dy)
    close(x_ours.grad, x_peer.grad, TOL[dtype], scale="magnitude", what="dx", same_dtype=True)
    for name, p_peer in peer.named_parameters():
        p_ours = dict(ours.named_parameters())[name]
        assert (p_ours.grad is None) == (p_peer.grad is None), name
        close(p_ours.grad, p_peer.grad, TOL[dtype], scale="magnitude", what=f"d{name}", same_dtype=True)


def _as_function(module: nn.Module):
    """(x, *params) -> y with the parameters substituted (buffers stay the module's), for gradcheck."""
    names = [name for name, _ in module.named_parameters()]

    def call(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (x,), strict=False)

    inputs = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]
    return call, inputs


GRADCHECK_MODES = [
    pytest.param("fast", id="fast"),  # random projections of the Jacobian (gradcheck's fast_mode)
    pytest.param("full", id="full", marks=pytest.mark.slow),  # every entry, with batched grads (vmap)
]


@pytest.mark.parametrize("mode", GRADCHECK_MODES)
@pytest.mark.parametrize("training", MODE_PARAMS)
@pytest.mark.parametrize("info, index", SAMPLES)
def test_gradcheck_and_gradgradcheck_float64(info, index, training, mode) -> None:
    """Closed-form backward and its own derivative vs finite differences (test_modules' test_grad/test_gradgrad).

    float64 with gradcheck's default eps 1e-6 and tolerances (atol 1e-5, rtol 1e-3), as torch runs it;
    "fast" checks random projections v^T J u (any wrong entry shows with probability 1), "full" every entry.
    """
    ours, _, sample = _pair(info, index, torch.float64, training)
    call, params = _as_function(ours)
    inputs = (_input(sample), *params)
    options = {"fast_mode": True} if mode == "fast" else {"check_batched_grad": True}
    assert torch.autograd.gradcheck(call, inputs, **options)
    assert torch.autograd.gradgradcheck(call, inputs, **options)


def _non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values in a strided view (every other element of a doubled last axis)."""
    doubled = torch.stack([x.detach(), torch.full_like(x.detach(), float("nan"))], dim=-1)
    view = doubled.select(-1, 0)
    assert not view.is_contiguous() or x.numel() == 0
    return view.requires_grad_()


@pytest.mark.parametrize("training", MODE_PARAMS)
@pytest.mark.parametrize("info, index, dtype", _with_dtypes(SAMPLE_ROWS))
def test_non_contiguous_input_and_gradient(info, index, dtype, training) -> None:
    """Strided x and dy give torch.nn's output and gradients (NaN in the skipped elements must not leak)."""
    ours, peer, sample = _pair(info, index, dtype, training)
    x = _input(sample)
    x_ours, x_peer = _non_contiguous(x), _non_contiguous(x)
    y_ours, y_peer = ours(x_ours), peer(x_peer)
    dy = _non_contiguous(torch.randn(y_peer.shape, generator=torch.Generator().manual_seed(5), dtype=dtype))
    y_ours.backward(dy.detach())
    y_peer.backward(dy.detach())
    close(y_ours, y_peer, TOL[dtype], scale="magnitude", what="y", same_dtype=True)
    close(x_ours.grad, x_peer.grad, TOL[dtype], scale="magnitude", what="dx", same_dtype=True)
    _assert_same_state(ours, peer, TOL[dtype], "after the call")


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
SPATIAL_ROWS = [row for row in SAMPLE_ROWS if row[0].module_cls is not nn.BatchNorm1d]


@pytest.mark.parametrize("training", MODE_PARAMS)
@pytest.mark.parametrize("info, index, dtype", _with_dtypes(SPATIAL_ROWS))
def test_channels_last_input(info, index, dtype, training) -> None:
    """channels_last input: torch.nn's values and gradients, and the output in the layout torch.nn returns."""
    ours, peer, sample = _pair(info, index, dtype, training)
    x = _input(sample)
    layout = CHANNELS_LAST[x.dim()]
    x_ours, x_peer = (t.detach().to(memory_format=layout).requires_grad_() for t in _twins(x))
    y_ours, y_peer = ours(x_ours), peer(x_peer)
    assert y_ours.is_contiguous(memory_format=layout) == y_peer.is_contiguous(memory_format=layout)
    y_ours.backward(torch.ones_like(y_ours))
    y_peer.backward(torch.ones_like(y_peer))
    close(y_ours, y_peer, TOL[dtype], scale="magnitude", what="y", same_dtype=True)
    close(x_ours.grad, x_peer.grad, TOL[dtype], scale="magnitude", what="dx", same_dtype=True)


def _round_trips(module: nn.Module) -> dict[str, nn.Module]:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return {
        "pickle": pickle.loads(pickle.dumps(module)),
        "deepcopy": copy.deepcopy(module),
        "torch.save": torch.load(buffer, weights_only=False),
    }


@pytest.mark.parametrize("training", MODE_PARAMS)
@pytest.mark.parametrize("info, index", SAMPLES)
def test_pickle_deepcopy_and_torch_save(info, index, training) -> None:
    """A copy is the same module: same class, mode and state, and the same outputs and updates as the original."""
    ours, _, sample = _pair(info, index, torch.float32, training)
    x = _input(sample)
    for how, copied in _round_trips(ours).items():
        assert type(copied) is type(ours) and copied.training == training, how
        original = copy.deepcopy(ours)
        close(copied(x), original(x), EXACT, scale="magnitude", what=f"{how} y", same_dtype=True)
        _assert_same_state(copied, original, EXACT, how)


@pytest.mark.parametrize("info, index, dtype", _with_dtypes(SAMPLE_ROWS))
def test_state_dict_round_trip_both_ways(info, index, dtype) -> None:
    """ours -> torch.nn -> ours: keys, version, values, and eval outputs all preserved."""
    ours, _, sample = _pair(info, index, dtype, False)
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    peer = info.module_cls(*args, **kwargs).to(dtype).eval()
    peer.load_state_dict(ours.state_dict())
    back = OURS[info.module_cls](*args, **kwargs).to(dtype).eval()
    back.load_state_dict(peer.state_dict())
    assert ours.state_dict()._metadata[""]["version"] == peer.state_dict()._metadata[""]["version"]
    _assert_same_state(back, ours, EXACT, "ours -> torch.nn -> ours")
    x = _input(sample)
    close(back(x), peer(x), TOL[dtype], scale="magnitude", what="eval y", same_dtype=True)


@pytest.mark.parametrize("info, index, dtype", _with_dtypes(SAMPLE_ROWS))
def test_factory_kwargs_to_and_repr(info, index, dtype) -> None:
    """dtype= / device= reach every float tensor (the counter stays int64), .to() and repr as torch.nn."""
    sample = _samples(info, dtype, True)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    ours = OURS[info.module_cls](*args, **kwargs, device="cpu", dtype=dtype)
    peer = info.module_cls(*args, **kwargs, device="cpu", dtype=dtype)

    def layout(module: nn.Module) -> dict:
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        return {k: (v.dtype, v.device, tuple(v.shape), v.requires_grad, type(v)) for k, v in tensors.items()}

    assert layout(ours) == layout(peer)
    assert repr(ours) == repr(peer)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    assert layout(ours.to(other)) == layout(peer.to(other))
    assert layout(ours.to_empty(device="cpu")) == layout(peer.to_empty(device="cpu"))


def _error_inputs():
    params = []
    for info in INFOS:
        errors = info.module_error_inputs_func(
            info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
        )
        for index, error in enumerate(errors):
            kwargs = error.module_error_input.constructor_input.kwargs
            label = "-".join(f"{k}{v}" for k, v in kwargs.items()) or str(index)
            params.extend(
                case(info, index, dtype, peer=_peer(info), dtype=name, detail=label) for name, dtype in DTYPES.items()
            )
    return params


@pytest.mark.parametrize("info, index, dtype", _error_inputs())
def test_error_inputs_raise_torchs_error(info, index, dtype) -> None:
    """module_db's error inputs: the error type and message torch.nn gives, at the same stage."""
    errors = info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False, training=True)
    error = errors[index]
    sample = error.module_error_input
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    for cls in (info.module_cls, OURS[info.module_cls]):  # the peer first: the table's claim must hold for torch
        if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error.error_type, match=error.error_regex):
                cls(*args, **kwargs)
        else:
            module = cls(*args, **kwargs).to(dtype)
            with pytest.raises(error.error_type, match=error.error_regex):
                module(*sample.forward_input.args, **sample.forward_input.kwargs)


# Where torch_ref deliberately differs from torch.nn: constructor kwargs, input (None: construction
# only), torch.nn's error (None: torch.nn constructs it), ours. Ours names the argument or the
# mismatch where torch.nn accepts a meaningless argument or fails inside ATen. Everything else is
# as torch.nn does it.
DIFFERENCES = {
    "channel-count": ({}, torch.zeros(4, 5), (RuntimeError, "running_mean should contain"), (ValueError, "5 channels")),
    "integer-input": (
        {},
        torch.zeros(4, 3, dtype=torch.long),
        (NotImplementedError, "not implemented for 'Long'"),
        (TypeError, "floating-point"),
    ),
    "num_features-0": ({"num_features": 0}, None, None, (ValueError, "num_features")),
    "momentum-1.5": ({"momentum": 1.5}, None, None, (ValueError, "momentum")),
    "eps-nan": ({"eps": float("nan")}, None, None, (ValueError, "eps")),
    "affine-int": ({"affine": 1}, None, None, (TypeError, "affine")),
}


@pytest.mark.parametrize("case", list(DIFFERENCES))
def test_deliberate_differences_from_torch_nn(case: str) -> None:
    """Each documented difference: torch.nn's behaviour (asserted, so a change in torch shows) and ours."""
    kwargs, x, torch_error, (our_type, our_message) = DIFFERENCES[case]
    kwargs = {"num_features": 3, **kwargs}
    if torch_error is None:
        assert isinstance(nn.BatchNorm1d(**kwargs), nn.BatchNorm1d)  # torch.nn constructs it without a word
        with pytest.raises(our_type, match=our_message):
            torch_ref.BatchNorm1d(**kwargs)
    else:
        with pytest.raises(torch_error[0], match=torch_error[1]):
            nn.BatchNorm1d(**kwargs)(x)
        with pytest.raises(our_type, match=our_message):
            torch_ref.BatchNorm1d(**kwargs)(x)
