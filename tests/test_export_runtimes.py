"""The deploy runtimes (LiteRT, OpenVINO, Keras on JAX) in the agreement check; skipping and bad-input errors.

The full 10k-image comparison with every runtime (``keras:jax`` included) is the slow test in
test_export_agreement.py; here a few dozen images keep each check at seconds.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from _export_models import FLAVOURS, digits, exported, trained_pair

import spec
from export import runtimes
from export.agreement import OPTIONAL_RUNTIMES, RTOL, RUNTIMES, compare_runtimes
from export.report import _skipped_runtimes_lines

U32 = 2.0**-24  # float32 unit roundoff
N_IMAGES = 48
CORE_RUNTIMES = [name for name in RUNTIMES if name not in OPTIONAL_RUNTIMES]
FAST_OPTIONAL = [name for name in OPTIONAL_RUNTIMES if name != "keras:jax"]  # JAX runs in a subprocess: slow test


def _needs_deploy_extra() -> None:
    for module in ("ai_edge_litert", "openvino"):
        pytest.importorskip(module, reason=f"{module} comes with the deploy extra")


@pytest.fixture(scope="module")
def deploy_results(tmp_path_factory):
    """flavour -> compare_runtimes on 48 digits with LiteRT and OpenVINO (LiteRT file kept in a tmp dir)."""
    _needs_deploy_extra()
    x, _ = digits()
    results = {}
    for flavour in FLAVOURS:
        keras_model, torch_model = trained_pair(flavour)
        results[flavour] = compare_runtimes(
            keras_model,
            torch_model,
            x[:N_IMAGES],
            onnx_files=exported(flavour),
            out_dir=tmp_path_factory.mktemp(flavour),
            reference_limit=16,
            skip=["keras:jax"],
        )
    return results


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_litert_and_openvino_agree_with_every_runtime(flavour, deploy_results):
    result = deploy_results[flavour]
    assert result.runtimes == [name for name in RUNTIMES if name in CORE_RUNTIMES + FAST_OPTIONAL]
    assert result.skipped == [{"runtime": "keras:jax", "reason": "skipped by the caller (skip=...)"}]
    result.raise_for_failure()  # names the pair and the worst input if anything is off
    for pair in result.pairs:  # the bound, the same for every pair
        assert pair.max_abs <= RTOL * max(1.0, pair.max_abs_logit) and pair.argmax_agreement == 1.0
    assert result.pairs[0].max_abs_logit > 1.0  # a trained net: the logits are not all near zero
    assert result.versions["litert"].startswith("ai-edge-litert 2.")
    assert all(result.versions[f"openvino:{form}"].startswith("openvino 20") for form in ("keras", "torch"))


def _spec_affine(bn_layer) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(z) = s * z + t per channel, read off spec.batch_norm_infer at z = 0 and z = 1 (float64)."""
    mean = np.asarray(bn_layer.moving_mean.numpy(), np.float64)
    var = np.asarray(bn_layer.moving_variance.numpy(), np.float64)
    gamma = np.asarray(bn_layer.gamma.numpy(), np.float64)
    beta = np.asarray(bn_layer.beta.numpy(), np.float64)
    eps = float(np.float32(bn_layer.epsilon))
    shift = spec.batch_norm_infer(np.zeros((1, mean.size)), gamma, beta, mean, var, axis=1, eps=eps)[0]
    scale = spec.batch_norm_infer(np.ones((1, mean.size)), gamma, beta, mean, var, axis=1, eps=eps)[0] - shift
    return scale, shift


def _linear_layers_and_their_bn(model):
    """[(Conv2D or Dense layer, the BN layer right after it or None)] in model order."""
    import keras

    layers, found = list(model.layers), []
    for i, layer in enumerate(layers):
        if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense):
            after = layers[i + 1] if i + 1 < len(layers) else None
            found.append((layer, after if hasattr(after, "moving_mean") else None))
    return found


#: what the LiteRT converter does with each BN layer (read from the .tflite ops): Keras' layer becomes
#: Mul/Add that the converter folds; keras_bn.BatchNorm's FusedBatchNormV3 stays as MUL + ADD.
LITERT_BN_FORM = {"builtin": "folded", "ours": "kept as MUL and ADD"}


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_litert_weights_are_the_spec_batch_norm_of_the_keras_layers(flavour, deploy_results):
    result = deploy_results[flavour]
    assert result.litert["bn_form"] == LITERT_BN_FORM[flavour]
    ops = runtimes.litert_linear_ops(result.litert["file"])
    keras_model, _ = trained_pair(flavour)
    pairs = _linear_layers_and_their_bn(keras_model)
    assert [op["op"] for op in ops] == ["CONV_2D", "CONV_2D", "FULLY_CONNECTED", "FULLY_CONNECTED", "FULLY_CONNECTED"]
    assert len(ops) == len(pairs)
    for op, (layer, bn) in zip(ops, pairs, strict=True):
        kernel = np.asarray(layer.kernel.numpy(), np.float64)
        # LiteRT stores Conv2D as (O, kh, kw, I) and Dense as (O, I); Keras as (kh, kw, I, O) and (I, O).
        weight = kernel.transpose(3, 0, 1, 2) if kernel.ndim == 4 else kernel.T
        bias = np.asarray(layer.bias.numpy(), np.float64)
        scale, shift = _spec_affine(bn) if bn is not None else (np.ones_like(bias), np.zeros_like(bias))
        # What the file computes per output channel: (W_lite x + b_lite) * mul + add.
        mul = np.ones_like(bias) if op["scale"] is None else op["scale"].astype(np.float64)
        add = np.zeros_like(bias) if op["shift"] is None else op["shift"].astype(np.float64)
        channel = (-1,) + (1,) * (weight.ndim - 1)
        w_file = op["weight"].astype(np.float64) * mul.reshape(channel)
        b_file = (np.zeros_like(bias) if op["bias"] is None else op["bias"].astype(np.float64)) * mul + add
        # The converter folds in float32: s = gamma * rsqrt(var + eps) (~2 ulp) and W * s (half an ulp).
        np.testing.assert_allclose(w_file, weight * scale.reshape(channel), rtol=8 * U32, atol=0)
        # b' = (b - mean) * s + beta cancels: bound by the magnitudes entering it, as in test_export_fold.py.
        mean = 0.0 if bn is None else np.abs(np.asarray(bn.moving_mean.numpy(), np.float64))
        beta = 0.0 if bn is None else np.abs(np.asarray(bn.beta.numpy(), np.float64))
        magnitude = (np.abs(bias) + mean) * np.abs(scale) + beta
        assert np.all(np.abs(b_file - (bias * scale + shift)) <= 16 * U32 * magnitude + 1e-30)


def test_missing_deploy_modules_skip_their_runtimes_with_the_reason(monkeypatch):
    for module in set(OPTIONAL_RUNTIMES.values()):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, find_spec gives None
    x, _ = digits()
    keras_model, torch_model = trained_pair("ours")
    result = compare_runtimes(keras_model, torch_model, x[:8], onnx_files=exported("ours"))
    assert result.runtimes == CORE_RUNTIMES
    assert [s["runtime"] for s in result.skipped] == list(OPTIONAL_RUNTIMES)
    for skipped in result.skipped:
        module = OPTIONAL_RUNTIMES[skipped["runtime"]]
        assert module in skipped["reason"] and "keras-bn[deploy]" in skipped["reason"]
    assert result.summary()["skipped"] == result.skipped and result.litert == {}
    result.raise_for_failure()
    (line, *_) = _skipped_runtimes_lines({"skipped_runtimes": result.summary()["skipped"]})  # report.md's line
    assert line.startswith("Skipped runtimes: ") and all(f"`{name}`" in line for name in OPTIONAL_RUNTIMES)


def test_skip_names_only_optional_runtimes():
    keras_model, torch_model = trained_pair("ours")
    with pytest.raises(ValueError, match=r"skip names \['torch'\]"):
        compare_runtimes(keras_model, torch_model, digits()[0][:2], onnx_files=exported("ours"), skip=["torch"])


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"\x08\x07garbage, not a protobuf\xff\xff", "not a readable ONNX model")],
    ids=["empty-file", "corrupt-file"],
)
def test_a_bad_onnx_file_is_named_in_the_error(content, message, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(content)
    keras_model, torch_model = trained_pair("ours")
    files = {**exported("ours"), "torch-folded": bad}
    with pytest.raises(ValueError, match=rf"onnx_files\['torch-folded'\] .*broken\.onnx.* {message}"):
        compare_runtimes(keras_model, torch_model, digits()[0][:2], onnx_files=files)
    x = digits()[0][:2]
    runners = [runtimes.run_ort, runtimes.run_onnx_reference]
    if runtimes.missing_module("openvino") is None:
        runners.append(runtimes.run_openvino)
    for run in runners:  # every runner that takes an ONNX path names it too
        with pytest.raises(ValueError, match=rf"broken\.onnx.* {message}"):
            run(bad, x)


@pytest.mark.parametrize(
    "images", [np.zeros((0, 28, 28), np.uint8), np.zeros((0, 28, 28, 1), np.float32)], ids=["uint8", "nhwc-float32"]
)
def test_zero_images_is_a_value_error_naming_the_argument(images):
    keras_model, torch_model = trained_pair("ours")
    with pytest.raises(ValueError, match="images is empty"):
        compare_runtimes(keras_model, torch_model, images, onnx_files=exported("ours"))
    with pytest.raises(ValueError, match="images is empty"):
        runtimes.run_ort(exported("ours")["torch"], np.zeros((0, 28, 28, 1), np.float32))


@pytest.mark.slow
def test_keras_on_jax_agrees_with_keras_on_tensorflow():
    pytest.importorskip("jax", reason="jax comes with the deploy extra")
    x, _ = digits()
    keras_model, _ = trained_pair("ours")
    tf_logits = runtimes.run_keras(keras_model, x)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        keras_model.save(Path(tmp) / "m.keras")
        jax_logits, versions = runtimes.run_keras_backend(Path(tmp) / "m.keras", x, backend="jax")
    assert set(versions) == {"keras", "jax"}
    assert jax_logits.shape == tf_logits.shape == (len(x), 10)
    scale = max(1.0, float(np.abs(tf_logits).max()))
    assert np.abs(jax_logits - tf_logits).max() <= RTOL * scale
    assert np.array_equal(jax_logits.argmax(axis=1), tf_logits.argmax(axis=1))
