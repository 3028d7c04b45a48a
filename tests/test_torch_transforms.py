"""torch_ref.BatchNorm*d under PyTorch's program transforms, against torch.nn.BatchNorm*d under the same ones.

torch.compile(fullgraph=True), torch.jit.script, torch.fx.symbolic_trace, torch.func (grad,
jacrev, vmap, jvp, replace_all_batch_norm_modules_) and forward-mode AD: each must run and give
what torch.nn's module gives (outputs, gradients, tangents, running statistics and counter).

Tolerances as in tests/test_torch_batch_norm.py: float64 1e-12 and float32 1e-5 relative to the
largest value (different summation orders; any formula error is >= 1e-3 here).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _bn_state import randomize_bn_state_
from numerics import Tolerance, close, tolerance
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

import torch_ref

TOL = {dtype: tolerance("summation-order", dtype) for dtype in (torch.float32, torch.float64)}
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]
MOMENTA = [pytest.param(0.1, id="momentum0.1"), pytest.param(None, id="momentumNone")]


def _pair(dtype: torch.dtype = torch.float64, momentum: float | None = 0.1, **kwargs):
    """BatchNorm2d(3) ours and torch.nn's with the same non-trivial state (3 batches already counted)."""
    peer = nn.BatchNorm2d(3, momentum=momentum, dtype=dtype, **kwargs)
    randomize_bn_state_(peer, seed=2)
    ours = torch_ref.BatchNorm2d(3, momentum=momentum, dtype=dtype, **kwargs)
    ours.load_state_dict(peer.state_dict())
    return ours, peer


def _x(step: int, dtype: torch.dtype = torch.float64, shape=(4, 3, 5, 5)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(shape, generator=gen, dtype=dtype) * 3 + 2


def _assert_same_state(ours: nn.Module, peer: nn.Module, tol: Tolerance, what: str) -> None:
    for (key, a), (_, b) in zip(ours.state_dict().items(), peer.state_dict().items(), strict=True):
        if key == "num_batches_tracked":
            assert int(a) == int(b), f"{what}: {key} {int(a)} vs {int(b)}"
        else:
            close(a, b, tol, scale="magnitude", what=f"{what}: {key}")


def _steps_match(run_ours, ours: nn.Module, peer: nn.Module, dtype: torch.dtype, steps: int = 2) -> None:
    """``steps`` forward+backward calls of ``run_ours`` (a transformed ours) and of the peer: y, dx, state."""
    for step in range(steps):
        x_ours, x_peer = _x(step, dtype).requires_grad_(), _x(step, dtype).requires_grad_()
        y_ours, y_peer = run_ours(x_ours), peer(x_peer)
        (y_ours**3).sum().backward()
        (y_peer**3).sum().backward()
        close(y_ours, y_peer, TOL[dtype], scale="magnitude", what=f"step {step} y")
        close(x_ours.grad, x_peer.grad, TOL[dtype], scale="magnitude", what=f"step {step} dx")
        _assert_same_state(ours, peer, TOL[dtype], f"step {step}")


@pytest.mark.slow  # compiling forward and backward takes a minute or two on 2 busy cores
def test_torch_compile_fullgraph_train_and_eval() -> None:
    """fullgraph=True: no graph break anywhere (running-statistics update and momentum=None included)."""
    torch._dynamo.reset()
    ours, peer = _pair(torch.float32, momentum=None)
    compiled = torch.compile(ours, fullgraph=True)
    _steps_match(compiled, ours, peer, torch.float32)
    ours.eval(), peer.eval()
    _steps_match(compiled, ours, peer, torch.float32, steps=1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("momentum", MOMENTA)
def test_torch_jit_script_train_and_eval(momentum: float | None) -> None:
    """Scripted, ours runs the same formulas without the custom Function (TorchScript cannot call one)."""
    ours, peer = _pair(momentum=momentum)
    scripted = torch.jit.script(ours)
    _steps_match(scripted, scripted, peer, torch.float64)
    scripted.eval(), peer.eval()
    _steps_match(scripted, scripted, peer, torch.float64, steps=1)


class _Net(nn.Module):
    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, dtype=torch.float64)
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("training", MODES)
def test_torch_fx_symbolic_trace(training: bool) -> None:
    """symbolic_trace records the BN as one call (its shape checks run at run time) and updates the buffers.

    torch.nn's BN is an fx leaf module (kept as call_module); ours is traced through, so the graph
    holds the mode it was traced in, like any user module.
    """
    ours, peer = _pair()
    net = _Net(ours).train(training)
    reference = _Net(peer).train(training)
    reference.conv.load_state_dict(net.conv.state_dict())
    traced = torch.fx.symbolic_trace(net)
    calls = [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"]
    assert calls.count("batch_norm_module_forward") == 1, calls
    _steps_match(traced, traced, reference, torch.float64)
    with pytest.raises(ValueError, match="expects 4D input"):  # the checks survive tracing (conv takes 3D)
        traced(torch.zeros(3, 5, 5, dtype=torch.float64))


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers()}


@pytest.mark.parametrize("training", MODES)
def test_torch_func_grad_and_jacrev(training: bool) -> None:
    """grad and jacrev through functional_call; buffers are inputs (torch.func refuses to mutate captured ones)."""
    ours, peer = _pair()
    ours.train(training), peer.train(training)
    x = _x(0, shape=(3, 3, 2, 2))
    params = {k: v.detach() for k, v in peer.named_parameters()}

    def loss(module):
        return lambda p, xx, buffers: (functional_call(module, {**p, **buffers}, (xx,)) ** 3).sum()

    buffers_ours, buffers_peer = _buffers(ours), _buffers(peer)
    g_ours = grad(loss(ours), argnums=(0, 1))(params, x, buffers_ours)
    g_peer = grad(loss(peer), argnums=(0, 1))(params, x, buffers_peer)
    close(g_ours[1], g_peer[1], TOL[torch.float64], scale="magnitude", what="d/dx")
    for name in params:
        close(g_ours[0][name], g_peer[0][name], TOL[torch.float64], scale="magnitude", what=f"d/d{name}")
    for name, value in buffers_peer.items():  # the updates land in the buffers passed in
        close(buffers_ours[name].double(), value.double(), TOL[torch.float64], scale="magnitude", what=name)
    if training:
        assert int(buffers_ours["num_batches_tracked"]) == 4
    j_ours = jacrev(lambda xx, b: functional_call(ours, {**params, **b}, (xx,)))(x, _buffers(ours))
    j_peer = jacrev(lambda xx, b: functional_call(peer, {**params, **b}, (xx,)))(x, _buffers(peer))
    close(j_ours, j_peer, TOL[torch.float64], scale="magnitude", what="jacobian")


@pytest.mark.parametrize(
    "setting", ["eval", "train-no-tracking", "train-replace_all_batch_norm_modules_"], ids=lambda s: s
)
def test_torch_func_vmap(setting: str) -> None:
    """vmap over a stack of batches: per-batch statistics, as torch.nn under vmap (which refuses tracked training)."""
    ours, peer = _pair(track_running_stats=setting != "train-no-tracking")
    nets = [_Net(ours), _Net(peer)]
    nets[1].conv.load_state_dict(nets[0].conv.state_dict())
    for net in nets:
        net.train(setting != "eval")
        if setting == "train-replace_all_batch_norm_modules_":
            torch.func.replace_all_batch_norm_modules_(net)
    assert ours.running_mean is None or setting != "train-replace_all_batch_norm_modules_"  # ours was found
    xs = torch.stack([_x(k, shape=(4, 3, 2, 2)) for k in range(5)])
    close(vmap(nets[0])(xs), vmap(nets[1])(xs), TOL[torch.float64], scale="magnitude", what="vmap y")
    per_batch = torch.stack([nets[0](x) for x in xs])
    close(vmap(nets[0])(xs), per_batch, TOL[torch.float64], scale="magnitude", what="vmap vs loop")


@pytest.mark.parametrize("training", MODES)
def test_forward_mode_ad_matches_torch_nn(training: bool) -> None:
    """torch.func.jvp and torch.autograd.forward_ad tangents in x, weight and bias equal torch.nn's."""
    ours, peer = _pair(track_running_stats=False) if training else _pair()
    ours.train(training), peer.train(training)
    x, dx = _x(0, shape=(3, 3, 2, 2)), _x(1, shape=(3, 3, 2, 2))
    params = {k: v.detach() for k, v in peer.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def call(module):
        return lambda p, xx: functional_call(module, p, (xx,))

    y_ours, t_ours = jvp(call(ours), (params, x), (tangents, dx))
    y_peer, t_peer = jvp(call(peer), (params, x), (tangents, dx))
    close(y_ours, y_peer, TOL[torch.float64], scale="magnitude", what="y")
    close(t_ours, t_peer, TOL[torch.float64], scale="magnitude", what="tangent (torch.func.jvp)")
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        t_dual = fwAD.unpack_dual(ours(fwAD.make_dual(x, dx))).tangent
    with fwAD.dual_level():
        t_dual_peer = fwAD.unpack_dual(peer(fwAD.make_dual(x, dx))).tangent
    close(t_dual, t_dual_peer, TOL[torch.float64], scale="magnitude", what="tangent (forward_ad)")


def test_torch_nn_helpers_find_our_layers() -> None:
    """isinstance, SyncBatchNorm.convert_sync_batchnorm and replace_all_batch_norm_modules_ see ours as BN."""
    model = nn.Sequential(nn.Conv2d(1, 3, 1), torch_ref.BatchNorm2d(3), torch_ref.BatchNorm1d(4))
    assert all(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model[1:])
    weight = model[1].weight
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert [type(m) for m in converted[1:]] == [nn.SyncBatchNorm, nn.SyncBatchNorm]
    torch.func.replace_all_batch_norm_modules_(model)
    assert model[1].running_mean is None and not model[1].track_running_stats and model[1].weight is weight
