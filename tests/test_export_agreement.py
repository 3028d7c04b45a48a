"""Agreement across runtimes on real MNIST test images, and how a disagreement is reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _export_models import FLAVOURS, exported, trained_pair

from export import runtimes
from export.agreement import (
    OPTIONAL_RUNTIMES,
    RTOL,
    RUNTIMES,
    AgreementError,
    AgreementResult,
    compare_pair,
    compare_runtimes,
)
from mnist_data import load_dataset

REQUIRED_KEYS = {"a", "b", "max_abs", "max_rel", "argmax_agreement", "max_abs_logit"}


@pytest.fixture(scope="module")
def mnist_test(mnist_dir):
    return load_dataset("mnist", data_dir=mnist_dir).x_test


def _check(result: AgreementResult, n: int) -> None:
    skipped = [s["runtime"] for s in result.skipped]
    assert result.runtimes == [name for name in RUNTIMES if name not in skipped]
    assert set(skipped) <= set(OPTIONAL_RUNTIMES)
    pairs = len(result.runtimes) * (len(result.runtimes) - 1) // 2
    assert len(result.pairs) == pairs
    assert set(result.versions) == set(result.runtimes)
    result.raise_for_failure()  # names the pair and worst input if anything is off
    for pair in result.pairs:
        # the bound: max|d| <= 1e-5 * max(1, max|logit|) in float32, argmax agreement 100%
        assert pair.max_abs <= RTOL * max(1.0, pair.max_abs_logit)
        assert pair.argmax_agreement == 1.0
        assert pair.n == min(result.counts[pair.a], result.counts[pair.b])
    # the logits are not degenerate: a trained net, so some logits are large and the runtimes did run
    assert result.pairs[0].max_abs_logit > 1.0
    assert result.n_inputs == n


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_runtimes_agree_on_1000_mnist_test_images(flavour, mnist_test):
    keras_model, torch_model = trained_pair(flavour)
    # 1000 images keep CI at seconds; onnx.reference (~5 ms/image) sees the first 250. Full 10k: the slow test.
    # The deploy runtimes (LiteRT export, a JAX subprocess) have their own fast test in test_export_runtimes.py.
    result = compare_runtimes(
        keras_model,
        torch_model,
        mnist_test[:1000],
        onnx_files=exported(flavour),
        reference_limit=250,
        skip=list(OPTIONAL_RUNTIMES),
    )
    _check(result, 1000)
    assert [s["runtime"] for s in result.skipped] == list(OPTIONAL_RUNTIMES)
    assert result.counts["onnx.reference"] == 250 and result.counts["spec"] == 1000
    rows = json.loads(json.dumps(result.to_json()))  # what report.json holds
    assert all(REQUIRED_KEYS <= set(row) for row in rows)
    assert {(row["a"], row["b"]) for row in rows} == {(p.a, p.b) for p in result.pairs}
    assert set(result.onnx_files) == {"keras", "keras-folded", "torch", "torch-folded"}


@pytest.mark.slow
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_runtimes_agree_on_all_10000_mnist_test_images(flavour, mnist_test, tmp_path):
    keras_model, torch_model = trained_pair(flavour)
    result = compare_runtimes(keras_model, torch_model, mnist_test, out_dir=tmp_path)
    _check(result, 10_000)
    for skipped in result.skipped:  # only a runtime whose module is missing may be left out here
        assert runtimes.missing_module(OPTIONAL_RUNTIMES[skipped["runtime"]]) == skipped["reason"]
    assert all(count == 10_000 for count in result.counts.values())
    print(f"\n{flavour}:\n{result.to_markdown()}")


def _logits(rng, n=50):
    return rng.normal(0, 4, (n, 10)).astype(np.float32)


def test_a_drifting_logit_fails_naming_the_pair_and_input(rng):
    a = _logits(rng)
    b = a.copy()
    b[37, 2] += np.float32(3e-4)  # 3e-4 > 1e-5 * max|logit| (~15)
    pair = compare_pair("ort:keras", a, "torch", b)
    assert not pair.passed and pair.worst_index == 37 and pair.argmax_agreement == 1.0
    result = AgreementResult(["ort:keras", "torch"], [pair], {}, len(a), RTOL)
    with pytest.raises(AgreementError, match=r"ort:keras vs torch.*worst input 37"):
        result.raise_for_failure()


def test_a_flipped_argmax_fails_even_within_tolerance(rng):
    a = _logits(rng)
    a[11] = -10.0
    a[11, :2] = [5.0, 5.0 - 1e-6]  # a near tie: a 2e-6 nudge (within tolerance) flips the argmax
    b = a.copy()
    b[11, 1] += np.float32(2e-6)
    pair = compare_pair("keras", a, "spec", b)
    assert pair.max_abs <= pair.tolerance
    assert pair.argmax_agreement == pytest.approx(1 - 1 / len(a))
    assert not pair.passed and pair.worst_index == 11


def test_identical_logits_pass_with_zero_difference(rng):
    a = _logits(rng)
    pair = compare_pair("torch", a, "ort:torch", a.copy())
    assert pair.passed and pair.max_abs == 0.0 and pair.max_rel == 0.0 and pair.argmax_agreement == 1.0
    assert pair.max_abs_logit == pytest.approx(float(np.abs(a).max()))


def test_compare_runtimes_rejects_images_it_cannot_read():
    keras_model, torch_model = trained_pair("ours")
    with pytest.raises(ValueError, match="images must be uint8"):
        compare_runtimes(keras_model, torch_model, np.zeros((4, 28, 28), np.float64), onnx_files=exported("ours"))
