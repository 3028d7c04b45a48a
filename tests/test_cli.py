"""The main job ``keras-bn run``: every exit status (0 agree, 1 disagree, 2 bad input, 3 failed, 130 interrupted)
with its one-line message, the output directory's all-or-nothing set, and a small real run's checked report."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from _idx_files import idx_bytes

from export import cli, outdir, pipeline
from export import report as rpt
from mnist_data import IDX_FILES, load_dataset, to_nhwc_float

REPO = Path(__file__).resolve().parents[1]
# Small and fast, yet enough steps (4 per model) for both nets to move off the initial weights.
E2E_LIMIT, E2E_EPOCHS, E2E_BATCH = 128, 1, 32


def _write_idx_dir(directory: Path, *, truncate_test_images: bool = False) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for role, stem in IDX_FILES.items():
        n = 20 if role.startswith("train") else 8
        shape = (n, 28, 28) if role.endswith("images") else (n,)
        payload = idx_bytes(rng.integers(0, 256 if role.endswith("images") else 10, shape, dtype=np.uint8))
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
        (["run", "--lr", "inf"], "expected a finite positive number, got inf"),
        (["run", "--lr", "nan"], "expected a positive number, got nan"),
        (["run", "--seed", str(2**32)], f"expected an integer in [0, 2**32 - 1 = {2**32 - 1}], got {2**32}"),
        (["run", "--seed", "-1"], "got -1"),
        (["run", "--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["run", "--limit", "0"], "expected a positive integer, got 0"),
        (["run", "--batch-size", str(10**30)], f"expected a positive integer <= 2**31 - 1 = 2147483647, got {10**30}"),
        (["run", "--epochs", str(2**31)], f"<= 2**31 - 1 = 2147483647, got {2**31}"),
        (["fly"], "invalid choice: 'fly'"),
        ([], "the following arguments are required: COMMAND"),
    ],
    ids=[
        "epochs_zero",
        "epochs_text",
        "batch_negative",
        "lr_zero",
        "lr_inf",
        "lr_nan",
        "seed_2_32",
        "seed_negative",
        "unknown_dataset",
        "limit_zero",
        "batch_1e30",
        "epochs_2_31",
        "bad_cmd",
        "none",
    ],
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
    if case == "out_parent_is_a_file":
        (tmp_path / "file").write_text("a file")
        return ["--out", str(tmp_path / "file" / "out")], f"cannot create --out {tmp_path / 'file' / 'out'}: "
    if case == "latest_is_the_users":
        (out / outdir.CURRENT_LINK).mkdir(parents=True)
        return ["--out", str(out)], "latest exists and is not keras-bn's symlink"
    if case == "mnist_without_data_dir":
        return ["--dataset", "mnist"], "--dataset mnist needs --data-dir DIR (the IDX files or Keras' .npz) or --downl"
    if case == "fashion_without_data_dir":
        return ["--dataset", "fashion"], "--dataset fashion needs --data-dir DIR"
    raise AssertionError(case)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input must be refused before any model is built: training fails the test."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started although the input was bad")

    monkeypatch.setattr(pipeline, "_train", forbidden)


@pytest.mark.parametrize(
    "case",
    [
        "missing_data_dir",
        "empty_data_dir",
        "truncated_idx",
        "digits_with_dir",
        "mnist_without_data_dir",
        "fashion_without_data_dir",
        "foreign_files_in_out",
        "out_is_a_file",
        "out_parent_is_a_file",
        "latest_is_the_users",
    ],
)
def test_bad_input_exits_2_before_any_work(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    argv, message = _bad_input_case(case, tmp_path)
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert cli.main(["run", "--quiet", *argv]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("keras-bn: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line, no traceback
    # Nothing created, nothing touched.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if case == "foreign_files_in_out":
        assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize(
    ("module", "extra", "dataset"),
    [
        ("torch", "torch", "digits"),
        ("onnx", "onnx", "digits"),
        ("onnxruntime", "onnx", "digits"),
        ("tf2onnx", "onnx", "digits"),
        ("onnxscript", "onnx", "digits"),
        ("matplotlib", "data", "digits"),
        ("sklearn", "data", "digits"),
    ],
)
def test_missing_optional_dependency_exits_2_naming_the_extra(
    module: str,
    extra: str,
    dataset: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_training: None,
) -> None:
    """A Keras-only install (`pip install -e .`): simulated by a None entry in sys.modules, which makes both
    ``import module`` and ``importlib.util.find_spec(module)`` report it missing, as for an uninstalled package."""
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(pipeline, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the extras check"))
    out = tmp_path / "out"
    assert cli.main(["run", "--quiet", "--dataset", dataset, "--out", str(out)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == (
        f"keras-bn: error: keras-bn run needs {module}, not installed; install the extras: "
        f"pip install 'keras-bn[{extra}]' (or 'keras-bn[all]')\n"
    )
    assert not out.exists()


def test_scikit_learn_is_not_needed_for_mnist_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    """scikit-learn only provides the embedded digits: with --data-dir the check lets the run go on (here to a
    deliberately truncated file, so that it stops at loading with that file's own error)."""
    monkeypatch.setitem(sys.modules, "sklearn", None)
    _write_idx_dir(tmp_path / "data", truncate_test_images=True)
    argv = ["run", "--quiet", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "t10k-images-idx3-ubyte.gz: truncated" in capsys.readouterr().err


def test_previous_output_is_accepted_foreign_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with outdir.OutputDir(out) as run:
        (run.staging / "report.json").write_text("{}")
        run.publish()
    outdir.check_out_dir(out, force=False)  # only our own names (latest, the set, the lock): accepted
    (out / "notes.txt").write_text("mine")
    with pytest.raises(outdir.OutputDirError, match="notes.txt"):
        outdir.check_out_dir(out, force=False)
    outdir.check_out_dir(out, force=True)


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process that holds ``out``'s lock as a running keras-bn would (flock on the lock file), until killed."""
    out.mkdir(parents=True, exist_ok=True)
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / outdir.LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'pid %d, the other run' % os.getpid())\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_out_without_symlinks_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    """A filesystem that cannot hold symlinks (e.g. exFAT) is found when --out is opened, not at publishing."""

    def no_symlinks(*args: object, **kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(outdir.os, "symlink", no_symlinks)
    out = tmp_path / "out"
    assert cli.main(["run", "--quiet", "--out", str(out)]) == cli.EXIT_USAGE
    assert f"--out {out} cannot hold symlinks (Operation not permitted)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [outdir.LOCK_NAME]  # staging and probe removed


def test_concurrent_run_on_same_out_is_refused_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None
) -> None:
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        assert cli.main(["run", "--quiet", "--out", str(out)]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert f"--out {out} is in use by another keras-bn run (pid {holder.pid}, the other run)" in err
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no staging was made
        # The lock itself, not only the quick probe before loading data, refuses a run that starts late.
        with pytest.raises(outdir.OutputDirBusy, match=f"pid {holder.pid}, the other run"):
            outdir.OutputDir(out).open()
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone (its lock dies with it) the directory can be taken again, by one run at a time.
    with outdir.OutputDir(out) as first, pytest.raises(outdir.OutputDirBusy, match=f"pid {os.getpid()} on "):
        assert first.staging.is_dir()
        outdir.OutputDir(out).open()


# ---------------------------------------------------------------------------------------- failures exit 3 or 130


def test_internal_error_exits_3_with_one_line_and_traceback_only_with_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the loader\nsecond line of detail")

    monkeypatch.setattr(pipeline, "load_dataset", broken)
    argv = ["run", "--quiet", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err == (
        "keras-bn: error: the run failed: RuntimeError: a bug in the loader (run again with --debug for the "
        "traceback)\n"
    )
    assert cli.main([*argv, "--debug"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in broken" in err
    assert err.endswith("keras-bn: error: the run failed: RuntimeError: a bug in the loader\n")


def test_interrupt_exits_130_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "load_dataset", interrupted)
    assert cli.main(["run", "--quiet", "--out", str(tmp_path / "out")]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "keras-bn: interrupted; nothing of this run was published, --out is as it was\n"
    assert not (tmp_path / "out").exists()


def test_exit_codes_are_documented_in_help_docs_and_readme(capsys: pytest.CaptureFixture[str]) -> None:
    """Every exit status the code returns is listed, with its meaning, wherever a user looks for it."""
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    docs = (REPO / "docs" / "report.md").read_text()
    readme = " ".join((REPO / "README.md").read_text().split())
    for code, meaning in cli.EXIT_CODES.items():
        assert f"{code}: {meaning}" in help_text, code
        assert f"| `{code}` |" in docs, code
        assert f"{code}: " in readme and f"{code}: " in cli.__doc__, code


# ---------------------------------------------------------------------------- output directory: one set or nothing


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` (symlinks resolved) with its content and mtime: proof that nothing was touched."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _publish_set(out: Path, files: dict[str, bytes]) -> None:
    """A complete run set as ``keras-bn run`` publishes one: files, then report.json with their manifest."""
    with outdir.OutputDir(out) as run:
        for rel, payload in files.items():
            (run.staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (run.staging / rel).write_bytes(payload)
        listed = outdir.manifest(run.staging, exclude=frozenset({"report.json", ".staging.json"}))
        (run.staging / "report.json").write_text(json.dumps({"manifest": listed}))
        run.publish()


OLD_SET = {"report.md": b"PASS, seed 0", "lenet.keras": b"old model", "onnx/a.onnx": b"old onnx"}


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _publish_set(out, OLD_SET)
    report = json.loads((out / "latest" / "report.json").read_text())
    # Oracle: sizes and digests of the payloads we wrote, hashed here in one piece (the code reads in blocks).
    assert report["manifest"] == [
        {"path": rel, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        for rel, payload in sorted(OLD_SET.items())
    ]
    assert outdir.verify(out) == [] and outdir.verify(out / "latest") == []


@pytest.mark.parametrize("tamper", ["changed", "truncated", "missing", "extra"])
def test_verify_names_each_problem_and_the_cli_exits_1(
    tamper: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    _publish_set(out, OLD_SET)
    assert cli.main(["verify", str(out)]) == cli.EXIT_OK
    target = out / "latest" / "lenet.keras"
    if tamper == "changed":
        target.write_bytes(b"new model")  # same size, other bytes
        expected = "lenet.keras: sha256 differs from the manifest"
    elif tamper == "truncated":
        target.write_bytes(b"old")
        expected = "lenet.keras: size 3, manifest says 9"
    elif tamper == "missing":
        target.unlink()
        expected = "lenet.keras: listed in the manifest but missing"
    else:
        (out / "latest" / "onnx" / "b.onnx").write_bytes(b"stray")
        expected = "onnx/b.onnx: not in the manifest"
    assert outdir.verify(out) == [expected]
    capsys.readouterr()
    assert cli.main(["verify", str(out)]) == cli.EXIT_DISAGREE
    assert capsys.readouterr().err == f"keras-bn verify: {expected}\n"
    assert cli.main(["verify", str(tmp_path / "nope")]) == cli.EXIT_USAGE


def test_failure_while_staging_leaves_the_old_set_intact_and_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _publish_set(out, OLD_SET)
    before = _snapshot(out / "latest")
    with pytest.raises(RuntimeError, match="disk full"), outdir.OutputDir(out) as run:
        (run.staging / "lenet.keras").write_bytes(b"new model")
        (run.staging / "onnx").mkdir()
        (run.staging / "onnx" / "a.onnx").write_bytes(b"new onnx")
        raise RuntimeError("disk full")  # e.g. while writing the report
    assert _snapshot(out / "latest") == before and outdir.verify(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted([outdir.LOCK_NAME, "latest", os.readlink(out / "latest")]), (
        "the staging folder must be gone"
    )


def test_second_run_replaces_the_set_in_one_step_and_user_files_are_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's file")
    (out / "figures").mkdir()
    (out / "figures" / "fig1.png").write_bytes(b"user's figure")
    users = {rel: v for rel, v in _snapshot(out).items()}
    _publish_set(out, OLD_SET)
    first = os.readlink(out / "latest")
    _publish_set(out, {"report.md": b"PASS, seed 1"})
    second = os.readlink(out / "latest")
    assert first != second and not (out / first).exists()  # the old set is deleted only after the switch
    assert (out / "latest" / "report.md").read_bytes() == b"PASS, seed 1" and outdir.verify(out) == []
    assert not (out / "latest" / "lenet.keras").exists()  # no file of the old set leaks into the new one
    now = _snapshot(out)
    assert {rel: now[rel] for rel in users} == users
    assert sorted(p.name for p in out.iterdir()) == sorted([outdir.LOCK_NAME, "latest", second, "notes.txt", "figures"])


def _killed_run(out: Path) -> str:
    """A real run killed by SIGKILL while staging (no ``finally`` runs); returns the staging folder it left."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from export.outdir import OutputDir\n"
        f"run = OutputDir(Path({str(out)!r})).open()\n"
        "(run.staging / 'lenet_bn.keras').write_bytes(b'half a model')\n"
        "print(run.staging.name, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    return proc.stdout.strip()


def test_stale_staging_of_a_killed_run_is_cleaned_and_the_old_set_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _publish_set(out, OLD_SET)
    before = _snapshot(out / "latest")
    stale = _killed_run(out)
    assert (out / stale / "lenet_bn.keras").exists() and _snapshot(out / "latest") == before
    outdir.check_out_dir(out, force=False)  # the leftover is recognised as ours, not as the user's files
    with outdir.OutputDir(out) as run:
        assert run.cleaned == [stale] and not (out / stale).exists()
    assert _snapshot(out / "latest") == before


def test_staging_of_a_live_run_is_never_cleaned(tmp_path: Path) -> None:
    """A marker naming a live process (this one, with its real start time) is not stale, whoever holds the lock."""
    out = tmp_path / "out"
    out.mkdir()
    alive = out / f"{outdir.STAGING_PREFIX}alive"
    alive.mkdir()
    (alive / outdir.STAGING_MARKER).write_text(json.dumps(outdir._identity()))
    other_host = out / f"{outdir.STAGING_PREFIX}elsewhere"
    other_host.mkdir()
    (other_host / outdir.STAGING_MARKER).write_text(json.dumps({**outdir._identity(), "host": "not-" + os.uname()[1]}))
    reused_pid = out / f"{outdir.STAGING_PREFIX}reused"
    reused_pid.mkdir()
    (reused_pid / outdir.STAGING_MARKER).write_text(json.dumps({**outdir._identity(), "process_start": "1"}))
    with outdir.OutputDir(out) as run:
        assert run.cleaned == [reused_pid.name]  # same pid, other start time: the original process is gone
    assert alive.exists() and other_host.exists()


@pytest.mark.slow  # trains LeNet (TensorFlow start-up included: ~20-60 s on 2 busy cores)
def test_diverging_training_stops_reports_it_and_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SGD with lr 1e6 on 32 images: the loss becomes non-finite within a few steps. LeNet-BN trains first, so the run
    stops there: no second model, no export, and a set whose report says DIVERGED and lists only files that exist."""
    out = tmp_path / "out"
    argv = ["run", "--quiet", "--epochs", "3", "--limit", "32", "--batch-size", "8", "--lr", "1e6", "--out", str(out)]
    assert cli.main(argv) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("keras-bn: error: training diverged: LeNet-BN's loss became ")
    report = json.loads((out / "latest" / "report.json").read_text())
    rpt.validate_report(report)
    at = report["accuracy"]["diverged"]["bn"]
    assert (
        at["loss"] in ("nan", "inf", "-inf")
        and f"at epoch {at['epoch']}, batch {at['batch']} (SGD lr 1000000.0)" in err
    )
    assert report["status"] == "diverged" and report["failure"] in err
    assert report["accuracy"]["bn"] is None and report["accuracy"]["per_epoch"]["no_bn"]["loss"] == []
    assert "train_no_bn" not in report["timings_s"] and report["agreement"] == [] and report["onnx_files"] == {}
    assert report["files"] == {"plot": "curves.png", "report_md": "report.md", "report_json": "report.json"}
    assert sorted(p.name for p in (out / "latest").iterdir()) == ["curves.png", "report.json", "report.md"]
    assert outdir.verify(out) == []
    assert "Result: **DIVERGED**" in (out / "latest" / "report.md").read_text()


@pytest.mark.slow  # trains LeNet (TensorFlow start-up included: ~20-60 s on 2 busy cores)
def test_interrupt_after_files_are_staged_exits_130_and_keeps_the_old_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during the export, after both trained models were saved into staging: exit 130, the previous set is
    byte for byte what it was and still verifies, and nothing of the interrupted run remains."""
    out = tmp_path / "out"
    _publish_set(out, OLD_SET)
    before = _snapshot(out / "latest")
    staged: list[str] = []

    def interrupted(keras_model: object) -> None:
        staged.extend(sorted(p.name for p in out.glob(f"{outdir.STAGING_PREFIX}*/*.keras")))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_to_torch", interrupted)
    argv = ["run", "--quiet", "--epochs", "1", "--limit", "16", "--batch-size", "16", "--out", str(out)]
    assert cli.main(argv) == cli.EXIT_INTERRUPTED
    assert staged == ["lenet.keras", "lenet_bn.keras"]  # the interrupt really came with new files staged
    assert capsys.readouterr().err == "keras-bn: interrupted; nothing of this run was published, --out is as it was\n"
    assert _snapshot(out / "latest") == before and outdir.verify(out) == []
    assert not list(out.glob(f"{outdir.STAGING_PREFIX}*"))


# ------------------------------------------------------------------------------------------- report module, offline


def _minimal_report() -> dict:
    hist = {"loss": [1.0, 0.5], "accuracy": [0.5, 0.8], "val_loss": [1.1, 0.6], "val_accuracy": [0.4, 0.7]}
    return {
        "schema_version": rpt.SCHEMA_VERSION,
        "tool": "keras-bn run",
        "status": "passed",
        "machine": {"cpu_model": "x", "vector_extensions": [], "machine": "x86_64", "usable_cpus": 2},
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
        "wall_time_s": 1.5,
        "manifest": [{"path": "report.md", "size": 10, "sha256": "0" * 64}],
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


def test_report_status_must_match_the_agreement(tmp_path: Path) -> None:
    report = _minimal_report()
    report["status"] = "disagreed"  # but agreement_passed is True
    with pytest.raises(ValueError, match=r"report\['status'\] 'disagreed' contradicts agreement_passed"):
        rpt.write_json(report, tmp_path / "r.json")
    report["status"] = "crashed"
    with pytest.raises(ValueError, match="expected one of passed, disagreed, diverged"):
        rpt.write_json(report, tmp_path / "r.json")


@pytest.mark.parametrize(
    ("optimizer", "recipe", "says"),
    [
        ("sgd", None, "LeNet-BN. Training: 2 epochs, batch size 1, SGD lr 0.1 momentum 0.9"),
        ("adam", {"title": "LeNet-5 (Paperspace)", "dataset_note": None}, "LeNet-5 (Paperspace). Training:"),
        ("adam", {"title": "LeNet-5", "dataset_note": "MNIST not available"}, "LeNet-5 (MNIST not available)"),
    ],
    ids=["lenet-bn-sgd", "lenet5-adam", "lenet5-embedded-note"],
)
def test_markdown_names_the_recipe_and_the_optimizer_that_ran(optimizer, recipe, says) -> None:
    report = _minimal_report()
    report["config"].update(optimizer=optimizer, **({"recipe": recipe} if recipe else {}))
    md = rpt.render_markdown(rpt._json_safe(report))
    assert says in md
    assert ("SGD lr" in md) == (optimizer == "sgd") and ("Adam lr 0.1" in md) == (optimizer == "adam")


def test_markdown_of_a_diverged_run_says_so_and_shows_no_agreement() -> None:
    """A diverged run: null accuracy, a NaN loss (null in JSON), the second model never trained, no pairs."""
    report = _minimal_report()
    nan_history = {"loss": [float("nan")], "accuracy": [0.1], "val_loss": [float("nan")], "val_accuracy": [0.1]}
    empty = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    report.update(
        status="diverged",
        failure="training diverged: LeNet-BN's loss became nan at epoch 1, batch 3",
        agreement=[],
        agreement_passed=False,
        runtimes=[],
    )
    report["accuracy"] = {
        "bn": None,
        "no_bn": None,
        "per_epoch": {"bn": nan_history, "no_bn": empty},
        "diverged": {"bn": {"epoch": 1, "batch": 3, "loss": "nan"}},
    }
    md = rpt.render_markdown(rpt._json_safe(report))
    assert "Result: **DIVERGED**. training diverged: LeNet-BN's loss became nan at epoch 1, batch 3" in md
    assert "| LeNet-BN | n/a | non-finite | 10.00% |" in md and "| LeNet (no BN) | n/a | n/a | n/a |" in md
    assert "LeNet-BN diverged: non-finite loss at epoch 1, batch 3." in md
    assert "Not run: training diverged" in md and "| a | b |" not in md and "PASS" not in md


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


@pytest.mark.slow  # trains LeNet (TensorFlow start-up included: ~20-60 s on 2 busy cores)
def test_e2e_exit_status_and_files(e2e: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = e2e
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "notes.txt").read_text() == "the user's file"  # --force wrote beside it, never over it
    names = {p.name for p in out.iterdir()}
    set_dir = os.readlink(out / "latest")
    assert names == {"notes.txt", "latest", outdir.LOCK_NAME, set_dir} and set_dir.startswith(outdir.SET_PREFIX)
    top = {p.name for p in (out / "latest").iterdir()}
    assert top == {"report.json", "report.md", "curves.png", "onnx", *cli.MODEL_FILES.values()}, top
    assert not [p for p in (out / "latest").rglob(".*")], "no staging or temporary file may remain"
    assert outdir.verify(out) == []  # every file in report.json's manifest, with its size and sha256


@pytest.mark.slow  # trains LeNet (TensorFlow start-up included: ~20-60 s on 2 busy cores)
def test_e2e_report_schema_and_numbers(e2e: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = e2e
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "latest" / "report.json").read_text())
    rpt.validate_report(report)
    assert report["schema_version"] == 2 and report["status"] == "passed"
    assert report["machine"]["cpu_model"] and 0 < report["wall_time_s"] < 900
    ds = report["dataset"]
    assert (ds["name"], ds["embedded"], ds["n_train"], ds["n_test"]) == ("digits", True, E2E_LIMIT, E2E_LIMIT)
    assert ds["canonical"] is None and ds["file_md5"] == {}  # nothing to compare for the embedded default
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
    md = (out / "latest" / "report.md").read_text()
    assert "| a | b | max abs Δ |" in md and "Result: **PASS**" in md and "Machine: " in md


@pytest.mark.slow  # trains LeNet (TensorFlow start-up included: ~20-60 s on 2 busy cores)
def test_e2e_report_accuracy_matches_the_saved_model(e2e: tuple[Path, subprocess.CompletedProcess]) -> None:
    """Independent check of the reported number: reload the saved Keras model and score the same test images."""
    import keras

    import keras_bn  # noqa: F401  (registers keras_bn>BatchNorm so load_model can rebuild the layer)

    out, proc = e2e
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "latest" / "report.json").read_text())
    ds = load_dataset("digits").limit(E2E_LIMIT)
    model = keras.saving.load_model(out / "latest" / report["files"]["model_bn"], compile=False)
    predicted = np.argmax(model.predict(to_nhwc_float(ds.x_test), verbose=0), axis=1)
    # Exact: accuracy is a count over 128 images; a single flip would move it by 1/128.
    assert report["accuracy"]["bn"] == pytest.approx(np.mean(predicted == ds.y_test), abs=1e-6)


@pytest.mark.slow  # trains LeNet (TensorFlow start-up included: ~20-60 s on 2 busy cores)
def test_e2e_onnx_files_and_plot(e2e: tuple[Path, subprocess.CompletedProcess]) -> None:
    import onnx

    out, proc = e2e
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "latest" / "report.json").read_text())
    assert report["onnx_files"], "the run must list its ONNX files"
    for rel in report["onnx_files"].values():
        model = onnx.load(out / "latest" / rel)
        onnx.checker.check_model(model, full_check=True)
        assert rel.startswith("onnx/") and rel.endswith(".onnx")
    assert _png_size(out / "latest" / "curves.png") == (1000, 400)  # figsize (10, 4) inches at dpi 100


@pytest.mark.slow  # trains LeNet (TensorFlow start-up included: ~20-60 s on 2 busy cores)
def test_disagreement_exits_1_naming_pair_and_worst_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real disagreement: the PyTorch copy gets one logit bias shifted by 0.05 after the exact transfer, so every
    runtime fed by the PyTorch model (torch, ort:torch*, onnx.reference) differs from the Keras-fed ones by 0.05,
    far past 1e-5 * max(1, |logit|) for logits of a 1-step model (a few units)."""
    import torch

    transfer = pipeline._to_torch

    def perturbed(keras_model):
        model = transfer(keras_model)
        with torch.no_grad():
            model.fc3.bias[3] += 0.05
        return model

    monkeypatch.setattr(pipeline, "_to_torch", perturbed)
    out = tmp_path / "out"
    argv = ["run", "--epochs", "1", "--limit", "32", "--batch-size", "32", "--out", str(out), "--quiet"]
    assert cli.main(argv) == cli.EXIT_DISAGREE
    err = capsys.readouterr().err
    report = json.loads((out / "latest" / "report.json").read_text())
    assert report["agreement_passed"] is False and report["status"] == "disagreed"
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


# ---------------------------------------------------------------------------------- keras-bn check MODEL.keras


CHECK_IMAGE = (12, 12, 3)  # (H, W, C) of the small user model below
# The optional runtimes (deploy extra) run the same ONNX files and are covered by tests/test_export_runtimes.py; here
# they would only add their start-up time (LiteRT conversion, a JAX subprocess).
CHECK_SKIP = ["--skip", "keras:jax", "--skip", "litert", *[f"--skip=openvino:{f}" for f in ("keras", "keras-folded")]]
CHECK_SKIP += [f"--skip=openvino:{f}" for f in ("torch", "torch-folded")]
# BN layers of the user model: (layer, epsilon), Keras' own layer and ours with PyTorch's convention
CHECK_BN = {"bn_keras": 1e-3, "bn_ours": 1e-5}


def _user_model(unsupported: bool = False):
    """A small functional, channels-last model with two BN layers whose moving statistics are moved off 0 and 1 (as
    training would), so that a converter which dropped them would disagree."""
    import keras

    import keras_bn

    inputs = keras.Input(CHECK_IMAGE)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(epsilon=CHECK_BN["bn_keras"], name="bn_keras")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.UpSampling2D(name="upsample")(x) if unsupported else keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(6, 3, name="conv2")(x)
    x = keras_bn.BatchNorm(epsilon=CHECK_BN["bn_ours"], convention="torch", name="bn_ours")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(5, name="logits")(x), name="user_net")
    rng = np.random.default_rng(1)
    for name in CHECK_BN:
        layer = model.get_layer(name)
        layer.moving_mean.assign(rng.normal(0.0, 0.3, layer.moving_mean.shape).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape).astype("float32"))
    return model


@pytest.fixture(scope="module")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check")
    files = {"model": root / "user_net.keras", "unsupported": root / "upsample.keras", "images": root / "images.npz"}
    _user_model().save(files["model"])
    _user_model(unsupported=True).save(files["unsupported"])
    images = np.random.default_rng(2).random((8, *CHECK_IMAGE), dtype=np.float32)
    np.savez(files["images"], images=images)
    np.savez(root / "wrong_shape.npz", images=images[:, :10])
    np.savez(root / "wrong_dtype.npz", images=images.astype(np.float64))
    np.savez(root / "wrong_key.npz", x=images)
    (root / "notes.txt").write_text("not a model")
    (root / "fake.keras").write_text("not a zip archive")
    (root / "no_images").mkdir()
    (root / "no_images" / "readme.txt").write_text("no pictures here")
    (root / "broken_images").mkdir()
    (root / "broken_images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return files


def _check_bad_case(case: str, files: dict[str, Path]) -> tuple[list[str], str]:
    root, model = files["model"].parent, str(files["model"])
    cases = {  # case -> (argv after "check", what the one-line error must say)
        "missing-model": ([str(root / "nope.keras")], f"{root / 'nope.keras'} does not exist or is not a file"),
        "not-keras-suffix": ([str(root / "notes.txt")], "notes.txt is not a Keras model file (.keras"),
        "keras-suffix-not-a-zip": ([str(root / "fake.keras")], "fake.keras is not a Keras model file (.keras"),
        "unsupported-layer": ([str(files["unsupported"])], "keras layer 'upsample' (UpSampling2D) cannot be converted"),
        "images-missing": ([model, "--images", str(root / "nope.npz")], "does not exist or is not a file"),
        "images-wrong-shape": ([model, "--images", str(root / "wrong_shape.npz")], "float32 (8, 10, 12, 3); the model"),
        "images-wrong-dtype": (
            [model, "--images", str(root / "wrong_dtype.npz")],
            "is float64 (8, 12, 12, 3); the mod",
        ),
        "images-wrong-key": ([model, "--images", str(root / "wrong_key.npz")], "no array 'images' in it (found ['x'])"),
        "images-dir-without-images": ([model, "--images", str(root / "no_images")], "no_images holds no image files"),
        "images-dir-undecodable-file": ([model, "--images", str(root / "broken_images")], "cannot read broken.png: "),
        "skip-unknown": ([model, "--skip", "torch"], "--skip torch: not an optional runtime"),
    }
    return cases[case]


@pytest.mark.parametrize(
    "case",
    [
        "missing-model",
        "not-keras-suffix",
        "keras-suffix-not-a-zip",
        "unsupported-layer",
        "images-missing",
        "images-wrong-shape",
        "images-wrong-dtype",
        "images-wrong-key",
        "images-dir-without-images",
        "images-dir-undecodable-file",
        "skip-unknown",
    ],
)
def test_check_bad_input_exits_2_naming_it_without_traceback(
    case: str, user_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, message = _check_bad_case(case, user_files)
    out = tmp_path / "out"
    assert cli.main(["check", *argv, "--out", str(out), "--quiet"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("keras-bn: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # refused before anything was created


def test_check_python_api_refuses_images_of_the_wrong_shape(user_files: dict[str, Path]) -> None:
    import export

    wrong = np.zeros((2, 5, 5, 3), np.float32)
    with pytest.raises(ValueError, match=r"images is float32 \(2, 5, 5, 3\); the model needs float32 \(N, 12, 12, 3\)"):
        export.check_model(user_files["model"], images=wrong)


def test_check_reads_a_folder_of_image_files(tmp_path: Path) -> None:
    """``--images DIR``: pixels / 255 exactly at the model's size; other sizes and modes converted and resized."""
    from PIL import Image

    from export.check import load_image_dir

    rng = np.random.default_rng(3)
    exact = rng.integers(0, 256, (*CHECK_IMAGE[:2], 3), dtype=np.uint8)
    Image.fromarray(exact).save(tmp_path / "a_exact.png")
    Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8)).save(tmp_path / "b_gray_larger.png")
    (tmp_path / "c_notes.txt").write_text("ignored: not an image file")
    images, described = load_image_dir(tmp_path, CHECK_IMAGE)
    assert images.dtype == np.float32 and images.shape == (2, *CHECK_IMAGE)
    np.testing.assert_array_equal(images[0], exact.astype(np.float32) / np.float32(255))  # PNG is lossless
    gray = images[1]
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])  # grayscale -> RGB repeats the channel
    assert 0.0 <= gray.min() and gray.max() <= 1.0
    assert described.startswith("2 image files from") and "1 resized bilinear to 12x12" in described


def test_check_help_lists_images_default_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "check" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["check", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--images DIR|FILE.npz" in help_text and "32 deterministic float32 images" in help_text
    for code, meaning in cli.EXIT_CODES.items():
        assert f"{code}: {meaning}" in help_text, code


def test_check_own_model_agrees_exits_0_with_a_verifiable_report(
    user_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["check", str(user_files["model"]), "--images", str(user_files["images"]), "--out", str(out), "--quiet"]
    assert cli.main([*argv, *CHECK_SKIP]) == cli.EXIT_OK, capsys.readouterr().err[-3000:]
    assert capsys.readouterr().err == ""
    assert cli.main(["verify", str(out)]) == cli.EXIT_OK  # the set is complete: every file matches its manifest
    report = json.loads((out / "latest" / "report.json").read_text())
    rpt.validate_report(report)
    assert (report["tool"], report["status"], report["agreement_passed"]) == ("keras-bn check", "passed", True)
    # The layers we built, with their own epsilon (independent of the converter's reading of them).
    assert {bn["name"]: bn["epsilon"] for bn in report["model"]["bn_layers"]} == pytest.approx(CHECK_BN, rel=1e-7)
    assert report["model"]["input_shape"] == [None, *CHECK_IMAGE] and report["images"]["n"] == 8
    assert {"keras", "torch", "ort:keras", "ort:keras-folded", "ort:torch", "ort:torch-folded"} <= set(
        report["runtimes"]
    )
    # 'same' padding and global pooling are beyond the NumPy spec forward: skipped, with the reason said.
    assert any(s["runtime"] == "spec" and "conv1" in s["reason"] for s in report["skipped_runtimes"])
    assert sorted(report["onnx_files"]) == ["keras", "keras-folded", "torch", "torch-folded"]
    for pair in report["agreement"]:  # the project's float32 bound (export.agreement.RTOL), 100% argmax
        assert pair["max_abs"] <= 1e-5 * max(1.0, pair["max_abs_logit"]) and pair["argmax_agreement"] == 1.0
    md = (out / "latest" / "report.md").read_text()
    assert (
        "# keras-bn check report" in md
        and "Result: **PASS**" in md
        and "| bn_ours | keras_bn>BatchNorm | torch |" in md
    )


def test_check_disagreement_exits_1_naming_pair_and_worst_input(
    user_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The converted twin gets logit 3's bias shifted by 0.05 after the exact conversion: every PyTorch-fed runtime
    (torch, its two ONNX files in ORT, onnx.reference) then differs from every Keras-fed one by 0.05, far past
    1e-5 * max(1, |logit|) for logits below 10."""
    import torch

    from export import check

    convert = check._to_torch

    def perturbed(keras_model):
        model = convert(keras_model)
        (bias,) = [p for name, p in model.named_parameters() if name.endswith("bias") and p.numel() == 5]
        with torch.no_grad():
            bias[3] += 0.05
        return model

    monkeypatch.setattr(check, "_to_torch", perturbed)
    out = tmp_path / "out"
    argv = ["check", str(user_files["model"]), "--images", str(user_files["images"]), "--out", str(out), "--quiet"]
    assert cli.main([*argv, *CHECK_SKIP]) == cli.EXIT_DISAGREE
    err = capsys.readouterr().err
    report = json.loads((out / "latest" / "report.json").read_text())
    assert (report["status"], report["agreement_passed"]) == ("disagreed", False)
    runtimes = report["runtimes"]
    torch_fed = {"torch", "ort:torch", "ort:torch-folded", "onnx.reference"}
    failed = [p for p in report["agreement"] if not p["passed"]]
    assert len(failed) == len(torch_fed) * (len(runtimes) - len(torch_fed))
    assert all(({p["a"], p["b"]} & torch_fed) and ({p["a"], p["b"]} - torch_fed) for p in failed)
    for pair in failed:  # the shift is 0.05 on one logit; float32 noise on top is < 1e-5
        assert pair["max_abs"] == pytest.approx(0.05, abs=1e-5)
    assert err.count("\n") == 1 and "Traceback" not in err
    named = next(p for p in failed if f"worst: {p['a']} vs {p['b']}," in err)
    assert f"worst input: image {named['worst_index']}" in err
