"""Training recipes of the three LeNets our sources train, for ``keras-bn run --model`` and ``bench/bench_recipes.py``.

A recipe is what a source trains a model with: optimizer, learning rate, batch size, epochs and dataset. Every CLI
flag that names one of these overrides the recipe; :func:`resolve` does that in one place.

=============  ================================  ========================================  ========================
``--model``    model (``keras_bn.model``)        source                                    recipe
=============  ================================  ========================================  ========================
lenet-bn       LeNet-BN, ReLU, max pooling       this project's main job                   SGD lr 0.05 momentum 0.9,
                                                                                           batch 32, 10 epochs, MNIST
d2l-lenet-bn   sigmoid, average pooling          Dive into Deep Learning, "Batch           plain SGD lr 1.0, batch 256,
                                                 Normalization" chapter                    10 epochs, Fashion-MNIST
lenet5         bilinear resize to 32x32, tanh,   the Paperspace blog article training      Adam lr 1e-3, batch 64,
               average pooling, Xavier, b=0.01   LeNet-5 with and without BN on MNIST      10 epochs, MNIST
=============  ================================  ========================================  ========================

Without ``--data-dir`` or ``--download`` the recipe's dataset is not available offline: the embedded digits stand in
and :attr:`Resolved.dataset_note` says so (the report carries it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RECIPES", "Recipe", "Resolved", "for_keras_model", "resolve"]


@dataclass(frozen=True)
class Recipe:
    """How a source trains one of the LeNets."""

    name: str  # the --model value; also the key of keras_bn.model.BUILDERS and torch_ref.model.BUILDERS
    title: str  # for reports and plots
    source: str
    dataset: str  # "mnist" | "fashion" (mnist_data.DATASET_NAMES)
    optimizer: str  # "sgd" | "adam" (keras_bn.compile_lenet)
    lr: float
    sgd_momentum: float  # 0.0: plain SGD; unused by Adam
    batch_size: int
    epochs: int
    #: the source's figures: label -> validation accuracy after each epoch it states, {epoch: accuracy}
    source_figures: dict[str, dict[int, float]] = field(default_factory=dict)

    def build_keras(self, batch_norm: str | None, seed: int | None = None, **kwargs: Any):
        """The Keras model (``keras_bn.model.BUILDERS[name]``), compiled with this recipe's optimizer.

        ``lr`` in ``kwargs`` overrides the recipe's; other kwargs go to the builder.
        """
        from keras_bn.model import BUILDERS, compile_lenet

        lr = kwargs.pop("lr", self.lr)
        model = BUILDERS[self.name](batch_norm, seed=seed, **kwargs)
        return compile_lenet(model, optimizer=self.optimizer, lr=lr, momentum=self.sgd_momentum)

    def build_torch(self):
        """The PyTorch twin that receives the trained Keras weights for export and agreement.

        ``torch_ref.BatchNorm*d`` in torch's convention for every recipe: inference does not depend on the
        convention (only training updates do), and the ONNX exporter maps exactly these classes to ATen's BN.
        """
        from torch_ref.model import BUILDERS

        if self.name == "d2l-lenet-bn":
            return BUILDERS[self.name]("ours", convention="torch")
        return BUILDERS[self.name]("ours")


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="lenet-bn",
            title="LeNet-BN (ReLU, max pooling)",
            source="keras-bn main job",
            dataset="mnist",
            optimizer="sgd",
            lr=0.05,
            sgd_momentum=0.9,
            batch_size=32,
            epochs=10,
        ),
        Recipe(
            name="d2l-lenet-bn",
            title="d2l LeNet-BN (sigmoid, average pooling)",
            source="Dive into Deep Learning, chapter 'Batch Normalization' (d2l.ai)",
            dataset="fashion",
            optimizer="sgd",
            lr=1.0,
            sgd_momentum=0.0,
            batch_size=256,
            epochs=10,
        ),
        Recipe(
            name="lenet5",
            title="LeNet-5 (32x32 bilinear, tanh, average pooling)",
            source="Paperspace blog article: LeNet-5 on MNIST with and without batch normalization",
            dataset="mnist",
            optimizer="adam",
            lr=1e-3,
            sgd_momentum=0.0,
            batch_size=64,
            epochs=10,
            # The article's validation accuracy: "~93%" / "slightly above 98%" without BN, "slightly above
            # 95%" / "~98.5%" with BN, after epochs 1 and 10 (read off its plots, hence round numbers).
            source_figures={"no BN": {1: 0.93, 10: 0.98}, "BN": {1: 0.95, 10: 0.985}},
        ),
    )
}


#: Keras model name stem (keras_bn.model names models "<stem>" or "<stem>_bn_<batch_norm>") -> recipe name
_KERAS_STEMS = {"lenet": "lenet-bn", "d2l_lenet": "d2l-lenet-bn", "lenet5": "lenet5"}


def for_keras_model(model: Any) -> Recipe:
    """The recipe of a model built by ``keras_bn.model`` (recognized by its name), e.g. to build its PyTorch twin."""
    stem = model.name.split("_bn_")[0] if "_bn_" in model.name else model.name
    if stem not in _KERAS_STEMS:
        raise ValueError(f"model {model.name!r} was not built by keras_bn.model's LeNet builders")
    return RECIPES[_KERAS_STEMS[stem]]


@dataclass(frozen=True)
class Resolved:
    """A recipe with the user's overrides applied: what actually runs."""

    recipe: Recipe
    dataset: str
    lr: float
    batch_size: int
    epochs: int
    #: why the dataset is not the recipe's, or None
    dataset_note: str | None

    def to_config(self) -> dict[str, Any]:
        """The recipe block of report.json's ``config``: name, title, source and the recipe's own settings."""
        recipe = asdict(self.recipe)
        recipe.pop("source_figures")
        return {**recipe, "dataset_note": self.dataset_note}


def resolve(
    name: str,
    *,
    dataset: str | None = None,
    data_dir: Any = None,
    download: bool = False,
    lr: float | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
) -> Resolved:
    """The recipe ``name`` with every given (non-None) flag overriding it.

    The dataset: ``dataset`` if given; else the recipe's when data can be had (``data_dir`` or ``download``);
    else the embedded ``"digits"``, with a note saying the recipe's dataset was not available.
    """
    if name not in RECIPES:
        raise ValueError(f"--model must be one of {sorted(RECIPES)}, got {name!r}")
    recipe = RECIPES[name]
    note = None
    if dataset is None:
        if data_dir is not None or download:
            dataset = recipe.dataset
        else:
            dataset = "digits"
            note = (
                f"the {recipe.name} recipe trains on {recipe.dataset}; without --data-dir or --download the embedded "
                "digits stand in (pass --data-dir DIR for the recipe's own data)"
            )
    return Resolved(
        recipe=recipe,
        dataset=dataset,
        lr=recipe.lr if lr is None else lr,
        batch_size=recipe.batch_size if batch_size is None else batch_size,
        epochs=recipe.epochs if epochs is None else epochs,
        dataset_note=note,
    )
