"""Data for the main job: MNIST / Fashion-MNIST from IDX or Keras ``.npz``, a download cache, and an offline default.

Three sources, in the order a user meets them:

- ``load_dataset("mnist" | "fashion", data_dir)``: the four IDX files (raw or gzip) or Keras' ``.npz`` in a
  directory the user names. Every header, count and payload size is checked; a truncated or foreign file is a
  :class:`DataError` (a ``ValueError``) naming the file, never a silently wrong array. Work is bounded by what the
  headers promise: a ``.gz`` is decompressed in a stream and never past its header's payload plus one byte, and of an
  ``.npz`` only the four arrays the loader needs are opened. Files are compared (md5) with the canonical
  distribution: ``Dataset.canonical`` says whether they are it, and the other dataset's files under this one's names
  (Fashion-MNIST given as MNIST) are refused by name.
- ``load_dataset(..., download=True)``: the Keras-style path for machines with network: the four files are fetched
  into a cache directory, verified against the known md5 of the canonical distribution, and written atomically.
- ``load_dataset("digits")`` (and ``mnist``/``fashion`` without ``data_dir``): the embedded default, scikit-learn's
  bundled 8x8 handwritten digits (1,797 images, UCI "optdigits" test set) upscaled to MNIST's 28x28 layout. It needs
  no file and no network, so the main job works on a fresh machine.

IDX format (LeCun et al.): big-endian header ``0x00 0x00 <dtype=0x08 uint8> <ndim>``, then ``ndim`` uint32 sizes,
then ``prod(sizes)`` bytes. Images: magic ``0x00000803`` (count, rows, cols); labels: ``0x00000801`` (count).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = [
    "DATASET_NAMES",
    "DATASETS",
    "IDX_FILES",
    "DataError",
    "Dataset",
    "default_cache_dir",
    "download_dataset",
    "load_dataset",
    "load_digits_28",
    "read_idx",
    "to_nchw_float",
    "to_nhwc_float",
]

IMAGE_MAGIC = 0x00000803  # uint8 data, 3 dimensions
LABEL_MAGIC = 0x00000801  # uint8 data, 1 dimension
IMAGE_SIZE = 28
NUM_CLASSES = 10

# Deflate cannot expand data by more than 1032:1 (zlib's documented maximum compression factor, zlib.net/zlib_tech):
# a compressed file or .npz member that claims more is lying, and is refused before anything is decompressed. The
# slack covers gzip/zip headers and tiny files.
MAX_DEFLATE_RATIO = 1032
DEFLATE_SLACK = 1 << 16
CHUNK = 1 << 20  # bytes per streamed read


class DataError(ValueError):
    """Data that cannot be used (a file, a directory, a dataset name); the message names the file and the problem.

    A ``ValueError`` subclass, so ``keras-bn run`` reports it as bad input (exit status 2).
    """


# Logical role -> canonical file stem; the files may be stored raw or with ".gz".
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class _Remote:
    """Where a dataset's four ``.gz`` files live and their md5 (canonical distribution, see shared/data/README)."""

    base_url: str
    md5: dict[str, str]
    npz_names: tuple[str, ...]
    #: md5 of the same four files decompressed (computed from the canonical .gz files), so raw copies are recognised.
    raw_md5: dict[str, str] = field(default_factory=dict)
    #: sha256 of Keras' single-file distribution, where one exists (keras/src/datasets/mnist.py ``file_hash``).
    npz_sha256: str | None = None


DATASETS: dict[str, _Remote] = {
    # yann.lecun.com no longer serves the files; this is the mirror torchvision uses. Same bytes (md5 below).
    "mnist": _Remote(
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        npz_names=("mnist.npz",),
        raw_md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        npz_sha256="731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    ),
    # The mirror keras.datasets.fashion_mnist downloads from.
    "fashion": _Remote(
        base_url="https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        npz_names=("fashion-mnist.npz", "fashion_mnist.npz", "fashion.npz"),
        raw_md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
    ),
}
DATASET_NAMES = ("digits", "mnist", "fashion")
DISPLAY_NAMES = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}

# The embedded default: first 1,437 images train, last 360 test. No shuffling, so the split is the same on every
# machine and NumPy version; sklearn's own digits example also splits without shuffling. Classes are balanced in both
# parts (33-37 test images per class).
DIGITS_TRAIN = 1437
DIGITS_BOX = 20  # MNIST fits each digit in a 20x20 box, then centres its centre of mass in 28x28


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split of 28x28 grey images: ``x_*`` uint8 ``(N, 28, 28)``, ``y_*`` int64 ``(N,)`` in 0..9.

    ``name`` is what the arrays are ("digits", "mnist", "fashion"); ``source`` says where they came from in words
    (a directory, a download cache, or the embedded default, and why it was used); ``embedded`` is True for the
    offline default. ``canonical`` is True when every file read is byte-identical (md5; sha256 for Keras'
    ``mnist.npz``) to the canonical distribution, False when some file is not, None where there is nothing to compare
    (the embedded default, an ``.npz`` without a published checksum). ``file_md5`` maps each file read to its md5.
    """

    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    embedded: bool = False
    canonical: bool | None = None
    file_md5: dict[str, str] = field(default_factory=dict)

    def limit(self, n: int | None) -> Dataset:
        """The first ``n`` training and first ``n`` test examples (``None`` or a larger ``n``: unchanged)."""
        if n is None:
            return self
        if n < 1:
            raise ValueError(f"limit must be a positive number of examples, got {n}")
        return Dataset(
            name=self.name,
            source=self.source,
            x_train=self.x_train[:n],
            y_train=self.y_train[:n],
            x_test=self.x_test[:n],
            y_test=self.y_test[:n],
            embedded=self.embedded,
            canonical=self.canonical,
            file_md5=dict(self.file_md5),
        )


# --------------------------------------------------------------------------------------------------------- IDX files


def _check_is_file(path: Path, what: str) -> None:
    """``what`` in words ("an IDX file"): a directory in its place is named as such."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected {what}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")


def _read_up_to(stream: BinaryIO, n: int) -> bytearray:
    """Up to ``n`` bytes (fewer only at end of stream), read in chunks so memory follows the data actually there."""
    data = bytearray()
    while len(data) < n:
        part = stream.read(min(n - len(data), CHUNK))
        if not part:
            break
        data += part
    return data


def _max_expansion(stored_bytes: int) -> int:
    """The most bytes ``stored_bytes`` of deflate data can decompress to (see MAX_DEFLATE_RATIO)."""
    return MAX_DEFLATE_RATIO * stored_bytes + DEFLATE_SLACK


def _idx_header(path: Path, stream: BinaryIO, expected_magic: int | None) -> tuple[tuple[int, ...], int]:
    """Parse and check an IDX header; return its dims and header length."""
    head = _read_up_to(stream, 4)
    if len(head) < 4:
        raise DataError(f"{path}: {len(head)} bytes is too short for an IDX header")
    magic = int.from_bytes(head, "big")
    if magic not in (IMAGE_MAGIC, LABEL_MAGIC):
        raise DataError(
            f"{path}: bad magic number 0x{magic:08x}; expected 0x{IMAGE_MAGIC:08x} (images) "
            f"or 0x{LABEL_MAGIC:08x} (labels); not an IDX uint8 file"
        )
    if expected_magic is not None and magic != expected_magic:
        kind = {IMAGE_MAGIC: "images", LABEL_MAGIC: "labels"}
        raise DataError(f"{path}: holds {kind[magic]} (magic 0x{magic:08x}) where {kind[expected_magic]} were expected")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    sizes = _read_up_to(stream, 4 * ndim)
    if len(sizes) < 4 * ndim:
        raise DataError(f"{path}: truncated header ({4 + len(sizes)} bytes, need {header} for {ndim} dimensions)")
    # Python integers throughout: (2**32 - 1)**3 overflows int64, and the messages must show the true numbers.
    dims = tuple(int.from_bytes(sizes[4 * i : 4 * i + 4], "big") for i in range(ndim))
    if any(d == 0 for d in dims):
        raise DataError(f"{path}: header declares an empty dimension {dims}")
    return dims, header


def read_idx(path: str | os.PathLike[str], *, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a uint8 array of the shape its header declares.

    Checks: magic ``0x0000 08 <ndim>`` with ndim 1 (labels, ``0x801``) or 3 (images, ``0x803``), equal to
    ``expected_magic`` if given; every dimension positive; payload exactly ``prod(dims)`` bytes. Any mismatch is a
    :class:`DataError` naming the file and the problem. Bounded work: gzip is detected by content (the extension
    is not trusted) and streamed; at most the declared payload plus one byte is decompressed, and a payload larger
    than the file could hold (raw: its size; gzip: deflate's 1032:1 limit) is refused before reading it.
    """
    path = Path(path)
    _check_is_file(path, "an IDX file")
    try:
        stored = path.stat().st_size
        with path.open("rb") as probe:
            compressed = probe.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if compressed else path.open("rb") as stream:
            dims, header = _idx_header(path, stream, expected_magic)
            expected = math.prod(dims)
            capacity = _max_expansion(stored) if compressed else stored - header
            if expected > capacity:
                holds = (
                    f"a {stored}-byte gzip file can hold at most {capacity}" if compressed else f"file has {capacity}"
                )
                raise DataError(f"{path}: truncated: header declares {dims} = {expected} bytes of data, {holds}")
            payload = _read_up_to(stream, expected + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # truncated stream, bad CRC, bad deflate data
        raise DataError(f"{path}: corrupt gzip stream ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(payload) < expected:
        raise DataError(
            f"{path}: truncated: header declares {dims} = {expected} bytes of data, file has {len(payload)}"
        )
    if len(payload) > expected:
        if not compressed:  # the exact excess is known from the size
            raise DataError(
                f"{path}: {stored - header - expected} unexpected trailing bytes after {dims} = {expected} "
                "bytes of data"
            )
        raise DataError(
            f"{path}: unexpected trailing bytes after {dims} = {expected} bytes of data: the gzip stream decompresses "
            "past what its header declares (reading stopped one byte after it)"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)  # a writable view of the bytearray, no copy


def _check_split(images: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one split (shape 28x28, equal counts, labels 0..9) and return (uint8 images, int64 labels)."""
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{what}: images have shape {images.shape}, expected (N, {IMAGE_SIZE}, {IMAGE_SIZE})")
    if labels.ndim != 1:
        raise DataError(f"{what}: labels have shape {labels.shape}, expected (N,)")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{what}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{what}: labels outside 0..{NUM_CLASSES - 1} (min {labels.min()}, max {labels.max()})")
    return images.astype(np.uint8, copy=False), labels.astype(np.int64)


def _find_idx(directory: Path) -> dict[str, Path] | None:
    """The four IDX paths in ``directory`` (``.gz`` preferred over raw), None if none is there; error if some are."""
    found: dict[str, Path] = {}
    for role, stem in IDX_FILES.items():
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_dir():
                raise DataError(f"{candidate}: is a directory, expected an IDX file")
            if candidate.is_file():
                found[role] = candidate
                break
    if not found:
        return None
    missing = [IDX_FILES[r] for r in IDX_FILES if r not in found]
    if missing:
        raise DataError(f"{directory}: incomplete IDX set, missing {', '.join(missing)} (raw or .gz)")
    return found


def _digests(path: Path) -> tuple[str, str]:
    """(md5, sha256) of a file, streamed."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                md5.update(chunk)
                sha256.update(chunk)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return md5.hexdigest(), sha256.hexdigest()


def _canonical_idx(paths: dict[str, Path], name: str) -> tuple[bool, dict[str, str]]:
    """Whether the IDX files are ``name``'s canonical distribution (md5), and each file's md5.

    A file that is byte-identical to another dataset's canonical file (Fashion-MNIST under MNIST's names, which the
    format cannot tell apart) is refused, naming what it is.
    """
    md5s: dict[str, str] = {}
    canonical = True
    for role, path in paths.items():
        md5 = md5s[str(path)] = _digests(path)[0]
        for other, remote in DATASETS.items():
            known = {**remote.md5, **remote.raw_md5}
            if other != name and md5 in known.values():
                raise DataError(
                    f"{path}: is the canonical {DISPLAY_NAMES[other]} file (md5 {md5}), not {DISPLAY_NAMES[name]}; "
                    f"load it as dataset {other!r} (keras-bn run --dataset {other})"
                )
        own = DATASETS[name]
        stem = IDX_FILES[role]
        canonical &= md5 in (own.md5.get(f"{stem}.gz"), own.raw_md5.get(stem))
    return canonical, md5s


def _load_idx_dir(directory: Path, name: str) -> Dataset:
    paths = _find_idx(directory)
    assert paths is not None
    canonical, md5s = _canonical_idx(paths, name)
    arrays = {
        role: read_idx(p, expected_magic=IMAGE_MAGIC if role.endswith("images") else LABEL_MAGIC)
        for role, p in paths.items()
    }
    x_train, y_train = _check_split(arrays["train_images"], arrays["train_labels"], f"{directory} (train)")
    x_test, y_test = _check_split(arrays["test_images"], arrays["test_labels"], f"{directory} (t10k)")
    what = "canonical distribution, md5 verified" if canonical else "not the canonical distribution (md5 differs)"
    return Dataset(
        name, f"IDX files in {directory} ({what})", x_train, y_train, x_test, y_test, canonical=canonical, file_md5=md5s
    )


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_array(archive: zipfile.ZipFile, path: Path, key: str) -> np.ndarray:
    """One ``<key>.npy`` member, its header checked (dtype, shape, declared size vs stored size) before its data is
    read; the read is bounded by that declared size."""
    info = archive.getinfo(f"{key}.npy")
    where = f"{path}: {key}"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DataError(f"{where}: unsupported zip compression method {info.compress_type} (NumPy writes 0 or 8)")
    capacity = info.compress_size if info.compress_type == zipfile.ZIP_STORED else _max_expansion(info.compress_size)
    if info.file_size > capacity:
        raise DataError(
            f"{where}: member claims {info.file_size} bytes from {info.compress_size} stored bytes; corrupt archive"
        )
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
            elif version in ((2, 0), (3, 0)):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as exc:
            raise DataError(f"{where}: not a readable .npy array ({exc})") from exc
        header = member.tell()
        if dtype.hasobject or dtype.kind not in "iu":
            pixels = "raw 0..255 pixels" if key.startswith("x_") else "integer class labels"
            raise DataError(f"{where} has dtype {dtype}, expected {pixels} (an integer dtype)")
        count = math.prod(shape)  # Python integers: an absurd shape cannot wrap around
        if count == 0:
            raise DataError(f"{where} is empty (shape {shape})")
        declared, holds = count * dtype.itemsize, info.file_size - header
        if declared != holds:
            raise DataError(
                f"{where}: header claims shape {shape} of {dtype} = {declared} bytes, the member holds {holds}"
            )
        data = _read_up_to(member, declared)
    if len(data) != declared:
        raise DataError(f"{where}: truncated ({len(data)} of {declared} bytes)")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


def _load_npz(path: Path, name: str) -> Dataset:
    """Keras' ``mnist.npz`` layout: arrays x_train, y_train, x_test, y_test; nothing else in the archive is read."""
    _check_is_file(path, "a .npz file")
    md5, sha256 = _digests(path)
    for other, remote in DATASETS.items():
        if other != name and sha256 == remote.npz_sha256:
            raise DataError(
                f"{path}: is Keras' canonical {DISPLAY_NAMES[other]} .npz (sha256 {sha256}), not "
                f"{DISPLAY_NAMES[name]}; load it as dataset {other!r} (keras-bn run --dataset {other})"
            )
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        raise DataError(
            f"{path}: not a readable .npz file: it is a .npy file (one array); expected an .npz archive holding "
            f"{', '.join(NPZ_KEYS)}"
        )
    if not zipfile.is_zipfile(path):
        kind = "text" if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "data"
        raise DataError(f"{path}: not a readable .npz file: it holds {kind}, not a zip archive")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            missing = [k for k in NPZ_KEYS if f"{k}.npy" not in names]
            if missing:
                raise DataError(f"{path}: missing arrays {missing} (Keras layout has {', '.join(NPZ_KEYS)})")
            arrays = {key: _npz_array(archive, path, key) for key in NPZ_KEYS}
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    for key in ("x_train", "x_test"):
        a = arrays[key]
        if a.dtype != np.uint8 and (a.min() < 0 or a.max() > 255):
            raise DataError(f"{path}: {key} has dtype {a.dtype} with values outside uint8; expected raw 0..255 pixels")
    x_train, y_train = _check_split(arrays["x_train"], arrays["y_train"], f"{path} (train)")
    x_test, y_test = _check_split(arrays["x_test"], arrays["y_test"], f"{path} (test)")
    canonical = None if DATASETS[name].npz_sha256 is None else sha256 == DATASETS[name].npz_sha256
    what = {None: "no published checksum", True: "Keras' canonical file, sha256 verified", False: "not Keras' file"}
    return Dataset(
        name,
        f"Keras .npz {path} ({what[canonical]})",
        x_train,
        y_train,
        x_test,
        y_test,
        canonical=canonical,
        file_md5={str(path): md5},
    )


def _load_from_dir(name: str, data_dir: Path) -> Dataset:
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} is a file, expected a directory holding the dataset's files")
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist or is not a directory")
    # Accept the directory itself or a per-dataset subfolder (e.g. shared/data with mnist/ and fashion/ inside).
    subdirs = {"mnist": ("mnist",), "fashion": ("fashion", "fashion-mnist", "fashion_mnist")}[name]
    for directory in (data_dir, *(data_dir / s for s in subdirs)):
        if directory.is_dir() and _find_idx(directory) is not None:
            return _load_idx_dir(directory, name)
        for npz_name in DATASETS[name].npz_names:
            if (directory / npz_name).exists():
                return _load_npz(directory / npz_name, name)
    looked = ", ".join(f"{s}[.gz]" for s in IDX_FILES.values())
    raise DataError(
        f"no {name} data in {data_dir}: looked for {looked} or {' / '.join(DATASETS[name].npz_names)} "
        f"(also in subfolders {', '.join(subdirs)})"
    )


# ------------------------------------------------------------------------------------------------- embedded default


def _linear_resize_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) bilinear interpolation weights with half-pixel centres: ``s = (d + 0.5) * src / dst - 0.5``.

    This is the sampling grid of PIL / OpenCV / ``tf.image.resize(antialias=False)``; upscaling needs no antialias.
    """
    s = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0.0, src - 1)
    lo = np.floor(s).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = s - lo
    w = np.zeros((dst, src))
    w[np.arange(dst), lo] += 1.0 - frac
    w[np.arange(dst), hi] += frac
    return w


def _centre_of_mass_pad(box: np.ndarray) -> np.ndarray:
    """Place a (20, 20) float image in 28x28 so its centre of mass is as close to the centre as fits (MNIST layout)."""
    size, pad = IMAGE_SIZE, (IMAGE_SIZE - box.shape[0]) // 2
    total = box.sum()
    shift = np.zeros(2, dtype=int)
    if total > 0:
        rows, cols = np.indices(box.shape)
        com = np.array([(rows * box).sum(), (cols * box).sum()]) / total + pad
        # Real MNIST's mean centre of mass is (14.0, 14.0) in 0-based pixel coordinates, so aim there.
        shift = np.clip(np.rint(size / 2 - com).astype(int), -pad, pad)
    out = np.zeros((size, size))
    r, c = pad + shift[0], pad + shift[1]
    out[r : r + box.shape[0], c : c + box.shape[1]] = box
    return out


def load_digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as MNIST-like uint8 (N, 28, 28) images and int64 labels.

    Pixel counts 0..16 are scaled to 0..255 (``v * 255 / 16``), upscaled bilinearly to 20x20, and placed in 28x28
    with the centre of mass centred, as MNIST was built. Deterministic: no randomness anywhere.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # the embedded default lives in the [data] extra
        raise ImportError(
            "the embedded default dataset needs scikit-learn: pip install 'keras-bn[data]' "
            "(or pass --data-dir with MNIST IDX files)"
        ) from exc
    digits = load_digits()
    w = _linear_resize_matrix(8, DIGITS_BOX)
    boxes = np.einsum("ij,njk,lk->nil", w, digits.images * (255.0 / 16.0), w)
    images = np.stack([_centre_of_mass_pad(b) for b in boxes])
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), digits.target.astype(np.int64)


def _load_digits(requested: str) -> Dataset:
    images, labels = load_digits_28()
    source = (
        "embedded default: scikit-learn load_digits (UCI optdigits, 1,797 8x8 images from 13 writers) upscaled to "
        f"28x28; first {DIGITS_TRAIN} train, last {len(labels) - DIGITS_TRAIN} test"
    )
    if requested != "digits":
        source += f" (used in place of {requested}: no data_dir given)"
    return Dataset(
        name="digits",
        source=source,
        x_train=images[:DIGITS_TRAIN],
        y_train=labels[:DIGITS_TRAIN],
        x_test=images[DIGITS_TRAIN:],
        y_test=labels[DIGITS_TRAIN:],
        embedded=True,
    )


# ---------------------------------------------------------------------------------------------- download and cache


def default_cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/keras-bn/<name>`` (``~/.cache/keras-bn/<name>`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "keras-bn" / name


def _md5(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _fetch(url: str, target: Path, md5: str, timeout: float) -> None:
    """Stream ``url`` into a temporary file beside ``target``, check its md5, then rename over ``target``.

    The rename is atomic on one filesystem, so ``target`` is either its old content or the verified new file; a
    failed or mismatching download leaves nothing behind.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                raise OSError(f"could not download {url}: {exc}") from exc
        got = h.hexdigest()
        if got != md5:
            raise DataError(f"{url}: md5 {got} does not match the expected {md5}; the file was not kept")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def download_dataset(
    name: str, cache_dir: str | os.PathLike[str] | None = None, base_url: str | None = None, *, timeout: float = 60.0
) -> Path:
    """Fetch the four ``.gz`` IDX files of ``name`` into ``cache_dir`` (Keras ``get_file`` style) and return it.

    Files already in the cache with the right md5 are not fetched again; a cached file with the wrong md5 is
    replaced by a verified download. Raises ``ValueError`` on an md5 mismatch and ``OSError`` when the server cannot
    be reached; in both cases no partial file is left and a good cached file is never overwritten by a bad one.
    """
    if name not in DATASETS:
        raise DataError(f"cannot download {name!r}: known datasets are {sorted(DATASETS)}")
    remote = DATASETS[name]
    base_url = base_url or remote.base_url
    if not base_url.endswith("/"):
        base_url += "/"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(name)
    cache.mkdir(parents=True, exist_ok=True)
    for filename, md5 in remote.md5.items():
        target = cache / filename
        if target.is_file() and _md5(target) == md5:
            continue
        _fetch(base_url + filename, target, md5, timeout)
    return cache


# ------------------------------------------------------------------------------------------------------- public entry


def load_dataset(
    name: str = "digits",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    base_url: str | None = None,
) -> Dataset:
    """Load ``name`` ("digits", "mnist", "fashion") as a :class:`Dataset`.

    - ``digits``: the embedded default (``data_dir`` must be None).
    - ``mnist`` / ``fashion`` with ``data_dir``: IDX files (raw or .gz) or Keras ``.npz`` there or in a subfolder
      named after the dataset; with ``download=True`` the directory is a cache filled from ``base_url``.
    - ``mnist`` / ``fashion`` without ``data_dir``: with ``download=True`` the default cache; otherwise the embedded
      default, and ``source`` says so.
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if name == "digits":
        if data_dir is not None or download:
            raise DataError("'digits' is the embedded default; it takes no data directory and no download")
        return _load_digits(name)
    if download:
        cache = download_dataset(name, data_dir, base_url)
        dataset = _load_idx_dir(cache, name)
        return Dataset(
            name,
            f"downloaded from {base_url or DATASETS[name].base_url} into {cache} (md5 verified)",
            dataset.x_train,
            dataset.y_train,
            dataset.x_test,
            dataset.y_test,
            canonical=dataset.canonical,
            file_md5=dataset.file_md5,
        )
    if data_dir is None:
        return _load_digits(name)
    return _load_from_dir(name, Path(data_dir))


def to_nhwc_float(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 28, 28, 1)`` in [0, 1] (``x / 255``), the Keras input layout."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W), got {images.shape}")
    return (images.astype(np.float32) / np.float32(255.0))[..., None]


def to_nchw_float(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 1, 28, 28)`` in [0, 1], the PyTorch input layout (same values)."""
    return np.ascontiguousarray(to_nhwc_float(images).transpose(0, 3, 1, 2))
