"""Logits of LeNet-BN in each runtime, from the same NHWC float32 images.

Every runner takes images as Keras gets them, ``(N, H, W, C)`` float32, and returns ``(N, classes)``
logits; runners for NCHW models (PyTorch, its ONNX export) transpose on the way in. ONNX models
say their layout in the ``input_layout`` metadata written by :mod:`export.onnx.exporters`.

:func:`run_spec` is the independent reference: the network written out in NumPy with every BN
computed by ``spec.batch_norm_infer``, in float64.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = [
    "OPTIONAL_RUNTIMES",
    "export_litert",
    "litert_batchnorm_form",
    "litert_linear_ops",
    "litert_op_names",
    "load_onnx",
    "missing_module",
    "onnx_layout",
    "ort_session",
    "run_keras",
    "run_keras_backend",
    "run_litert",
    "run_onnx_reference",
    "run_openvino",
    "run_ort",
    "run_spec",
    "run_torch",
]

#: runtime family -> the module it needs (installed by the ``deploy`` extra).
OPTIONAL_RUNTIMES: dict[str, str] = {"litert": "ai_edge_litert", "openvino": "openvino", "keras:jax": "jax"}


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.float32:
        raise ValueError(f"images must be float32 NHWC (N, H, W, C), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ValueError("images is empty: at least one image is needed")
    return images


def _batched(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int) -> np.ndarray:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return np.concatenate([fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def run_keras(model, images: np.ndarray, *, batch_size: int = 1000) -> np.ndarray:
    """``model.predict`` (inference mode, TensorFlow backend)."""
    return np.asarray(model.predict(_check_images(images), batch_size=batch_size, verbose=0))


def run_torch(model, images: np.ndarray, *, batch_size: int = 1000) -> np.ndarray:
    """PyTorch eager in ``eval()`` mode under ``no_grad`` (the model's training flag is restored)."""
    import torch

    images = _check_images(images)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _batched(
                lambda x: model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy(),
                images,
                batch_size,
            )
    finally:
        model.train(was_training)


def onnx_layout(model) -> str:
    """``"NHWC"`` or ``"NCHW"``: the ``input_layout`` metadata, else guessed from a 1- or 3-channel input."""
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("input_layout") in ("NHWC", "NCHW"):
        return props["input_layout"]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) == 4 and dims[3] in (1, 3) and dims[1] not in (1, 3):
        return "NHWC"
    if len(dims) == 4 and dims[1] in (1, 3):
        return "NCHW"
    raise ValueError(f"cannot tell the input layout of an ONNX model with input shape {dims}; set input_layout")


def ort_session(path: str | os.PathLike[str], *, threads: int | None = None, optimize: bool = False):
    """An ONNX Runtime CPU session.

    ``optimize=False`` disables ORT's graph optimizations, so the graph runs as exported: in
    particular ORT's own Conv+BatchNormalization fusion would otherwise fold the BN before the
    ``BatchNormalization`` kernel ever runs. ``threads`` sets ``intra_op_num_threads`` (and one
    inter-op thread); None keeps ORT's default.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _to_layout(images: np.ndarray, layout: str) -> np.ndarray:
    return images if layout == "NHWC" else np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def run_ort(
    path: str | os.PathLike[str],
    images: np.ndarray,
    *,
    batch_size: int = 1000,
    threads: int | None = None,
    optimize: bool = False,
) -> np.ndarray:
    """ONNX Runtime on an exported file (see :func:`ort_session` for ``optimize``)."""
    images = _check_images(images)
    layout = onnx_layout(load_onnx(path))
    session = ort_session(path, threads=threads, optimize=optimize)
    name = session.get_inputs()[0].name
    return _batched(lambda x: session.run(None, {name: _to_layout(x, layout)})[0], images, batch_size)


def run_onnx_reference(path: str | os.PathLike[str], images: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    """``onnx.reference.ReferenceEvaluator``: the ONNX operators' Python reference (slow: ~5 ms per image)."""
    from onnx.reference import ReferenceEvaluator

    images = _check_images(images)
    model = load_onnx(path)
    layout = onnx_layout(model)
    evaluator = ReferenceEvaluator(model)
    name = model.graph.input[0].name
    return _batched(lambda x: evaluator.run(None, {name: _to_layout(x, layout)})[0], images, batch_size)


# ---------------------------------------------------------------------------------------------
# Optional deployment runtimes (the ``deploy`` extra): LiteRT, OpenVINO, Keras on another backend


def missing_module(module: str) -> str | None:
    """Why ``module`` cannot be used (one line), or None when it imports.

    ``jax`` is only looked up, not imported: it runs in a subprocess (:func:`run_keras_backend`), and
    importing it beside TensorFlow would cost seconds for nothing.
    """
    hint = "install the deploy extra: pip install 'keras-bn[deploy]'"
    try:
        if module == "jax":
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed ({hint})"
            return None
        importlib.import_module(module)
    except ImportError as error:
        return f"{module} cannot be imported ({error}; {hint})"
    return None


def _interpreter(path: str | os.PathLike[str], threads: int | None, *, delegates: bool = True):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver)


def export_litert(model, path: str | os.PathLike[str]) -> Path:
    """``model.export(path, format="litert")``: float32 .tflite with a dynamic batch axis, NHWC in, logits out."""
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export(str(path), format="litert", verbose=False)
    return path


def run_litert(
    path: str | os.PathLike[str], images: np.ndarray, *, batch_size: int = 1000, threads: int | None = None
) -> np.ndarray:
    """The LiteRT interpreter on a .tflite file, default delegates on (XNNPACK runs every float32 op here)."""
    images = _check_images(images)
    interpreter = _interpreter(path, threads)
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    allocated = [-1]

    def run(x: np.ndarray) -> np.ndarray:
        if allocated[0] != len(x):  # the batch axis is dynamic (-1): size the tensors per batch length
            interpreter.resize_tensor_input(source["index"], [len(x), *source["shape"][1:]])
            interpreter.allocate_tensors()
            allocated[0] = len(x)
        interpreter.set_tensor(source["index"], np.ascontiguousarray(x))
        interpreter.invoke()
        return interpreter.get_tensor(target["index"]).copy()

    return _batched(run, images, batch_size)


_LITERT_LINEAR = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_LITERT_AFFINE = ("MUL", "ADD", "SUB", "DIV")


def litert_linear_ops(path: str | os.PathLike[str]) -> list[dict]:
    """Each Conv/FullyConnected op of a .tflite file in graph order, with what follows it per channel.

    Returns dicts ``{"op", "weight", "bias", "scale", "shift"}``: the op's constant weight (LiteRT
    layout: (O, kh, kw, I) or (O, I)) and bias (None if absent), and the constant operand of a MUL
    (``scale``) or ADD (``shift``) applied to its output, if the converter left one (after
    shape-only RESHAPEs). Read without delegates, so the tensors are the file's own buffers.
    """
    interpreter = _interpreter(path, 1, delegates=False)
    interpreter.allocate_tensors()
    ops = interpreter._get_ops_details()  # the only public-enough view of the op list without a schema parser
    produced = {i for op in ops for i in op["outputs"]}
    inputs = {d["index"] for d in interpreter.get_input_details()}

    def const(index: int) -> np.ndarray | None:
        if index < 0 or index in produced or index in inputs:
            return None
        return np.array(interpreter.get_tensor(index))

    readers: dict[int, list[dict]] = {}
    for op in ops:
        for i in op["inputs"]:
            readers.setdefault(i, []).append(op)

    def follow(value: int) -> tuple[str | None, np.ndarray | None, int]:
        """The first per-channel MUL/ADD reading ``value`` (through RESHAPE/SHAPE readers only)."""
        for op in readers.get(value, []):
            if op["op_name"] == "RESHAPE":
                found = follow(op["outputs"][0])
                if found[0]:
                    return found
            elif op["op_name"] in _LITERT_AFFINE:
                other = [i for i in op["inputs"] if i != value]
                operand = const(other[0]) if len(other) == 1 else None
                if operand is not None:
                    return op["op_name"], operand, op["outputs"][0]
        return None, None, value

    found = []
    for op in ops:
        if op["op_name"] not in _LITERT_LINEAR:
            continue
        weight, bias = const(op["inputs"][1]), (const(op["inputs"][2]) if len(op["inputs"]) > 2 else None)
        entry = {"op": op["op_name"], "weight": weight, "bias": bias, "scale": None, "shift": None}
        kind, operand, out = follow(op["outputs"][0])
        while kind in ("MUL", "ADD"):
            key = "scale" if kind == "MUL" else "shift"
            if entry[key] is not None:
                break
            entry[key] = operand.reshape(-1)
            kind, operand, out = follow(out)
        if kind in ("SUB", "DIV"):
            raise ValueError(f"{path}: a {kind} by a constant follows {op['op_name']}; not a BN form this reads")
        found.append(entry)
    return found


def litert_op_names(path: str | os.PathLike[str]) -> list[str]:
    """The builtin op names of a .tflite file, in execution order."""
    interpreter = _interpreter(path, 1, delegates=False)
    return [op["op_name"] for op in interpreter._get_ops_details()]


def litert_batchnorm_form(path: str | os.PathLike[str]) -> str:
    """How the LiteRT converter kept BN, read from the ops of the file.

    ``"folded"``: no per-channel MUL/ADD after any Conv/FullyConnected (BN lives in their weights);
    ``"scale kept as MUL, shift folded into the bias"``; ``"kept as MUL and ADD"``.
    """
    ops = litert_linear_ops(path)
    scale = any(op["scale"] is not None for op in ops)
    shift = any(op["shift"] is not None for op in ops)
    if not scale and not shift:
        return "folded"
    if scale and not shift:
        return "scale kept as MUL, shift folded into the bias"
    return "kept as MUL and ADD"


def run_openvino(
    path: str | os.PathLike[str], images: np.ndarray, *, batch_size: int = 1000, threads: int | None = None
) -> np.ndarray:
    """OpenVINO's CPU plugin compiling the ONNX file directly, inference precision forced to float32.

    The CPU plugin's default ``INFERENCE_PRECISION_HINT`` is bfloat16 on CPUs with AVX512_BF16/AMX,
    which would compare bf16 logits (8-bit mantissa) against float32 ones; f32 is what is compared here.
    """
    import openvino

    images = _check_images(images)
    layout = onnx_layout(load_onnx(path))
    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = openvino.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: _to_layout(x, layout)})
        return np.array(request.get_output_tensor(0).data)

    return _batched(run, images, batch_size)


def run_keras_backend(
    model_path: str | os.PathLike[str],
    images: np.ndarray,
    *,
    backend: str = "jax",
    batch_size: int = 1000,
    timeout: float = 600.0,
) -> tuple[np.ndarray, dict[str, str]]:
    """A saved ``.keras`` model's ``predict`` under another Keras backend, in a subprocess.

    A process has one Keras backend (chosen at import from ``KERAS_BACKEND``), so the model file is
    loaded by ``python -m export.runtimes`` with ``KERAS_BACKEND=backend``. Returns (logits, versions).
    """
    images = _check_images(images)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "KERAS_BACKEND": backend}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        x_path, y_path = Path(tmp) / "images.npy", Path(tmp) / "logits.npy"
        np.save(x_path, images)
        command = [sys.executable, "-m", "export.runtimes", str(model_path), str(x_path), str(y_path), str(batch_size)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"Keras on {backend} failed on {model_path} (exit {done.returncode}):\n{tail}")
        return np.load(y_path), json.loads(done.stdout.strip().splitlines()[-1])


def _keras_worker(model_path: str, x_path: str, y_path: str, batch_size: str) -> None:
    """Body of :func:`run_keras_backend`'s subprocess: load, predict, save; print versions as JSON."""
    import keras

    import keras_bn  # noqa: F401  (registers keras_bn.BatchNorm for deserialization)

    backend = keras.backend.backend()
    if backend != os.environ.get("KERAS_BACKEND"):
        raise SystemExit(f"asked for Keras backend {os.environ.get('KERAS_BACKEND')!r}, got {backend!r}")
    model = keras.saving.load_model(model_path)
    logits = model.predict(np.load(x_path), batch_size=int(batch_size), verbose=0)
    np.save(y_path, np.asarray(logits))
    framework = importlib.import_module(backend)
    print(json.dumps({"keras": keras.__version__, backend: getattr(framework, "__version__", "unknown")}))


def load_onnx(path: str | os.PathLike[str], *, what: str = "ONNX file"):
    """``onnx.load`` that names the file when it is missing, empty, corrupt or has no graph input."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as error:
        raise ValueError(f"{what} {path} is not a readable ONNX model: {error}") from error
    if not model.graph.input or not model.graph.output:
        raise ValueError(f"{what} {path} is not an ONNX model: it has no graph inputs or outputs")
    return model


# ---------------------------------------------------------------------------------------------
# The network in NumPy, BN from the spec


def _conv2d_valid(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """'valid' stride-1 convolution, NHWC x (kh, kw, C, O) kernel: y[n,h,w,o] = sum_ijc x[n,h+i,w+j,c] k[i,j,c,o]."""
    kh, kw = kernel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # (N, H', W', C, kh, kw)
    y = np.einsum("nhwcij,ijco->nhwo", windows, kernel, optimize=True)
    return y if bias is None else y + bias


def _max_pool(x: np.ndarray, size: tuple[int, int], reduce: Callable = np.max) -> np.ndarray:
    """Non-overlapping 'valid' max pooling (stride == pool size), NHWC; ``reduce=np.mean``: average pooling."""
    (ph, pw), (n, h, w, c) = size, x.shape
    h2, w2 = h // ph, w // pw
    return reduce(x[:, : h2 * ph, : w2 * pw].reshape(n, h2, ph, w2, pw, c), axis=(2, 4))


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation weights, half-pixel centres: src = (dst + 0.5) * n_in / n_out - 0.5, clamped."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    low = np.floor(src).astype(int)
    high, frac = np.minimum(low + 1, n_in - 1), src - low
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(weights, (np.arange(n_out), high), frac)
    return weights


def _resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """NHWC bilinear resize without antialiasing (tf.image.resize, torch align_corners=False, ONNX half_pixel)."""
    return np.einsum("ih,nhwc,jw->nijc", _bilinear_matrix(x.shape[1], height), x, _bilinear_matrix(x.shape[2], width))


def _activation(layer, x: np.ndarray) -> np.ndarray:
    name = getattr(getattr(layer, "activation", None), "__name__", "linear")
    if name == "linear":
        return x
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if name == "tanh":
        return np.tanh(x)
    raise ValueError(f"spec forward: layer {layer.name!r} has activation {name!r}; only linear, relu, sigmoid, tanh")


def _spec_layer(layer, x: np.ndarray) -> np.ndarray:
    import keras

    import spec

    def weight(v):
        return None if v is None else np.asarray(v.numpy(), np.float64)

    if hasattr(layer, "moving_mean") and hasattr(layer, "moving_variance"):  # keras or keras_bn BatchNorm
        mean, var = weight(layer.moving_mean), weight(layer.moving_variance)
        gamma = weight(getattr(layer, "gamma", None))
        beta = weight(getattr(layer, "beta", None))
        gamma = np.ones_like(mean) if gamma is None else gamma
        beta = np.zeros_like(mean) if beta is None else beta
        axis = layer.axis if isinstance(layer.axis, int) else int(np.ravel(layer.axis)[0])
        return spec.batch_norm_infer(x, gamma, beta, mean, var, axis=axis, eps=layer.epsilon)
    if isinstance(layer, keras.layers.Conv2D):
        config = layer.get_config()
        plain = (
            config["padding"] == "valid"
            and tuple(config["strides"]) == (1, 1)
            and tuple(config["dilation_rate"]) == (1, 1)
            and config.get("groups", 1) == 1
            and config["data_format"] == "channels_last"
        )
        if not plain:
            raise ValueError(f"spec forward: Conv2D {layer.name!r} is not a plain valid, stride-1 NHWC convolution")
        return _activation(layer, _conv2d_valid(x, weight(layer.kernel), weight(layer.bias)))
    if isinstance(layer, keras.layers.MaxPooling2D | keras.layers.AveragePooling2D):
        config = layer.get_config()
        if tuple(config["strides"]) != tuple(config["pool_size"]) or config["padding"] != "valid":
            kind = type(layer).__name__
            raise ValueError(f"spec forward: {kind} {layer.name!r} must have strides == pool_size, 'valid'")
        reduce = np.max if isinstance(layer, keras.layers.MaxPooling2D) else np.mean
        return _max_pool(x, tuple(config["pool_size"]), reduce)
    if type(layer).__name__ == "BilinearResize":  # keras_bn.model's input resize (LeNet-5)
        return _resize_bilinear(x, layer.height, layer.width)
    if isinstance(layer, keras.layers.ReLU):
        if layer.get_config().get("max_value") is not None or layer.get_config().get("negative_slope", 0.0):
            raise ValueError(f"spec forward: ReLU {layer.name!r} has max_value/negative_slope")
        return np.maximum(x, 0.0)
    if isinstance(layer, keras.layers.Activation):
        return _activation(layer, x)
    if isinstance(layer, keras.layers.Flatten):
        return x.reshape(len(x), -1)  # NHWC order, as Keras flattens channels_last
    if isinstance(layer, keras.layers.Dense):
        return _activation(layer, x @ weight(layer.kernel) + (0.0 if layer.bias is None else weight(layer.bias)))
    raise ValueError(f"spec forward: no NumPy version of layer {layer.name!r} ({type(layer).__name__})")


def run_spec(model, images: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    """LeNet-BN (any chain of Conv2D/BN/ReLU/MaxPool/Flatten/Dense; sigmoid, tanh, average pooling, bilinear resize
    for the d2l LeNet-BN and LeNet-5 of keras_bn.model) in float64 NumPy, BN by ``spec.batch_norm_infer``.

    Convolutions are im2col by ``sliding_window_view`` + ``np.einsum`` (BLAS), batched to keep the
    column matrix small (500 images of LeNet: ~60 MB). Returns float64 logits.
    """
    images = _check_images(images)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError("spec forward handles single-input, single-output chain models")

    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    for previous, layer in zip(layers, layers[1:], strict=False):
        if layer.input is not previous.output:  # the NumPy version walks the layers as a chain
            raise ValueError(f"spec forward: layer {layer.name!r} does not take {previous.name!r}'s output")

    def forward(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        for layer in layers:
            x = _spec_layer(layer, x)
        return x

    return _batched(forward, images, batch_size)


if __name__ == "__main__":  # the run_keras_backend worker: python -m export.runtimes MODEL IMAGES LOGITS BATCH
    _keras_worker(*sys.argv[1:5])
