"""Each LeNet recipe at full length, BN vs no BN, over several seeds, next to the sources' figures.

For every recipe of ``export.recipes`` (LeNet-BN, d2l's sigmoid LeNet-BN, the article's LeNet-5) this trains each
variant with the recipe's optimizer, learning rate, batch size and epochs on the recipe's dataset (MNIST or
Fashion-MNIST from ``../shared/data``), once per seed, and records the test ("validation") accuracy after every
epoch. Variants: our BN (``keras_bn.BatchNorm``; for d2l the chapter's from-scratch convention ``"d2l"``), Keras'
built-in BN (d2l's "concise" version; ``--variants`` adds it elsewhere) and no BN. It prints, per recipe, the mean
and spread (sample standard deviation, min..max) over seeds per epoch beside the source's figures, d2l's learned
gamma and beta of ``bn1`` (the chapter prints them), and writes every number to ``--json`` so the README tables
can be generated from the file.

One seed is not evidence that BN converges faster: use >= 3 (the default is 0, 1, 2).

    nice -n 10 python bench/bench_recipes.py --json recipes.json              # full length (hours on 2 cores)
    python bench/bench_recipes.py --epochs 1 --limit 512 --json /tmp/r.json   # smoke run
    python bench/bench_recipes.py --from-json recipes.json                   # the tables again, no training
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from recipe_tables import bn1_lines, epoch_table, header_line  # noqa: E402  (bench/recipe_tables.py)

from export.machine import describe_machine, machine_info  # noqa: E402
from export.recipes import RECIPES  # noqa: E402
from mnist_data import load_dataset, to_nhwc_float  # noqa: E402

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = {"ours": "ours", "keras": "keras", "none": None}
DEFAULT_VARIANTS = {"lenet-bn": ("ours", "none"), "d2l-lenet-bn": ("ours", "keras", "none"), "lenet5": ("ours", "none")}
SOURCE_LABEL = {"ours": "BN", "keras": "BN", "none": "no BN"}


def train(recipe_name: str, variant: str, seed: int, data, epochs: int) -> dict:
    """Fit one variant from ``seed``; per-epoch loss and test accuracy, and bn1's gamma/beta if it has BN."""
    recipe = RECIPES[recipe_name]
    keras.utils.set_random_seed(seed)  # shuffling order and kernels depend on the seed only
    model = recipe.build_keras(VARIANTS[variant], seed=seed)
    x_train, y_train, x_test, y_test = data
    start = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=recipe.batch_size,
        epochs=epochs,
        validation_data=(x_test, y_test),
        verbose=0,
    )
    run = {
        "seed": seed,
        "loss": [float(v) for v in history.history["loss"]],
        "val_accuracy": [float(v) for v in history.history["val_accuracy"]],
        "seconds": time.perf_counter() - start,
    }
    if VARIANTS[variant] is not None:
        bn1 = model.get_layer("bn1")
        run["bn1_gamma"] = [float(v) for v in bn1.gamma.numpy()]
        run["bn1_beta"] = [float(v) for v in bn1.beta.numpy()]
    return run


def summarize(runs: list[dict]) -> dict:
    """Per epoch over seeds: mean, sample standard deviation (0 for one seed), min and max of the test accuracy."""
    per_epoch = np.array([r["val_accuracy"] for r in runs])  # (seeds, epochs)
    return {
        "mean": per_epoch.mean(axis=0).tolist(),
        "std": (per_epoch.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(per_epoch.shape[1])).tolist(),
        "min": per_epoch.min(axis=0).tolist(),
        "max": per_epoch.max(axis=0).tolist(),
    }


def print_recipe(name: str, result: dict) -> None:
    """The per-epoch table and bn1's gamma/beta, formatted by bench/recipe_tables.py (as README.md shows them)."""
    recipe = RECIPES[name]
    print(f"\n## {recipe.title}: {recipe.optimizer} lr {recipe.lr}, batch {recipe.batch_size}; {header_line(result)}")
    print("\n".join(epoch_table(result)))
    print("\n".join(bn1_lines(result)))
    for v in result["variants"]:
        for run in result["variants"][v]["runs"]:
            if "bn1_gamma" in run:  # d2l prints these after training; so do we, for every recipe and seed
                gamma, beta = np.round(run["bn1_gamma"], 3).tolist(), np.round(run["bn1_beta"], 3).tolist()
                print(f"{v} seed {run['seed']}: bn1 gamma {gamma}, beta {beta}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--variants", default=None, help="comma list of ours, keras, none (default: per recipe)")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds (>= 3 to report a spread)")
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs (smoke runs)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N train and test images")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder holding mnist/ and fashion/")
    parser.add_argument("--threads", type=int, default=2, help="TF intra-op threads (inter-op is 1)")
    parser.add_argument("--json", dest="json_out", default=None, help="write every figure to this file")
    parser.add_argument("--from-json", default=None, help="train nothing: print the tables of a saved --json file")
    args = parser.parse_args(argv)
    if args.from_json:  # the README tables come from here
        saved = json.loads(Path(args.from_json).read_text())
        print(f"machine: {describe_machine(saved['machine'])}; argv {saved['argv']}")
        for name, result in saved["results"].items():
            print_recipe(name, result)
        return 0
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(RECIPES))
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {sorted(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    print(f"machine: {describe_machine()}; TF intra-op threads {args.threads}, inter-op 1")
    if len(seeds) < 3:
        print(f"note: {len(seeds)} seed(s) give no meaningful spread; use >= 3", file=sys.stderr)

    results: dict[str, dict] = {}
    for name in models:
        recipe = RECIPES[name]
        dataset = load_dataset(recipe.dataset, args.data_dir).limit(args.limit)
        data = (to_nhwc_float(dataset.x_train), dataset.y_train, to_nhwc_float(dataset.x_test), dataset.y_test)
        epochs = args.epochs or recipe.epochs
        variants = args.variants.split(",") if args.variants else DEFAULT_VARIANTS[name]
        result = {
            "recipe": name,
            "dataset": dataset.name,
            "source": dataset.source,
            "n_train": len(dataset.y_train),
            "n_test": len(dataset.y_test),
            "epochs": epochs,
            "full_length": epochs == recipe.epochs and args.limit is None,
            "seeds": seeds,
            "source_figures": {k: {str(e): a for e, a in v.items()} for k, v in recipe.source_figures.items()},
            "variants": {},
        }
        for variant in variants:
            runs = []
            for seed in seeds:
                runs.append(train(name, variant, seed, data, epochs))
                print(f"[{name} {variant} seed {seed}] test acc per epoch "
                      f"{[round(100 * a, 2) for a in runs[-1]['val_accuracy']]} ({runs[-1]['seconds']:.0f} s)",
                      flush=True)  # fmt: skip
            result["variants"][variant] = {"runs": runs, "summary": summarize(runs)}
        results[name] = result
        print_recipe(name, result)

    if args.json_out:
        payload = {"machine": machine_info(), "argv": sys.argv[1:] if argv is None else list(argv), "results": results}
        Path(args.json_out).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
