"""torch_ref's recorded replays (torch_ref._replay) against spec's eager path, bit for bit.

The oracle is the same formulas executed op by op from Python (inside ``_replay.op_by_op()``), an
independent execution of what the replay recorded; spec's path itself is checked against torch.nn, the NumPy
reference and the golden vectors elsewhere. Equality is exact (``torch.equal``): a replay runs the same ATen
kernels on the same operands in the same order, so any difference is a recording bug, not rounding.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import pytest
import torch
from cases import case

import spec
import torch_ref
from torch_ref import _replay
from torch_ref import batch_norm as torch_bn

STEPS = 5  # > TorchScript's profiling runs: later steps run the executor's optimized graph


def _module_steps(make_bn, batches, context=contextlib.nullcontext, loss=lambda y: (y * y).sum()) -> list:
    """Outputs, gradients (where autograd records) and buffers of ``make_bn()`` trained on ``batches``."""
    torch.manual_seed(0)
    bn = make_bn()
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1.0, 1.0)
    seen = []
    for batch in batches:
        x = batch.clone().requires_grad_(context is contextlib.nullcontext)
        with context():
            y = bn(x)
        seen.append(y.detach().clone())
        if y.requires_grad:
            params = [x] + [p for p in (bn.weight, bn.bias) if p is not None]
            seen += [g.clone() for g in torch.autograd.grad(loss(y), params)]
    return seen + [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


def _eager(run):
    """``run()`` with spec's eager path (no replay)."""
    with _replay.op_by_op():
        return run()


def _assert_bit_identical(replayed: list, eager: list) -> None:
    assert len(replayed) == len(eager)
    for index, (a, b) in enumerate(zip(replayed, eager, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, index
        assert torch.equal(a, b), f"tensor {index} differs"


def _batches(shape, dtype, offset: float, layout=None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    batches = [
        (torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + i) + offset).to(dtype) for i in range(STEPS)
    ]
    return [b.contiguous(memory_format=layout) for b in batches] if layout is not None else batches


# (module, shape, options, input dtype, offset, memory format, layout id, detail id)
MODULE_ROWS = [
    (torch_ref.BatchNorm1d, (64, 120), {}, torch.float32, 0.0, None, "nc", "lenet-fc"),
    (torch_ref.BatchNorm1d, (5, 3, 7), {}, torch.float64, 0.0, None, "ncl", None),
    (torch_ref.BatchNorm2d, (64, 6, 24, 24), {}, torch.float32, 0.5, None, "nchw", "lenet-conv"),
    (torch_ref.BatchNorm2d, (8, 4, 5, 5), {"eps": 1e-5}, torch.float32, 1e4, None, "nchw", "offset1e4"),
    (torch_ref.BatchNorm2d, (8, 4, 5, 5), {"affine": False}, torch.float64, 0.0, None, "nchw", "no-affine"),
    (torch_ref.BatchNorm2d, (8, 4, 5, 5), {"momentum": None}, torch.float16, 3.0, None, "nchw", "momentumNone"),
    (torch_ref.BatchNorm2d, (8, 4, 5, 5), {}, torch.float32, 0.0, torch.channels_last, "nchw", "channels-last-memory"),
    (torch_ref.BatchNorm3d, (2, 3, 2, 3, 4), {"convention": "keras"}, torch.float32, 0.0, None, "ncdhw", None),
]
MODULE_CASES = [
    case(
        *row[:6],
        layout=row[6],
        dtype=str(row[3]).removeprefix("torch."),
        convention=row[2].get("convention"),
        detail=row[7],
    )
    for row in MODULE_ROWS
]


@pytest.mark.parametrize("module, shape, options, dtype, offset, layout", MODULE_CASES)
def test_module_replay_matches_eager_spec(module, shape, options, dtype, offset, layout) -> None:
    """Training steps through the module: outputs, dx, dgamma, dbeta and buffers equal the eager path's bits."""
    batches = _batches(shape, dtype, offset, layout)
    param_dtype = torch.float32 if dtype == torch.float16 else dtype  # half input computes in float32 (torch.nn)

    def run():
        return _module_steps(lambda: module(shape[1], dtype=param_dtype, **options), batches)

    torch_bn._REPLAYS.clear()
    replayed = run()
    assert len(torch_bn._REPLAYS) == 2  # the forward and the backward were recorded, and replayed after
    _assert_bit_identical(replayed, _eager(run))


CONTEXT_CASES = [
    case(torch.no_grad, None, detail="no-grad"),
    case(torch.inference_mode, None, detail="inference-mode"),
    case(contextlib.nullcontext, lambda y: y.sum(), detail="expanded-cotangent"),  # dy has stride 0 everywhere
]


@pytest.mark.parametrize("context, loss", CONTEXT_CASES)
def test_replay_in_other_contexts(context, loss) -> None:
    """Training-mode forward without autograd, and a backward whose cotangent is a broadcast view."""
    batches = _batches((8, 3, 4, 4), torch.float32, 1.0)

    def run():
        kwargs = {} if loss is None else {"loss": loss}
        return _module_steps(lambda: torch_ref.BatchNorm2d(3), batches, context, **kwargs)

    _assert_bit_identical(run(), _eager(run))


CHANNELS_LAST_CASES = [
    case((64, 24, 24, 6), torch.float32, layout="nhwc", dtype="float32", detail="tiled-rows"),  # spec.arrays tiling
    case((64, 8, 8, 16), torch.float32, layout="nhwc", dtype="float32"),
    case((5, 7, 3), torch.float64, layout="nlc", dtype="float64"),
]


@pytest.mark.parametrize("shape, dtype", CHANNELS_LAST_CASES)
def test_channels_last_replay_matches_eager_spec(shape, dtype) -> None:
    """``batch_norm_train(channel_dim=-1)``, Keras' torch backend's entry, with channel tiling where C < 16."""
    gen = torch.Generator().manual_seed(3)
    channels = shape[-1]
    xs = [torch.randn(shape, generator=gen, dtype=dtype) + 2 for _ in range(STEPS)]
    dys = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(STEPS)]
    weight, bias = (
        torch.rand(channels, generator=gen, dtype=dtype) + 0.5,
        torch.randn(channels, generator=gen, dtype=dtype),
    )

    def run():
        seen = []
        for x, dy in zip(xs, dys, strict=True):
            x, w, b = (t.clone().requires_grad_(True) for t in (x, weight, bias))
            y, mean, var = torch_ref.batch_norm_train(x, w, b, 1e-3, channel_dim=-1)
            seen += [y.detach(), mean, var, *torch.autograd.grad(y, [x, w, b], dy)]
        return seen

    _assert_bit_identical(run(), _eager(run))


def test_configurations_get_their_own_replays() -> None:
    """eps and the layout are part of the key: a module with another eps, or transposed input, is recorded anew
    and still matches the eager path (a replay keyed too loosely would reuse the first recording's constants)."""
    torch_bn._REPLAYS.clear()
    batches = _batches((6, 4, 3, 3), torch.float32, 0.0)

    def run():
        seen = []
        for eps in (1e-3, 1e-5):
            seen += _module_steps(lambda eps=eps: torch_ref.BatchNorm2d(4, eps=eps), batches)
            transposed = [b.transpose(2, 3) for b in batches]
            seen += _module_steps(lambda eps=eps: torch_ref.BatchNorm2d(4, eps=eps), transposed)
        return seen

    replayed = run()
    assert len(torch_bn._REPLAYS) == 6  # forwards: 2 eps x 2 layouts; backwards (no eps in them): 2 layouts
    _assert_bit_identical(replayed, _eager(run))


UPDATE_RULES = [(0.1, "torch"), (0.3, "torch"), (None, "torch"), (0.1, "keras"), (0.1, "caffe")]


def test_update_rules_get_their_own_replays() -> None:
    """The moving-statistics update is recorded with the forward, so its rule is part of the key: momenta and
    conventions (a constant weight, the cumulative and Caffe counters read from num_batches_tracked) each get a
    forward recording, and every one leaves the buffers the eager path (NumPy, after the Function) leaves."""
    torch_bn._REPLAYS.clear()
    batches = _batches((6, 4, 3, 3), torch.float32, 2.0)

    def run():
        seen = []
        for momentum, convention in UPDATE_RULES:
            make = lambda m=momentum, c=convention: torch_ref.BatchNorm2d(4, momentum=m, convention=c)  # noqa: E731
            seen += _module_steps(make, batches)
        return seen

    replayed = run()
    assert len(torch_bn._REPLAYS) == len(UPDATE_RULES) + 1  # one backward: the update is the forward's
    _assert_bit_identical(replayed, _eager(run))


def test_replayed_step_updates_without_numpy(monkeypatch) -> None:
    """Once recorded, a local eager training step updates the buffers inside its replay: no NumPy on the path
    (the host update is what the replay replaces), and the buffers still move."""
    bn = torch_ref.BatchNorm1d(5)
    batches = _batches((8, 5), torch.float32, 1.0)
    bn(batches[0]).sum().backward()  # records

    def refuse(*args, **kwargs):
        raise AssertionError("NumPy on a replayed training step")

    monkeypatch.setattr(torch.Tensor, "numpy", refuse)
    monkeypatch.setattr(torch, "from_numpy", refuse)
    before = bn.running_var.clone()
    for batch in batches[1:]:
        bn(batch).sum().backward()
    assert not torch.equal(bn.running_var, before) and int(bn.num_batches_tracked) == len(batches)


def test_data_dependent_branch_is_not_recorded() -> None:
    """spec's data-dependent conditional refuses the recording namespace: such a function keeps its eager path
    (None) instead of a replay that would run the branch recorded on the first batch for every batch."""
    recorder = _replay.Recorder()

    def refine_when_needed(x):
        stats = spec.shifted_moments(x, [0], refine=spec.REFINE_WHEN_NEEDED, xp=_replay.RECORDING)
        return stats.mean, stats.var

    x = torch.randn(16, 3) + 100.0
    assert recorder(("when-needed",), refine_when_needed, [x]) is None
    assert recorder(("when-needed",), refine_when_needed, [x]) is None  # the refusal is remembered
    plain = recorder(("plain",), lambda x: x - x.sum(0, keepdim=True), [x])
    assert plain is not None and torch.equal(plain(x), x - x.sum(0, keepdim=True))


def test_recorder_keeps_at_most_limit() -> None:
    recorder = _replay.Recorder(limit=2)
    x = torch.ones(3)
    for key in range(3):
        recorder((key,), lambda x: x + 1.0, [x])
    assert len(recorder) == 2


def test_no_replay_while_tracing_or_fusing() -> None:
    """A user's ``torch.jit.trace`` must record spec's ops itself (not a call into our replay), and TorchScript's
    CPU fuser may round a fused kernel differently: neither gets a replay, nor does code inside ``op_by_op()``."""
    x = torch.ones(2)
    assert _replay.allowed(x)
    seen = []

    def probe(t):
        seen.append(_replay.allowed(t))
        return t * 2

    with pytest.warns(Warning):  # torch 2.13 deprecates jit.trace
        torch.jit.trace(probe, x, check_trace=False)
    assert seen == [False]
    fusing = torch._C._jit_can_fuse_on_cpu()
    torch._C._jit_override_can_fuse_on_cpu(True)
    try:
        assert not _replay.allowed(x)
    finally:
        torch._C._jit_override_can_fuse_on_cpu(fusing)
    with _replay.op_by_op():  # the switch the eager oracles above run under, and it ends with its block
        assert not _replay.allowed(x)
    assert _replay.allowed(x)


def test_threads_recording_at_once_leak_no_tracer_warnings() -> None:
    """Recording silences jit.trace's warnings with process-wide filters; threads recording new configurations at
    the same time must not let one another's TracerWarnings through (one recording at a time)."""
    torch_bn._REPLAYS.clear()
    failures = []

    def train(channels: int) -> None:
        try:
            bn = torch_ref.BatchNorm1d(channels)
            for _ in range(20):
                x = torch.randn(16, channels, requires_grad=True)
                torch.autograd.grad(bn(x).sum(), [x])
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(error)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=train, args=(channels,)) for channels in range(3, 11)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    assert [w for w in seen if issubclass(w.category, torch.jit.TracerWarning)] == []
    assert len(torch_bn._REPLAYS) == 16  # 8 configurations, forward and backward each
