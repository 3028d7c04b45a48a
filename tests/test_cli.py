"""The main job ``keras-bn run``: bad input exits 2 with a message, a small real run writes a checked report."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from export import cli
from export import report as rpt
from export.data import IDX_FILES, load_dataset, to_nhwc_float

REPO = Path(__file__).resolve().parents[1]
# Small and fast, yet enough steps (4 per model) for both nets to move off the initial weights.
E2E_LIMIT, E2E_EPOCHS, E2E_BATCH = 128, 1, 32


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()


def _write_idx_dir(directory: Path, *, truncate_test_images: bool = False) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for role, stem in IDX_FILES.items():
        n = 20 if role.startswith("train") else 8
        shape = (n, 28, 28) if role.endswith("images") else (n,)
        payload = _idx(rng.integers(0, 256 if role.endswith("images") else 10, shape, dtype=np.uint8))
        if truncate_test_images and role == "test_images":
            payload = payload[:-50]
        (directory / f"{stem}.gz").write_bytes(gzip.compress(payload))


# ------------------------------------------------------------------------------------------------- bad input, exit 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--epochs", "0"], "expected a positive integer, got 0"),
        (["run", "--epochs", "ten"], "expected a positive integer, got 'ten'"),
        (["run", "--batch-size", "-3"], "expected a positive integer, got -3"),
        (["run", "--lr", "0"], "expected a positive number, got 0.0"),
        (["run", "--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["run", "--limit", "0"], "expected a positive integer, got 0"),
        (["fly"], "invalid choice: 'fly'"),
        ([], "the following arguments are required: COMMAND"),
    ],
    ids=["epochs_zero", "epochs_text", "batch_negative", "lr_zero", "unknown_dataset", "limit_zero", "bad_cmd", "none"],
)
def test_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def _bad_input_case(case: str, tmp_path: Path) -> tuple[list[str], str]:
    out = tmp_path / "out"
    if case == "missing_data_dir":
        return ["--dataset", "mnist", "--data-dir", str(tmp_path / "nope")], "does not exist"
    if case == "empty_data_dir":
        (tmp_path / "empty").mkdir()
        return ["--dataset", "mnist", "--data-dir", str(tmp_path / "empty")], "no mnist data in"
    if case == "truncated_idx":
        _write_idx_dir(tmp_path / "bad", truncate_test_images=True)
        return ["--dataset", "fashion", "--data-dir", str(tmp_path / "bad")], "t10k-images-idx3-ubyte.gz: truncated"
    if case == "digits_with_dir":
        return ["--dataset", "digits", "--data-dir", str(tmp_path)], "embedded default"
    if case == "foreign_files_in_out":
        out.mkdir()
        (out / "thesis.tex").write_text("precious")
        return ["--out", str(out)], "holds files keras-bn did not write (thesis.tex)"
    if case == "out_is_a_file":
        out.write_text("a file")
        return ["--out", str(out)], "exists and is not a directory"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["missing_data_dir", "empty_data_dir", "truncated_idx", "digits_with_dir", "foreign_files_in_out", "out_is_a_file"],
)
def test_bad_input_exits_2_before_any_work(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, message = _bad_input_case(case, tmp_path)
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert cli.main(["run", "--quiet", *argv]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("keras-bn: error: ") and message in err
    # Nothing created, nothing touched (the out directory is only made once the data has loaded).
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if case == "foreign_files_in_out":
        assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_previous_output_is_accepted_foreign_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    (out / "onnx").mkdir()
    cli._check_out(out, force=False)  # only our own names: a previous run, accepted
    (out / "notes.txt").write_text("mine")
    with pytest.raises(cli.UsageError, match="notes.txt"):
        cli._check_out(out, force=False)
    cli._check_out(out, force=True)


# ------------------------------------------------------------------------------------------- report module, offline


def _minimal_report() -> dict:
    hist = {"loss": [1.0, 0.5], "accuracy": [0.5, 0.8], "val_loss": [1.1, 0.6], "val_accuracy": [0.4, 0.7]}
    return {
        "schema_version": 1,
        "tool": "keras-bn run",
        "dataset": {
            "name": "digits",
            "requested": "digits",
            "source": "s",
            "embedded": True,
            "n_train": 2,
            "n_test": 2,
        },
        "config": {
            "epochs": 2,
            "batch_size": 1,
            "lr": 0.1,
            "sgd_momentum": 0.9,
            "seed": 0,
            "bn_layer": "ours",
            "convention": "keras",
            "bn_momentum": 0.99,
            "epsilon": 1e-3,
        },
        "accuracy": {"bn": np.float32(0.7), "no_bn": 0.6, "per_epoch": {"bn": hist, "no_bn": hist}},
        "runtimes": ["x", "y"],
        "agreement_images": 2,
        "tolerance": {"rel_to_max_logit": 1e-5, "argmax_agreement": 1.0},
        "agreement": [
            {"a": "x", "b": "y", "max_abs": 1e-6, "max_rel": float("nan"), "argmax_agreement": 1.0, "max_abs_logit": 3}
        ],
        "agreement_passed": True,
        "onnx_files": {},
        "files": {"plot": "curves.png"},
        "versions": rpt.collect_versions(),
        "timings_s": {"train": 1.0},
    }


def test_report_json_is_strict_and_validated(tmp_path: Path) -> None:
    report = _minimal_report()
    rpt.write_json(report, tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    loaded = json.loads(text)
    assert "NaN" not in text and loaded["agreement"][0]["max_rel"] is None  # strict JSON: NaN -> null
    assert loaded["accuracy"]["bn"] == pytest.approx(0.7, abs=1e-7)  # float32 0.7 -> Python float (1 ulp ~ 6e-8)
    del report["agreement"][0]["argmax_agreement"]
    with pytest.raises(ValueError, match=r"agreement'\]\[0\] is missing \['argmax_agreement'\]"):
        rpt.write_json(report, tmp_path / "r2.json")
    assert not (tmp_path / "r2.json").exists()


# ------------------------------------------------------------------------------------------------ end to end, real


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk, CRC checked (an independent minimal PNG reader)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    ihdr = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(kind + ihdr) == crc, "IHDR CRC mismatch"
    assert data.endswith(b"IEND\xaeB`\x82"), "PNG is not terminated by IEND"
    return struct.unpack(">II", ihdr[:8])


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One real small run through the installed entry point, in a directory that already holds a user file."""
    out = tmp_path_factory.mktemp("e2e") / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's file")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
    argv = ["run", "--epochs", str(E2E_EPOCHS), "--limit", str(E2E_LIMIT), "--batch-size", str(E2E_BATCH)]
    argv += ["--out", str(out), "--force", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "export", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    return out, proc


def test_e2e_exit_status_and_files(e2e: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = e2e
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "notes.txt").read_text() == "the user's file"  # --force wrote beside it, never over it
    names = {p.name for p in out.iterdir()}
    assert names == {"notes.txt"} | set(cli.OUTPUT_NAMES), names
    assert not [p for p in out.rglob(".*")], "no staging or temporary file may remain"


def test_e2e_report_schema_and_numbers(e2e: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = e2e
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    rpt.validate_report(report)
    assert report["schema_version"] == 1
    ds = report["dataset"]
    assert (ds["name"], ds["embedded"], ds["n_train"], ds["n_test"]) == ("digits", True, E2E_LIMIT, E2E_LIMIT)
    assert report["config"]["epochs"] == E2E_EPOCHS and report["config"]["batch_size"] == E2E_BATCH
    acc = report["accuracy"]
    for key in ("bn", "no_bn"):
        hist = acc["per_epoch"][key]
        assert all(len(hist[m]) == E2E_EPOCHS for m in ("loss", "accuracy", "val_loss", "val_accuracy"))
        # model.evaluate after fit and the last epoch's validation see the same weights and images: equal up to
        # float32 accumulation order of the metric (1/128 is the granularity; 1e-6 is far below it).
        assert acc[key] == pytest.approx(hist["val_accuracy"][-1], abs=1e-6)
        assert 0.0 <= acc[key] <= 1.0 and np.isfinite(hist["loss"]).all()
    # Agreement: every pair meets the float32 bound, and the runtimes named in pairs are the listed ones.
    assert report["agreement_passed"] is True
    assert len(report["runtimes"]) >= 4 and len(report["agreement"]) >= len(report["runtimes"]) - 1
    for pair in report["agreement"]:
        assert {pair["a"], pair["b"]} <= set(report["runtimes"])
        assert pair["max_abs"] <= 1e-5 * max(1.0, pair["max_abs_logit"]), pair
        assert pair["argmax_agreement"] == 1.0 and pair["passed"] is True
    assert set(report["versions"]) >= {"python", "numpy", "keras", "torch", "onnx", "onnxruntime"}
    md = (out / "report.md").read_text()
    assert "| a | b | max abs Δ |" in md and "Result: **PASS**" in md


def test_e2e_report_accuracy_matches_the_saved_model(e2e: tuple[Path, subprocess.CompletedProcess]) -> None:
    """Independent check of the reported number: reload the saved Keras model and score the same test images."""
    import keras

    import keras_bn  # noqa: F401  (registers keras_bn>BatchNorm so load_model can rebuild the layer)

    out, proc = e2e
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    ds = load_dataset("digits").limit(E2E_LIMIT)
    model = keras.saving.load_model(out / report["files"]["model_bn"], compile=False)
    predicted = np.argmax(model.predict(to_nhwc_float(ds.x_test), verbose=0), axis=1)
    # Exact: accuracy is a count over 128 images; a single flip would move it by 1/128.
    assert report["accuracy"]["bn"] == pytest.approx(np.mean(predicted == ds.y_test), abs=1e-6)


def test_e2e_onnx_files_and_plot(e2e: tuple[Path, subprocess.CompletedProcess]) -> None:
    import onnx

    out, proc = e2e
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["onnx_files"], "the run must list its ONNX files"
    for rel in report["onnx_files"].values():
        model = onnx.load(out / rel)
        onnx.checker.check_model(model, full_check=True)
        assert rel.startswith("onnx/") and rel.endswith(".onnx")
    assert _png_size(out / "curves.png") == (1000, 400)  # figsize (10, 4) inches at dpi 100


def test_disagreement_exits_1_naming_pair_and_worst_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real disagreement: the PyTorch copy gets one logit bias shifted by 0.05 after the exact transfer, so every
    runtime fed by the PyTorch model (torch, ort:torch*, onnx.reference) differs from the Keras-fed ones by 0.05,
    far past 1e-5 * max(1, |logit|) for logits of a 1-step model (a few units)."""
    import torch

    transfer = cli._to_torch

    def perturbed(keras_model):
        model = transfer(keras_model)
        with torch.no_grad():
            model.fc3.bias[3] += 0.05
        return model

    monkeypatch.setattr(cli, "_to_torch", perturbed)
    out = tmp_path / "out"
    argv = ["run", "--epochs", "1", "--limit", "32", "--batch-size", "32", "--out", str(out), "--quiet"]
    assert cli.main(argv) == cli.EXIT_DISAGREE
    err = capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["agreement_passed"] is False
    failed = [p for p in report["agreement"] if not p["passed"]]
    # PyTorch-fed: the torch model and its ONNX exports in any runtime (the deploy extra adds openvino:torch*).
    runtimes = report["runtimes"]
    torch_fed = {r for r in runtimes if "torch" in r} | {"onnx.reference"}
    assert {"torch", "ort:torch", "ort:torch-folded", "onnx.reference"} <= torch_fed and "keras" in runtimes
    n_pairs = len(runtimes) * (len(runtimes) - 1) // 2
    # Exactly the pairs that mix a Keras-fed and a PyTorch-fed runtime fail: 4 x 4 = 16 of 28 without the extra.
    assert len(failed) == len(torch_fed) * (len(runtimes) - len(torch_fed))
    assert all(({p["a"], p["b"]} & torch_fed) and ({p["a"], p["b"]} - torch_fed) for p in failed)
    for pair in failed:  # the shift is 0.05 on one logit; float32 noise on top is < 1e-5
        assert pair["max_abs"] == pytest.approx(0.05, abs=1e-5)
    assert f"agreement FAILED for {len(failed)} of {n_pairs} runtime pairs" in err
    named = next(p for p in failed if f"worst: {p['a']} vs {p['b']}," in err)
    assert f"worst input: test image {named['worst_index']}" in err
