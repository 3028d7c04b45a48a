"""Keras LeNet-BN and PyTorch LeNet-BN trained in lockstep on MNIST test images, compared after every step.

Both start from the same weights (keras_to_torch), see the same 32-image batches in the same order and
use matched optimizers (tests/lockstep.py). Keras side: keras_bn.BatchNorm(convention="torch",
momentum=0.1, epsilon=1e-5); PyTorch side: torch.nn.BatchNorm*d or torch_ref.BatchNorm*d.

What the runs show (numbers from `python bench/bench_conformance.py`):

- float64: the two frameworks compute the same training trajectory; SGD parameters agree to ~1e-13
  after 50 steps, Adam's to ~1e-8 (see the Adam tolerance below).
- float32: TensorFlow and PyTorch sum in different orders (~1e-7 relative), which decides some ReLU
  signs and max-pool argmaxes differently; each such decision changes a gradient by a whole term
  and the runs separate chaotically, often from the first steps. With Keras' decisions imposed on
  PyTorch (follow_keras_routing) the remaining arithmetic keeps every SGD parameter within 1e-4
  (3.5e-5 after 300 steps in the bench). Adam additionally moves the directions BN cancels by
  normalized rounding noise; that drift is tested as the exact cause of the running-mean gaps.
- Keras' own convention (biased running variance, momentum 0.9 = torch 0.1): parameters and
  running means agree, running variances differ by exactly the Bessel factor m/(m-1) per update.
"""

from __future__ import annotations

import copy

import keras
import numpy as np
import pytest
from _convert_models import floatx
from lockstep import StepDivergence, train_lenet_lockstep, train_lockstep

import keras_bn
import torch_ref
from mnist_data import to_nhwc_float

STEPS = 50
BATCH = 32
# Biases that feed a BN layer: BN subtracts the batch mean, so their gradient is analytically 0 and
# numerically pure rounding noise (the other 'bias' of each BN pair is bn*.bias, which is beta).
PRE_BN_BIASES = {"conv1.bias": "bn1", "conv2.bias": "bn2", "fc1.bias": "bn3", "fc2.bias": "bn4"}


@pytest.fixture(scope="module")
def mnist_batches(mnist_test):
    images, labels = mnist_test
    n = STEPS * BATCH
    return to_nhwc_float(images[:n]), labels[:n]


RUNS = {
    # id ({peer}-{dtype}-{detail} as tests/cases.py): dtype, optimizer, lr, momentum, torch BN, Keras loop,
    # follow Keras' ReLU/pool decisions
    "torch.nn-float64-sgd-tape": ("float64", "sgd", 0.05, 0.9, "torch", "tape", False),
    "torch_ref-float64-adam-tape": ("float64", "adam", 1e-3, 0.0, "ours", "tape", False),
    "torch_ref-float64-sgd-fit": ("float64", "sgd", 0.05, 0.9, "ours", "fit", False),
    "torch.nn-float32-sgd-routed": ("float32", "sgd", 0.05, 0.9, "torch", "tape", True),
    "torch_ref-float32-adam-routed": ("float32", "adam", 1e-3, 0.0, "ours", "tape", True),
}
_HISTORIES: dict[str, tuple[list[StepDivergence], dict[str, np.ndarray]]] = {}


def _run(run_id: str, mnist_batches) -> tuple[list[StepDivergence], dict[str, np.ndarray]]:
    """Run (once per session) and print the per-step divergence; returns history and PyTorch's final state."""
    if run_id not in _HISTORIES:
        dtype, optimizer, lr, momentum, torch_bn, loop, routed = RUNS[run_id]
        images, labels = mnist_batches
        with floatx(dtype):
            _, torch_model, history = train_lenet_lockstep(
                dtype,
                torch_bn,
                images,
                labels,
                optimizer=optimizer,
                lr=lr,
                momentum=momentum,
                eps=1e-7,  # Keras' default, applied the Keras way on both sides
                batch_size=BATCH,
                steps=STEPS,
                keras_loop=loop,
                follow_keras_routing=routed,
                keep_signed=routed and optimizer == "adam",
                on_step=lambda entry: print(f"[{run_id}] {entry.line()}"),
            )
        state = {k: v.double().numpy() for k, v in torch_model.state_dict().items() if v.is_floating_point()}
        _HISTORIES[run_id] = history, state
    return _HISTORIES[run_id]


def _worst(history: list[StepDivergence], names) -> tuple[float, str, int]:
    return max((e.per_tensor[n], n, e.step) for e in history for n in names)


def _stat_names(state: dict) -> list[str]:
    return [n for n in state if n.endswith(("running_mean", "running_var"))]


# float64 tolerances. SGD: every step is the same float64 expression up to summation order (~1e-16
# relative); over 50 steps the measured drift is ~1e-13, so 1e-11 leaves 100x. Adam divides by
# sqrt(v) + 1e-7: the pre-BN biases' gradients are float64 rounding noise (~1e-13), which Adam turns
# into steps of lr * noise / eps ~ 1e-9 that differ between the frameworks; 1e-7 bounds 50 of them.
FLOAT64_PARAM_TOL = {"sgd": 1e-11, "adam": 1e-7}
FLOAT64_IDS = [run_id for run_id, run in RUNS.items() if run[0] == "float64"]


@pytest.mark.slow  # lockstep float64 training
@pytest.mark.parametrize("run_id", FLOAT64_IDS)
def test_float64_parameters_stay_together(run_id: str, mnist_batches) -> None:
    history, state = _run(run_id, mnist_batches)
    params = [n for n in state if n not in _stat_names(state)]
    worst, name, step = _worst(history, params)
    tol = FLOAT64_PARAM_TOL[RUNS[run_id][1]]
    assert worst <= tol, f"{name} differs by {worst:.3e} at step {step} (> {tol:.0e})"
    assert len(history) == STEPS


@pytest.mark.parametrize("run_id", FLOAT64_IDS)
def test_float64_running_stats_stay_together(run_id: str, mnist_batches) -> None:
    """Moving statistics in float64: the same EMA of the same batch moments, ~1e-13 relative apart.

    1e-10 relative: float64 moments over m >= 32 values and 50 EMA steps stay within ~1e-12. Under
    Adam a running mean also averages the drift of the bias before its BN (FLOAT64_PARAM_TOL above),
    so it gets that bound instead.
    """
    history, state = _run(run_id, mnist_batches)
    for name in _stat_names(state):
        scale = max(1.0, float(np.abs(state[name]).max()))
        tol = 1e-10 * scale
        if RUNS[run_id][1] == "adam" and name.endswith("running_mean"):
            tol = FLOAT64_PARAM_TOL["adam"]
        worst, _, step = _worst(history, [name])
        assert worst <= tol, f"{name} differs by {worst:.3e} at step {step} (> {tol:.1e})"


@pytest.mark.slow  # lockstep training, 300 steps
def test_float32_sgd_stays_within_1e_4_when_routing_agrees(mnist_batches) -> None:
    """float32, SGD(0.05, momentum 0.9), 50 steps: every parameter <= 1e-4 abs, every statistic <= 5e-4 relative.

    Parameters: float32 convolution/BN sums over up to 18,432 values per channel differ between
    TensorFlow and PyTorch by ~1e-6 relative per step; 50 momentum steps grow that to ~2e-5 (measured).
    Statistics are functions of those parameters: conv2's weights are ~0.1, so a 2e-5 gap is ~2e-4
    relative in conv2's output and in the variance bn2 tracks (measured up to 1.1e-4 relative, bn2's
    running variance ~10); 5e-4 relative to max(1, |value|) holds that with room.
    """
    history, state = _run("torch.nn-float32-sgd-routed", mnist_batches)
    params = [n for n in state if n not in _stat_names(state)]
    worst, name, step = _worst(history, params)
    assert worst <= 1e-4, f"{name} differs by {worst:.3e} at step {step}"
    worst_stat = max((e.max_stat_relative, e.step) for e in history)
    assert worst_stat[0] <= 5e-4, (
        f"a running statistic differs by {worst_stat[0]:.2e} (relative) at step {worst_stat[1]}"
    )
    print(f"max parameter gap {_worst(history, params)[0]:.2e}, max statistic gap {worst_stat[0]:.2e} relative")
    print(f"routing decisions PyTorch took differently (overridden): {sum(e.routing_flips for e in history)}")


@pytest.mark.slow  # lockstep training, 300 steps (~15-40 s on 2 cores)
def test_float32_adam_agrees_except_along_directions_bn_cancels(mnist_batches) -> None:
    """float32 Adam: what BN does not cancel agrees to 1e-4; the rest drifts, and the running means follow exactly.

    BN subtracts the batch mean, so the bias before it, and the weights on input entries that are
    (nearly) constant over the batch (fc1/fc2 inputs from background regions), get a gradient that
    is zero or tiny in exact arithmetic and rounding noise in float32. Adam divides by the gradient's
    own size, so that noise moves them by up to lr per step, independently in each framework.
    Checked instead of 1e-4 for those: (1) the training losses agree to 1e-4 every step, so the
    function BN computes does not see the drift; (2) each running mean's gap is exactly the drift
    of the batch mean W u + b (u: batch-mean input):  d_rm_t = (1 - w) d_rm_{t-1} + w (d_b + d_W u_t),
    d = keras - torch taken before step t, w = 0.1, to 3e-5 (what it leaves out: float32 activation
    differences upstream, ~1e-6, times |W|).
    """
    history, state = _run("torch_ref-float32-adam-routed", mnist_batches)
    stats = _stat_names(state)
    bn_fed_linear = ["fc1.weight", "fc2.weight"]
    others = [n for n in state if n not in stats and n not in PRE_BN_BIASES and n not in bn_fed_linear]
    worst, name, step = _worst(history, others)
    assert worst <= 1e-4, f"{name} differs by {worst:.3e} at step {step}"
    for entry in history:  # float32 cross-entropy of 32 samples, parameters 1e-5 apart: 1e-4 is ~10x room
        assert abs(entry.loss_keras - entry.loss_torch) <= 1e-4, f"losses differ at step {entry.step}"
    for name in [n for n in stats if n.endswith("running_var")]:  # a shift leaves variances alone
        scale = max(1.0, float(np.abs(state[name]).max()))
        worst, _, step = _worst(history, [name])
        assert worst <= 1e-4 * scale, f"{name} differs by {worst:.3e} at step {step}"
    w = 0.1
    for bias, bn in PRE_BN_BIASES.items():
        layer = bias.split(".")[0]
        predicted = np.zeros_like(history[0].signed[f"{bn}.running_mean"])
        d_bias = np.zeros_like(predicted)  # both start from the same weights
        d_weight = np.zeros((predicted.size, history[0].pre_bn_input_mean[layer].size))
        largest = worst_residual = 0.0
        for entry in history:
            predicted = (1 - w) * predicted + w * (d_bias + d_weight @ entry.pre_bn_input_mean[layer])
            measured = entry.signed[f"{bn}.running_mean"]
            residual = float(np.abs(measured - predicted).max())
            assert residual <= 3e-5, f"{bn}.running_mean gap at step {entry.step} is not the drift: {residual:.2e}"
            d_bias, d_weight = entry.signed[bias], entry.signed[f"{layer}.weight"].reshape(predicted.size, -1)
            largest, worst_residual = max(largest, float(np.abs(measured).max())), max(worst_residual, residual)
        print(
            f"{bn}.running_mean: gap up to {largest:.2e}, explained by {bias}, {layer}.weight to {worst_residual:.1e}"
        )


@pytest.mark.parametrize(
    "keras_bn_kind",
    ["keras", "ours"],
    ids=["keras.layers", "keras_bn-convention-keras"],
)
def test_keras_convention_running_variance_differs_by_bessel_factor(keras_bn_kind: str, mnist_batches) -> None:
    """Keras convention (momentum 0.9, biased variance) vs torch.nn (momentum 0.1, unbiased), float64, 5 SGD steps.

    Parameters and running means agree; every running-variance update differs by exactly
    m/(m-1), m = values per channel: 32*24*24 (bn1), 32*8*8 (bn2), 32 (bn3, bn4).
    """
    images, labels = mnist_batches
    counts = {"bn1": BATCH * 24 * 24, "bn2": BATCH * 8 * 8, "bn3": BATCH, "bn4": BATCH}
    with floatx("float64"):
        kwargs = {"convention": "keras"} if keras_bn_kind == "ours" else {}
        keras_model = keras_bn.lenet_bn(keras_bn_kind, momentum=0.9, epsilon=1e-5, seed=0, **kwargs)
        assert all(v.dtype == "float64" for v in keras_model.weights)
        torch_model = torch_ref.lenet_bn("torch").double()
        torch_ref.keras_to_torch(keras_model, torch_model)  # momentum 0.9 (Keras) -> 1 - 0.9 (torch)
        assert torch_model.bn1.momentum == 1 - 0.9
        keras_var = {bn: [keras.ops.convert_to_numpy(keras_model.get_layer(bn).moving_variance)] for bn in counts}
        torch_var = {bn: [getattr(torch_model, bn).running_var.numpy().copy()] for bn in counts}

        def snapshot(entry: StepDivergence) -> None:
            for bn in counts:
                keras_var[bn].append(keras.ops.convert_to_numpy(keras_model.get_layer(bn).moving_variance))
                torch_var[bn].append(getattr(torch_model, bn).running_var.numpy().copy())

        history = train_lockstep(
            keras_model, torch_model, images.astype("float64"), labels, lr=0.05, steps=5, on_step=snapshot
        )
    params = [n for n in history[0].per_tensor if not n.endswith(("running_mean", "running_var"))]
    worst, name, step = _worst(history, params)
    assert worst <= 1e-11, f"{name} differs by {worst:.3e} at step {step}"  # float64, as above
    worst, name, step = _worst(history, [f"{bn}.running_mean" for bn in counts])
    assert worst <= 1e-12, f"{name} differs by {worst:.3e} at step {step}"  # same EMA of the same means
    w = 1 - 0.9
    for bn, m in counts.items():
        for t in range(1, len(keras_var[bn])):
            keras_in = keras_var[bn][t] - (1 - w) * keras_var[bn][t - 1]  # w * biased batch var
            torch_in = torch_var[bn][t] - (1 - w) * torch_var[bn][t - 1]  # w * unbiased batch var
            ratio = torch_in / keras_in
            # float64 increments of size ~0.1 * var carry ~1e-15 relative error; 1e-9 leaves room and
            # still resolves bn1's Bessel factor (1 + 5.4e-5) 50,000 times over.
            np.testing.assert_allclose(ratio, m / (m - 1), rtol=1e-9, err_msg=f"{bn} step {t}")
        gap = float(np.max(torch_var[bn][-1] / keras_var[bn][-1] - 1))
        print(
            f"{bn}: m={m}, update ratio m/(m-1)={m / (m - 1):.6f}, running_var torch/keras - 1 after 5 steps {gap:.2e}"
        )


def test_copy_leaves_the_keras_model_untouched(mnist_batches) -> None:
    """The per-step comparison copies Keras -> a PyTorch mirror; the Keras weights must not move."""
    keras_model = keras_bn.lenet_bn("ours", convention="torch", momentum=0.1, epsilon=1e-5, seed=0)
    before = [keras.ops.convert_to_numpy(v).copy() for v in keras_model.weights]
    torch_model = torch_ref.lenet_bn("torch")
    torch_ref.keras_to_torch(keras_model, copy.deepcopy(torch_model))
    assert all(
        np.array_equal(a, keras.ops.convert_to_numpy(v)) for a, v in zip(before, keras_model.weights, strict=True)
    )
