"""Export LeNet-BN from Keras and from PyTorch to ONNX, with BN kept as nodes or folded.

Four files per trained model pair (see :data:`FORMS`), all with input ``"images"`` and output
``"logits"``, a dynamic ``batch`` axis, opset :data:`~export.onnx.graph.OPSET`, the smallest IR
version that carries it, ``onnx.checker`` + strict shape inference passed, and ``metadata_props``
naming the model, BN convention, framework, exporter, input layout and BN form:

=================  =======  ============================================================================
form               layout   how
=================  =======  ============================================================================
keras              NHWC     ``keras.Model.export(format="onnx")`` (tf2onnx). tf2onnx writes each BN as
                            per-channel Mul/Add constants; :func:`~export.onnx.graph.restore_batchnorm`
                            checks them against the layer and puts a ``BatchNormalization`` node back.
keras-folded       NHWC     the ``keras`` graph through our :func:`~export.onnx.fold.fold_batchnorm` (tf2onnx
                            does not fold a BN that follows a biased Conv/Dense).
torch              NCHW     ``torch.onnx.export(dynamo=True, optimize=False)``: ATen's batch norm becomes
                            ``BatchNormalization``.
torch-folded       NCHW     ``torch.onnx.export(dynamo=True, optimize=True)``: onnxscript's optimizer folds
                            BN into Conv/Gemm (float32 arithmetic); tests check ours matches it.
=================  =======  ============================================================================

A folded form has no ``BatchNormalization`` node: a BN with no Conv/Gemm/MatMul to fold into
(DenseNet's BN after a Concat) becomes its affine map Mul/Add by
:func:`~export.onnx.fold.affine_batchnorm`. ``metadata_props`` ``bn_folded_into_producer`` and
``bn_affine_map`` count the two kinds.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from export.onnx.fold import affine_batchnorm, fold_batchnorm
from export.onnx.graph import (
    OPSET,
    BatchNormParams,
    batchnorm_nodes,
    finalize,
    restore_batchnorm,
    set_io,
)

__all__ = [
    "FORMS",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "export_all",
    "export_keras",
    "export_torch",
    "keras_batchnorm_params",
]

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
#: form -> file name written by :func:`export_all`.
FORMS: dict[str, str] = {
    "keras": "lenet_bn_keras.onnx",
    "keras-folded": "lenet_bn_keras_folded.onnx",
    "torch": "lenet_bn_torch.onnx",
    "torch-folded": "lenet_bn_torch_folded.onnx",
}
_PRODUCER = "keras-bn export.onnx.exporters"


def _is_batch_norm_layer(layer) -> bool:
    return hasattr(layer, "moving_mean") and hasattr(layer, "moving_variance")


def keras_batchnorm_params(model) -> list[BatchNormParams]:
    """Inference parameters of every BN layer of a Keras model, in layer order (missing gamma/beta -> 1/0)."""
    params = []
    for layer in model.layers:
        if not _is_batch_norm_layer(layer):
            continue
        mean = np.asarray(layer.moving_mean.numpy(), np.float32)
        var = np.asarray(layer.moving_variance.numpy(), np.float32)
        gamma = getattr(layer, "gamma", None)
        beta = getattr(layer, "beta", None)
        params.append(
            BatchNormParams(
                name=layer.name,
                gamma=np.ones_like(mean) if gamma is None else np.asarray(gamma.numpy(), np.float32),
                beta=np.zeros_like(mean) if beta is None else np.asarray(beta.numpy(), np.float32),
                mean=mean,
                var=var,
                epsilon=float(layer.epsilon),
                producer=_conv_weights_before(layer),
            )
        )
    return params


def _conv_weights_before(layer) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(weight (O, I, kh, kw), bias) of the channels-last Conv2D whose output this layer reads, else None."""
    import keras

    history = getattr(getattr(layer, "input", None), "_keras_history", None)
    conv = history[0] if history else None
    if not isinstance(conv, keras.layers.Conv2D) or type(conv) is not keras.layers.Conv2D:
        return None  # Conv2DTranspose, SeparableConv2D ... are subclasses with other weight layouts
    config = conv.get_config()
    if config["data_format"] != "channels_last" or config.get("groups", 1) != 1:
        return None
    weight = np.asarray(conv.kernel.numpy(), np.float32).transpose(3, 2, 0, 1)  # (kh, kw, I, O) -> (O, I, kh, kw)
    return weight, (None if conv.bias is None else np.asarray(conv.bias.numpy(), np.float32))


def _keras_metadata(model) -> dict[str, str]:
    import keras
    import tensorflow as tf
    import tf2onnx

    layers = [layer for layer in model.layers if _is_batch_norm_layer(layer)]
    conventions = sorted({getattr(layer, "convention", "keras") for layer in layers}) or ["none"]
    return {
        "model": model.name,
        "framework": f"keras {keras.__version__} (tensorflow {tf.__version__})",
        "exporter": f"keras.Model.export(format='onnx') / tf2onnx {tf2onnx.__version__}",
        "convention": ",".join(conventions),
        "bn_layers": ",".join(layer.name for layer in layers),
        "bn_epsilon": ",".join(repr(float(layer.epsilon)) for layer in layers),
        "input_layout": "NHWC",
        "producer": _PRODUCER,
    }


def _keras_graphs(model, opset: int) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The tf2onnx export with names, batch axis and BN nodes restored (not yet finalized)."""
    import tensorflow as tf

    if not getattr(model, "built", False) or not model.inputs:
        raise ValueError("the Keras model must be built (a functional model, or called once) before export")
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    signature = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name=INPUT_NAME)]
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf2onnx's numpy-2 deprecation chatter
            model.export(str(raw_path), format="onnx", verbose=False, input_signature=signature, opset_version=opset)
        onnx_model = onnx.load(raw_path)
    set_io(onnx_model, INPUT_NAME, OUTPUT_NAME)
    return restore_batchnorm(onnx_model, keras_batchnorm_params(model)), {**_keras_metadata(model), "opset": str(opset)}


def _finish(model: onnx.ModelProto, props: dict[str, str], form: str, folded_by: str | dict[str, str], path) -> Path:
    """Stamp, check and save; ``folded_by`` is the folder's name, or the metadata :func:`_fold_rest` returned."""
    fold_props = folded_by if isinstance(folded_by, dict) else {"bn_folded_by": folded_by}
    if not props["bn_layers"]:  # plain LeNet: nothing was kept or folded
        form, fold_props = "none", {"bn_folded_by": ""}
    model = finalize(model, {**props, "bn_form": form, **fold_props})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


_OUR_FOLD = "export.onnx.fold (float64)"
_TORCH_FOLD = "onnxscript optimizer via torch.onnx.export(optimize=True) (float32)"
_OUR_AFFINE = "export.onnx.fold.affine_batchnorm (float64) for the BN with nothing to fold into"


def _fold_rest(model: onnx.ModelProto, kept: int, folded_by: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``model`` (with ``kept`` BN before any fold) with its remaining BN as affine maps, and the fold's metadata."""
    rest = len(batchnorm_nodes(model))
    if rest:
        model, folded_by = affine_batchnorm(model), f"{folded_by}; {_OUR_AFFINE}"
    return model, {"bn_folded_by": folded_by, "bn_folded_into_producer": str(kept - rest), "bn_affine_map": str(rest)}


def _keras_folded(graph: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    return _fold_rest(fold_batchnorm(graph, strict=False), len(batchnorm_nodes(graph)), _OUR_FOLD)


def export_keras(model, path: str | os.PathLike[str], *, fold: bool = False, opset: int = OPSET) -> Path:
    """Export a built Keras model to ONNX with BN as ``BatchNormalization`` nodes, or folded by us if ``fold``."""
    graph, props = _keras_graphs(model, opset)
    if fold:
        folded, fold_props = _keras_folded(graph)
        return _finish(folded, props, "folded", fold_props, path)
    return _finish(graph, props, "batchnorm", "", path)


def _with_torch_batch_norm(model):
    """A copy whose BN modules are ``torch.nn.BatchNorm*d`` (same state_dict).

    Our ``torch_ref.BatchNorm*d`` computes inference BN from elementwise ops, which the exporter
    would emit as Sub/Mul/Add; ATen's batch norm is what becomes an ONNX ``BatchNormalization``.
    """
    from torch import nn

    from torch_ref.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm_options

    swap = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d, BatchNorm3d: nn.BatchNorm3d}
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            target = swap.get(type(child))
            if target is None:
                continue
            replacement = target(**batch_norm_options(child))
            replacement.load_state_dict(child.state_dict())
            setattr(parent, name, replacement)
    return model


def _torch_graphs(
    model, opset: int, input_shape: Sequence[int]
) -> tuple[onnx.ModelProto, onnx.ModelProto, dict, dict[str, str]]:
    """(BN-node graph from optimize=False, the same program after the exporter's optimizer with the BN it
    could not fold as affine maps, metadata, the folded graph's fold metadata)."""
    import torch
    from torch import nn

    export_model = _with_torch_batch_norm(model).eval()
    sample = torch.zeros(2, *input_shape)  # batch 2: with 1, torch.export could specialize the batch axis
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            export_model,
            (sample,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            optimize=False,
            verbose=False,
        )
        unfolded = onnx.ModelProto()
        unfolded.CopyFrom(program.model_proto)
        program.optimize()  # what optimize=True does: onnxscript's optimizer, which folds BN into Conv/Gemm
        folded = program.model_proto
    for graph in (unfolded, folded):
        set_io(graph, INPUT_NAME, OUTPUT_NAME)
    # The optimizer folds BN into a Conv/Gemm before it and leaves the others (DenseNet: BN after Concat).
    folded, fold_props = _fold_rest(folded, len(batchnorm_nodes(unfolded)), _TORCH_FOLD)
    layers = [(n, m) for n, m in export_model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    props = {
        "model": getattr(model, "name", None) or f"lenet_bn_torch ({type(model).__name__})",
        "framework": f"torch {torch.__version__}",
        "exporter": "torch.onnx.export(dynamo=True)",
        "convention": "torch" if layers else "none",
        "bn_layers": ",".join(n for n, _ in layers),
        "bn_epsilon": ",".join(repr(float(m.eps)) for _, m in layers),
        "input_layout": "NCHW",
        "producer": _PRODUCER,
        "opset": str(opset),
    }
    return unfolded, folded, props, fold_props


def export_torch(
    model,
    path: str | os.PathLike[str],
    *,
    fold: bool = False,
    opset: int = OPSET,
    input_shape: Sequence[int] = (1, 28, 28),
) -> Path:
    """Export a PyTorch model (NCHW input, ``input_shape`` per image) with the dynamo exporter.

    ``fold=False`` keeps BN as ``BatchNormalization``; ``fold=True`` is the exporter's own folded
    graph (its onnxscript optimizer), with any BN it cannot fold written as its affine map (Mul/Add).
    """
    unfolded, folded, props, fold_props = _torch_graphs(model, opset, input_shape)
    if fold:
        return _finish(folded, props, "folded", fold_props, path)
    return _finish(unfolded, props, "batchnorm", "", path)


def export_all(
    keras_model,
    torch_model,
    out_dir: str | os.PathLike[str],
    *,
    opset: int = OPSET,
    input_shape: Sequence[int] = (1, 28, 28),
    stem: str = "lenet_bn",
) -> dict[str, Path]:
    """Write the four :data:`FORMS` into ``out_dir`` (one tf2onnx and one torch export); returns form -> path.

    ``input_shape`` is the PyTorch model's per-image (C, H, W); ``stem`` replaces ``lenet_bn`` in the file names."""
    out_dir = Path(out_dir)
    names = {form: stem + name.removeprefix("lenet_bn") for form, name in FORMS.items()}
    keras_graph, keras_props = _keras_graphs(keras_model, opset)
    torch_unfolded, torch_folded, torch_props, torch_fold_props = _torch_graphs(torch_model, opset, input_shape)
    keras_folded, keras_fold_props = _keras_folded(keras_graph)
    return {
        "keras": _finish(keras_graph, keras_props, "batchnorm", "", out_dir / names["keras"]),
        "keras-folded": _finish(keras_folded, keras_props, "folded", keras_fold_props, out_dir / names["keras-folded"]),
        "torch": _finish(torch_unfolded, torch_props, "batchnorm", "", out_dir / names["torch"]),
        "torch-folded": _finish(torch_folded, torch_props, "folded", torch_fold_props, out_dir / names["torch-folded"]),
    }
