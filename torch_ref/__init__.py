"""PyTorch reference Batch Normalization, LeNet-BN, and weight transfer to and from Keras."""

from torch_ref.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm_infer, batch_norm_train
from torch_ref.model import d2l_lenet_bn, lenet5, lenet_bn
from torch_ref.sync import SyncBatchNorm, sync_batch_norm_train

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "batch_norm_infer",
    "batch_norm_train",
    "lenet_bn",
    "d2l_lenet_bn",
    "lenet5",
    "SyncBatchNorm",
    "sync_batch_norm_train",
    "batch_norm_keras_to_torch",
    "batch_norm_torch_to_keras",
    "keras_to_torch",
    "torch_to_keras",
    "from_keras",
]

_TRANSFER = ("batch_norm_keras_to_torch", "batch_norm_torch_to_keras", "keras_to_torch", "torch_to_keras")


def __getattr__(name: str):
    # The transfer imports Keras/TensorFlow (seconds); torch-only users should not pay for it.
    if name in _TRANSFER:
        from torch_ref import transfer

        return getattr(transfer, name)
    if name == "from_keras":  # imports Keras too, like the transfer
        from torch_ref._from_keras import from_keras

        return from_keras
    raise AttributeError(f"module 'torch_ref' has no attribute {name!r}")
