"""Keras 3 Batch Normalization with explicit moving-statistics control, and LeNet-BN."""

from keras_bn.layer import BatchNorm  # noqa: F401  (the layer, see keras_bn/layer.py)
from keras_bn.model import compile_lenet, d2l_lenet_bn, lenet5, lenet_bn  # noqa: F401  (the LeNets: keras_bn/model.py)
from keras_bn.replace import replace_batch_norm  # noqa: F401  (see keras_bn/replace.py)
from keras_bn.updates import ApplyUpdates, apply_updates, check_updates, pending_updates  # noqa: F401


def __getattr__(name: str):
    if name == "tune":  # the fused-kernel choice (keras_bn/tuning.py); TensorFlow backend only, imported on use
        from keras_bn.tuning import tune

        return tune
    if name == "from_torch":  # PyTorch -> Keras (keras_bn/_from_torch.py); torch is an optional extra
        from keras_bn._from_torch import from_torch

        return from_torch
    raise AttributeError(f"module 'keras_bn' has no attribute {name!r}")
