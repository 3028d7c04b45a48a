"""Data loaders: canonical MNIST, synthetic and corrupt IDX files, Keras .npz, the embedded default, local download."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import math
import shutil
import threading
import tracemalloc
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _idx_files import idx_bytes, write_idx_set

from mnist_data import (
    IDX_FILES,
    DataError,
    download_dataset,
    load_dataset,
    read_idx,
    to_nchw_float,
    to_nhwc_float,
)
from mnist_data import loaders as data

# md5 of the canonical distribution, copied from shared/data/README.md (an independent source from mnist_data).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# Published MNIST test-set class counts (LeCun et al.; also what every framework's loader reports).
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ canonical MNIST


def test_shared_mnist_files_have_canonical_md5(mnist_dir: Path) -> None:
    assert {name: _md5(mnist_dir / name) for name in MNIST_MD5} == MNIST_MD5


def test_shared_mnist_loads_with_published_counts(mnist_dir: Path) -> None:
    ds = load_dataset("mnist", mnist_dir)
    assert ds.name == "mnist" and not ds.embedded and str(mnist_dir) in ds.source
    assert ds.canonical is True and {Path(p).name: md5 for p, md5 in ds.file_md5.items()} == MNIST_MD5
    assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert np.bincount(ds.y_test, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert np.bincount(ds.y_train, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    # The first training label of MNIST is a 5 and the first test label a 7 (visible in any MNIST tutorial).
    assert (ds.y_train[0], ds.y_test[0]) == (5, 7)
    # Background is 0 and strokes saturate at 255 in the canonical files.
    assert ds.x_train.min() == 0 and ds.x_train.max() == 255


def test_parent_directory_with_dataset_subfolder_is_accepted(mnist_dir: Path) -> None:
    ds = load_dataset("mnist", mnist_dir.parent)
    assert ds.x_test.shape == (10000, 28, 28) and ds.y_test[0] == 7


# ---------------------------------------------------------------------------------------------- synthetic IDX files


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_synthetic_idx_roundtrip(tmp_path: Path, rng: np.random.Generator, gz: bool) -> None:
    arrays = write_idx_set(tmp_path, rng, gz=gz)
    ds = load_dataset("fashion", tmp_path)
    assert ds.canonical is False and "not the canonical distribution" in ds.source  # our own random files
    np.testing.assert_array_equal(ds.x_train, arrays["train_images"])
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"].astype(np.int64))
    np.testing.assert_array_equal(ds.x_test, arrays["test_images"])
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"].astype(np.int64))
    assert ds.y_test.dtype == np.int64


def test_gzip_detected_by_content_not_extension(tmp_path: Path, rng: np.random.Generator) -> None:
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    path = tmp_path / "labels-without-gz-suffix"
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(read_idx(path), labels)


def _corrupt(kind: str, rng: np.random.Generator) -> bytes:
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    good = idx_bytes(images)
    if kind == "bad_magic":
        return b"\x00\x00\x09\x03" + good[4:]
    if kind == "truncated":
        return good[:-100]
    if kind == "oversized":
        return good + b"\x00" * 5
    if kind == "wrong_count":  # header says 4 images, payload holds 3
        return good[:4] + (4).to_bytes(4, "big") + good[8:]
    if kind == "short_header":
        return good[:10]
    if kind == "empty":
        return b""
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("bad_magic", "bad magic number 0x00000903"),
        ("truncated", "truncated"),
        ("oversized", "unexpected trailing bytes after"),
        ("wrong_count", "truncated"),
        ("short_header", "truncated header"),
        ("empty", "too short"),
    ],
    ids=["bad_magic", "truncated", "oversized", "wrong_count", "short_header", "empty"],
)
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_corrupt_idx_is_a_clear_error(tmp_path: Path, rng: np.random.Generator, kind: str, message: str, gz: bool):
    payload = _corrupt(kind, rng)
    path = tmp_path / ("bad.gz" if gz else "bad")
    path.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(DataError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_stream_is_a_clear_error(tmp_path: Path, rng: np.random.Generator) -> None:
    compressed = gzip.compress(idx_bytes(rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match="corrupt gzip stream"):
        read_idx(path)


def _gzip_bomb(header_and_payload: bytes, zeros: int) -> bytes:
    """A gzip stream of ``header_and_payload`` followed by ``zeros`` zero bytes, compressed in 1 MB steps (fast)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip container
    parts = [compressor.compress(header_and_payload)]
    chunk = bytes(1 << 20)
    for _ in range(zeros >> 20):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush())
    return b"".join(parts)


class _CountingStream:
    """Wraps a decompressing stream and counts the bytes the loader takes out of it."""

    def __init__(self, stream) -> None:
        self.stream, self.taken = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.taken += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()


def test_gzip_bomb_is_refused_after_reading_what_the_header_promises(
    tmp_path: Path, rng: np.random.Generator, monkeypatch
) -> None:
    """64 MB of zeros after a 3-image header (the .gz is ~64 KB): at most header + payload + 1 bytes come out."""
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(_gzip_bomb(idx_bytes(images), 64 << 20))
    assert path.stat().st_size < 200_000
    streams: list[_CountingStream] = []
    real_open = gzip.open

    def counting_open(*args, **kwargs):
        streams.append(_CountingStream(real_open(*args, **kwargs)))
        return streams[-1]

    monkeypatch.setattr(gzip, "open", counting_open)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="unexpected trailing bytes after .* decompresses past") as info:
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    header, promised = 16, images.size
    assert [s.taken for s in streams] == [header + promised + 1]
    # The old loader held all 64 MB; now the payload plus zlib's and gzip's own buffers (~1 MB) remain.
    assert peak < 4 << 20, f"peak {peak} bytes"


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_absurd_header_is_refused_before_reading_in_python_integers(tmp_path: Path, gz: bool) -> None:
    """(2**32 - 1)**3 bytes wraps int64; the check and the message use the exact Python integer."""
    dims = (2**32 - 1,) * 3
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in dims)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(header + bytes(100)) if gz else header + bytes(100))
    with pytest.raises(DataError, match=rf"truncated: header declares .* = {math.prod(dims)} bytes of data, "):
        read_idx(path)


def test_raw_trailing_bytes_are_counted_exactly(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(rng.integers(0, 10, 7, dtype=np.uint8)) + bytes(5))
    with pytest.raises(DataError, match=r"5 unexpected trailing bytes after \(7,\) = 7 bytes"):
        read_idx(path)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz: is a directory, expected an IDX file"),
        ("train-images-idx3-ubyte", "train-images-idx3-ubyte: is a directory, expected an IDX file"),
        ("mnist.npz", "mnist.npz: is a directory, expected a .npz file"),
    ],
    ids=["gz_idx_is_a_dir", "raw_idx_is_a_dir", "npz_is_a_dir"],
)
def test_directory_where_a_file_is_expected_is_named(
    tmp_path: Path, rng: np.random.Generator, where: str, message: str
) -> None:
    if where != "mnist.npz":
        write_idx_set(tmp_path, rng, gz=where.endswith(".gz"))
        (tmp_path / where).unlink()
    (tmp_path / where).mkdir()
    with pytest.raises(DataError, match=message):
        load_dataset("mnist", tmp_path)


def test_read_idx_of_a_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory, expected an IDX file"):
        read_idx(tmp_path)


@pytest.mark.parametrize(
    ("asked", "given", "raw_file"),
    [("mnist", "fashion", None), ("fashion", "mnist", None), ("mnist", "fashion", "t10k-labels-idx1-ubyte")],
    ids=["fashion_gz_as_mnist", "mnist_gz_as_fashion", "one_raw_fashion_file_among_mnist"],
)
def test_the_other_datasets_canonical_files_are_named(
    tmp_path: Path, mnist_dir: Path, asked: str, given: str, raw_file: str | None
) -> None:
    """Both datasets use the same file names and format; only the md5 (shared/data/README.md) tells them apart."""
    source = {"mnist": mnist_dir, "fashion": mnist_dir.parent / "fashion"}
    stems = list(IDX_FILES.values())
    for stem in stems:
        (tmp_path / f"{stem}.gz").symlink_to(source[asked if raw_file else given] / f"{stem}.gz")
    wrong = f"{stems[0]}.gz"
    if raw_file:  # replace one file by the other dataset's, decompressed
        (tmp_path / f"{raw_file}.gz").unlink()
        (tmp_path / raw_file).write_bytes(gzip.decompress((source[given] / f"{raw_file}.gz").read_bytes()))
        wrong = raw_file
    names = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}
    with pytest.raises(
        DataError,
        match=rf"{wrong}: is the canonical {names[given]} file \(md5 [0-9a-f]{{32}}\), "
        rf"not {names[asked]}; load it as dataset '{given}'",
    ):
        load_dataset(asked, tmp_path)


def test_data_errors_are_bad_input_for_the_cli(tmp_path: Path, rng: np.random.Generator, capsys) -> None:
    """The CLI maps ValueError to exit status 2 ('bad input'); DataError is one, so a bad file is never a crash."""
    from export.cli import main

    assert issubclass(DataError, ValueError)
    write_idx_set(tmp_path / "data", rng, gz=True)
    (tmp_path / "data" / "t10k-images-idx3-ubyte.gz").write_bytes(_gzip_bomb(idx_bytes(np.zeros((5, 28, 28))), 1 << 20))
    status = main(["run", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "t10k-images-idx3-ubyte.gz: unexpected trailing bytes" in err


def _mutate_set(directory: Path, case: str, rng: np.random.Generator) -> None:
    if case == "label_count_mismatch":
        (directory / IDX_FILES["train_labels"]).write_bytes(idx_bytes(rng.integers(0, 10, 11, dtype=np.uint8)))
    elif case == "labels_where_images_expected":
        (directory / IDX_FILES["test_images"]).write_bytes(idx_bytes(rng.integers(0, 10, 5, dtype=np.uint8)))
    elif case == "label_out_of_range":
        (directory / IDX_FILES["test_labels"]).write_bytes(idx_bytes(np.array([0, 1, 2, 3, 10], dtype=np.uint8)))
    elif case == "wrong_image_size":
        (directory / IDX_FILES["test_images"]).write_bytes(idx_bytes(rng.integers(0, 256, (5, 32, 32))))
    elif case == "missing_file":
        (directory / IDX_FILES["test_labels"]).unlink()
    else:
        raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("label_count_mismatch", "12 images but 11 labels"),
        ("labels_where_images_expected", "holds labels .* where images were expected"),
        ("label_out_of_range", r"labels outside 0\.\.9"),
        ("wrong_image_size", r"shape \(5, 32, 32\)"),
        ("missing_file", "incomplete IDX set, missing t10k-labels-idx1-ubyte"),
    ],
    ids=["label_count_mismatch", "labels_where_images_expected", "label_out_of_range", "wrong_image_size", "missing"],
)
def test_inconsistent_idx_set_is_a_clear_error(tmp_path: Path, rng: np.random.Generator, case: str, message: str):
    write_idx_set(tmp_path, rng, gz=False)
    _mutate_set(tmp_path, case, rng)
    with pytest.raises(DataError, match=message):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize(
    ("setup", "message"),
    [("missing", "does not exist"), ("empty", "no mnist data in")],
    ids=["missing_dir", "empty_dir"],
)
def test_bad_data_dir_is_a_clear_error(tmp_path: Path, setup: str, message: str) -> None:
    target = tmp_path / "nowhere" if setup == "missing" else tmp_path
    with pytest.raises(DataError, match=message):
        load_dataset("mnist", target)


def test_unknown_dataset_and_digits_with_dir_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(DataError, match="embedded default"):
        load_dataset("digits", tmp_path)


# ------------------------------------------------------------------------------------------------------- Keras .npz


def test_keras_npz(tmp_path: Path, rng: np.random.Generator) -> None:
    arrays = {
        "x_train": rng.integers(0, 256, (9, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 9).astype(np.uint8),  # Keras' mnist.npz stores uint8 labels
        "x_test": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 4).astype(np.uint8),
    }
    np.savez_compressed(tmp_path / "mnist.npz", **arrays)
    ds = load_dataset("mnist", tmp_path)
    assert "mnist.npz" in ds.source
    for key in arrays:
        np.testing.assert_array_equal(getattr(ds, key), arrays[key])
    assert ds.y_train.dtype == np.int64 and ds.x_train.dtype == np.uint8


def _npy_bytes(array: np.ndarray | None = None, *, header: dict | None = None, data: bytes = b"") -> bytes:
    """One .npy member: NumPy's own writer for a real array, or a hand-made header claiming anything."""
    out = io.BytesIO()
    if header is None:
        np.save(out, array, allow_pickle=False)
    else:
        np.lib.format.write_array_header_1_0(out, header)
        out.write(data)
    return out.getvalue()


def _write_npz(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, payload in members.items():
            archive.writestr(f"{key}.npy", payload)


NPZ_CASES = {
    "missing_key": ("missing arrays \\['y_test'\\]"),
    "float_pixels": "x_train has dtype float64, expected raw 0..255 pixels",
    "pixels_above_255": "x_train has dtype int64 with values outside uint8",
    "float_labels": "y_test has dtype float64, expected integer class labels",
    "bool_pixels": "x_test has dtype bool, expected raw 0..255 pixels",
    "bool_labels": "y_train has dtype bool",
    "object_labels": "y_train has dtype object",
    "empty_arrays": r"x_train is empty \(shape \(0, 28, 28\)\)",
    "absurd_shape": r"x_train: header claims shape \(1099511627776, 28, 28\) of uint8 = 862017116176384 bytes",
    # 2**62 * 2 * 4 = 2**65 bytes: an int64 product would wrap to 0; the message shows the true number.
    "shape_beyond_int64": rf"x_test: header claims shape \(4611686018427387904, 2, 4\) of uint8 = {2**65} bytes",
    "garbage": "not a readable .npz file",
    "npy_named_npz": "not a readable .npz file: it is a .npy file",
    "text_named_npz": "not a readable .npz file: it holds text, not a zip archive",
}


def _npz_case(path: Path, case: str, rng: np.random.Generator) -> None:
    x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 3)
    good = {"x_train": x, "y_train": y, "x_test": x, "y_test": y}
    if case == "missing_key":
        np.savez(path, x_train=x, y_train=y, x_test=x)
    elif case in ("float_pixels", "pixels_above_255", "float_labels", "bool_pixels", "bool_labels", "empty_arrays"):
        key, value = {
            "float_pixels": ("x_train", x / 255.0),
            "pixels_above_255": ("x_train", x.astype(np.int64) + 256),
            "float_labels": ("y_test", y.astype(np.float64)),
            "bool_pixels": ("x_test", x > 0),
            "bool_labels": ("y_train", y > 4),
            "empty_arrays": ("x_train", np.zeros((0, 28, 28), np.uint8)),
        }[case]
        np.savez(path, **{**good, key: value})
    elif case == "object_labels":  # a pickled member: refused from its header, never unpickled
        members = {k: _npy_bytes(v) for k, v in good.items()}
        members["y_train"] = _npy_bytes(header={"descr": "|O", "fortran_order": False, "shape": (3,)}, data=b"x" * 24)
        _write_npz(path, members)
    elif case in ("absurd_shape", "shape_beyond_int64"):
        key, shape = {"absurd_shape": ("x_train", (2**40, 28, 28)), "shape_beyond_int64": ("x_test", (2**62, 2, 4))}[
            case
        ]
        members = {k: _npy_bytes(v) for k, v in good.items()}
        members[key] = _npy_bytes(header={"descr": "|u1", "fortran_order": False, "shape": shape}, data=x.tobytes())
        _write_npz(path, members)
    elif case == "npy_named_npz":
        np.save(path.open("wb"), x)
    elif case == "text_named_npz":
        path.write_text("x_train,y_train\n1,2\n")
    elif case == "garbage":
        path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    else:
        raise AssertionError(case)


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_bad_npz_is_a_clear_error(tmp_path: Path, rng: np.random.Generator, case: str) -> None:
    path = tmp_path / "mnist.npz"
    _npz_case(path, case, rng)
    with pytest.raises(DataError, match=NPZ_CASES[case]) as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value)


def test_npz_reads_only_the_four_arrays(tmp_path: Path, rng: np.random.Generator, monkeypatch) -> None:
    """An unrelated 64 MB member (compressed to ~64 KB) is never opened: peak memory stays far below its size."""
    x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 3).astype(np.uint8)
    path = tmp_path / "mnist.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for key, value in {"x_train": x, "y_train": y, "x_test": x, "y_test": y}.items():
            archive.writestr(f"{key}.npy", _npy_bytes(value))
        with archive.open("unrelated.npy", "w", force_zip64=True) as member:
            member.write(_npy_bytes(header={"descr": "|u1", "fortran_order": False, "shape": (64 << 20,)}))
            zeros = bytes(1 << 20)
            for _ in range(64):
                member.write(zeros)
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def recording_open(self, name, *args, **kwargs):
        opened.append(name if isinstance(name, str) else name.filename)
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", recording_open)
    tracemalloc.start()
    try:
        ds = load_dataset("mnist", tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(ds.x_train, x)
    assert sorted(opened) == ["x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
    assert peak < 8 << 20, f"peak {peak} bytes: the 64 MB member was read"  # 8 MB: 1 MB read chunks + NumPy/zip


# ------------------------------------------------------------------------------------------------ embedded default


def test_embedded_default_shape_split_and_labels() -> None:
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert ds.embedded and ds.name == "digits" and "scikit-learn" in ds.source
    assert ds.x_train.shape == (1437, 28, 28) and ds.x_test.shape == (360, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    # Labels are sklearn's, in order: first 1437 train, last 360 test.
    target = load_digits().target
    np.testing.assert_array_equal(np.concatenate([ds.y_train, ds.y_test]), target)
    # MNIST layout: a 4-pixel empty border is guaranteed only on the rows/cols the 20x20 box cannot reach after the
    # centre-of-mass shift, which is at most 4 pixels; so check the global property: stroke maxima reach 255 (sklearn
    # pixel value 16 -> 255) and each image's centre of mass lies within 1.5 px of (14, 14) like real MNIST.
    assert ds.x_train.max() == 255
    x = ds.x_train.astype(np.float64)
    rows, cols = np.indices((28, 28))
    total = x.sum(axis=(1, 2))
    com = np.stack([(x * rows).sum(axis=(1, 2)) / total, (x * cols).sum(axis=(1, 2)) / total], axis=1)
    assert np.abs(com - 14.0).max() <= 1.5  # integer shift leaves <= 0.5 px per axis unless clipped at the border


def test_embedded_default_used_for_mnist_without_dir_and_says_so() -> None:
    ds = load_dataset("mnist")
    assert ds.embedded and ds.name == "digits" and "in place of mnist" in ds.source
    assert ds.canonical is None and ds.file_md5 == {}  # no file, nothing to compare


def test_embedded_default_is_deterministic_and_matches_a_hand_upscale() -> None:
    from sklearn.datasets import load_digits

    a, b = load_dataset("digits"), load_dataset("digits")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    # Independent check of the upscale on one image: bilinear with half-pixel centres reproduces a constant image
    # exactly, and the sum of a bilinear upscale of 8->20 scales the mass by ~(20/8)^2. Compare total intensity of
    # image 0 to sklearn's 8x8 sum * 255/16 * 6.25 within 5% (edge clamping shifts a little mass).
    src = load_digits().images[0] * 255.0 / 16.0
    ratio = a.x_train[0].astype(np.float64).sum() / (src.sum() * (20 / 8) ** 2)
    assert abs(ratio - 1.0) < 0.05


def test_resize_matrix_rows_sum_to_one_and_match_pil() -> None:
    from PIL import Image

    w = data._linear_resize_matrix(8, 20)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)  # float64 partition of unity
    img = np.random.default_rng(0).uniform(0, 255, (8, 8)).astype(np.float32)
    ours = w @ img.astype(np.float64) @ w.T
    pil = np.asarray(Image.fromarray(img, mode="F").resize((20, 20), Image.Resampling.BILINEAR))
    # PIL computes in float32 with the same half-pixel grid (upscaling, so no antialias support widening):
    # 1e-3 absolute on values up to 255 is ~4 float32 ulps.
    np.testing.assert_allclose(ours, pil, rtol=0, atol=1e-3)


# -------------------------------------------------------------------------------------------------- float layouts


def test_float_layouts() -> None:
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    nhwc = to_nhwc_float(images)
    nchw = to_nchw_float(images)
    assert nhwc.shape == (1, 2, 2, 1) and nhwc.dtype == np.float32
    assert nchw.shape == (1, 1, 2, 2) and nchw.dtype == np.float32 and nchw.flags.c_contiguous
    np.testing.assert_array_equal(nhwc[0, :, :, 0], np.array([[0, 1], [0.2, 0.4]], dtype=np.float32))
    np.testing.assert_array_equal(nchw[0, 0], nhwc[0, :, :, 0])


def test_limit() -> None:
    ds = load_dataset("digits").limit(100)
    assert ds.x_train.shape == (100, 28, 28) and ds.y_test.shape == (100,)
    with pytest.raises(ValueError, match="positive"):
        ds.limit(0)


# --------------------------------------------------------------------------------------- download from local HTTP


@pytest.fixture
def serve() -> Iterator:
    """Start a quiet http.server on 127.0.0.1 (ephemeral port) serving a directory; shut it down afterwards."""
    servers = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    def start(directory: Path) -> tuple[str, list[str]]:
        requests: list[str] = []

        class Recording(Quiet):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                requests.append(self.path)
                super().do_GET()

        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Recording, directory=str(directory))
        )
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/", requests

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_from_local_server_verifies_and_caches(tmp_path: Path, mnist_dir: Path, serve) -> None:
    url, requests = serve(mnist_dir)
    cache = tmp_path / "cache"
    ds = load_dataset("mnist", cache, download=True, base_url=url)
    assert "md5 verified" in ds.source and ds.x_test.shape == (10000, 28, 28)
    assert {p.name: _md5(p) for p in cache.iterdir()} == MNIST_MD5  # exactly the four files, no leftovers
    assert sorted(requests) == sorted(f"/{name}" for name in MNIST_MD5)
    # Second call: everything cached with the right md5, nothing fetched.
    download_dataset("mnist", cache, base_url=url)
    assert len(requests) == 4


def test_download_md5_mismatch_is_an_error_and_leaves_nothing(tmp_path: Path, mnist_dir: Path, serve) -> None:
    served = tmp_path / "served"
    served.mkdir()
    for name in MNIST_MD5:
        shutil.copyfile(mnist_dir / name, served / name)
    # A tampered file on the server: same name, one byte different.
    bad = served / "t10k-labels-idx1-ubyte.gz"
    payload = bytearray(bad.read_bytes())
    payload[-1] ^= 0xFF
    bad.write_bytes(bytes(payload))
    url, _ = serve(served)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: md5 .* does not match the expected ec29112d"):
        download_dataset("mnist", cache, base_url=url)
    assert not (cache / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list(cache.glob(".*part")), "no temporary file may remain"


def test_download_never_clobbers_a_good_cached_file(tmp_path: Path, mnist_dir: Path, serve) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    good = cache / "train-labels-idx1-ubyte.gz"
    shutil.copyfile(mnist_dir / good.name, good)
    # A wrong cached file is replaced; a good one is left untouched even though the server now serves garbage.
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"stale partial download")
    served = tmp_path / "served"
    served.mkdir()
    for name in MNIST_MD5:
        shutil.copyfile(mnist_dir / name, served / name)
    (served / good.name).write_bytes(b"garbage that must never reach the cache")
    url, requests = serve(served)
    download_dataset("mnist", cache, base_url=url)
    assert _md5(good) == MNIST_MD5[good.name]
    assert _md5(cache / "t10k-labels-idx1-ubyte.gz") == MNIST_MD5["t10k-labels-idx1-ubyte.gz"]
    assert f"/{good.name}" not in requests


def test_download_unreachable_server_is_an_oserror(tmp_path: Path, serve) -> None:
    url, _ = serve(tmp_path)  # serves an empty directory: every file is a 404
    with pytest.raises(OSError, match="could not download .*train-images-idx3-ubyte.gz"):
        download_dataset("mnist", tmp_path / "cache", base_url=url)
    assert list((tmp_path / "cache").iterdir()) == []
