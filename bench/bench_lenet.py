"""LeNet-BN on MNIST with plain ``model.fit``: accuracy, convergence and throughput per BN layer.

Trains ``keras_bn.lenet_bn`` with our BatchNorm, with Keras' built-in BatchNormalization and
without BN, one after another under identical settings (same seeded initial kernels, same
shuffling, same optimizer and schedule), and reports per epoch the training loss/accuracy
(running means over the epoch, as ``model.fit`` logs them) and the test loss/accuracy
(inference mode, moving statistics). Summary: final test accuracy against the 98.8% target,
"converges faster" (epochs to 98% test accuracy, loss and test accuracy after epoch 1), and
``model.fit`` throughput in images/s as ratios between the layers.

Throughput is measured twice: per training epoch (median over epochs, test evaluation
excluded), and, for the ratios, in an interleaved phase after training: the trained (already
traced) models take turns fitting one epoch on the same subset, in rotating order, and each
layer's median over the rounds is used, so load drift on a shared machine hits all layers alike;
the headline ratio is the median over rounds of the per-round ratio.

    nice -n 10 python bench/bench_lenet.py                      # full MNIST, 10 epochs, all three
    python bench/bench_lenet.py --epochs 1 --limit 5000         # smoke run
    python bench/bench_lenet.py --layers keras,none --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from export.machine import describe_machine, machine_info  # noqa: E402
from keras_bn import compile_lenet, lenet_bn  # noqa: E402
from mnist_data import load_dataset, to_nhwc_float  # noqa: E402

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
LAYER_CHOICES = {"ours": "ours", "keras": "keras", "none": None}
TARGET_ACCURACY, TARGET_EPOCHS = 0.988, 10  # the bar: LeNet-BN on MNIST within 10 epochs
CONVERGED_ACCURACY = 0.98  # "converges faster": first epoch whose test accuracy reaches this
REACHED_KEY = f"epochs_to_{CONVERGED_ACCURACY:.0%}_test"


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch's training batches only (validation runs after the last batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = self._last = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(self._last - self._start)


def learning_rate(args: argparse.Namespace, steps: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    if args.schedule == "cosine":  # cosine decay to 0 over the whole run, one value per optimizer step
        return keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=steps)
    return args.lr


def train_one(layer: str, data, args: argparse.Namespace) -> tuple[dict, keras.Model]:
    """Fit one LeNet variant from the shared seed; return its per-epoch figures and the trained model."""
    keras.utils.set_random_seed(args.seed)  # same shuffling order for every variant
    model = lenet_bn(LAYER_CHOICES[layer], seed=args.seed)
    x_train, y_train, x_test, y_test = data
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    compile_lenet(model, optimizer=args.optimizer, lr=learning_rate(args, steps), momentum=args.momentum)
    timer = EpochTimer()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        validation_batch_size=1024,
        shuffle=True,
        callbacks=[timer],
        verbose=0,
    ).history
    images_per_s = [len(x_train) / s for s in timer.seconds]
    epochs = [
        {
            "epoch": i + 1,
            "train_loss": float(history["loss"][i]),
            "train_accuracy": float(history["accuracy"][i]),
            "test_loss": float(history["val_loss"][i]),
            "test_accuracy": float(history["val_accuracy"][i]),
            "train_seconds": timer.seconds[i],
            "images_per_s": images_per_s[i],
        }
        for i in range(args.epochs)
    ]
    test_acc = [e["test_accuracy"] for e in epochs]
    result = {
        "layer": layer,
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "non_trainable_params": int(sum(np.prod(w.shape) for w in model.non_trainable_weights)),
        "epochs": epochs,
        "final_test_accuracy": test_acc[-1],
        "best_test_accuracy": max(test_acc),
        REACHED_KEY: next((e["epoch"] for e in epochs if e["test_accuracy"] >= CONVERGED_ACCURACY), None),
        "epoch1_train_loss": epochs[0]["train_loss"],
        "epoch1_test_accuracy": test_acc[0],
        "median_images_per_s": statistics.median(images_per_s),
    }
    return result, model


def interleaved_throughput(models: dict[str, keras.Model], data, args: argparse.Namespace) -> dict[str, list[float]]:
    """images/s of one ``model.fit`` epoch on the same subset, the layers taking turns in rotating order."""
    x, y = data[0][: args.throughput_images], data[1][: args.throughput_images]
    names = list(models)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: a new final-batch size may retrace the train function
        models[name].fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0)
    for r in range(args.throughput_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            timer = EpochTimer()
            models[name].fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=False, callbacks=[timer], verbose=0)
            rates[name].append(len(x) / timer.seconds[0])
    return rates


def print_epochs(result: dict) -> None:
    params = f"{result['trainable_params']:,} trainable + {result['non_trainable_params']} moving stats"
    print(f"\n[{result['layer']}] {params}")
    print(f"{'epoch':>5} {'train loss':>10} {'train acc':>9} {'test loss':>9} {'test acc':>8} {'s':>6} {'img/s':>7}")
    for e in result["epochs"]:
        print(
            f"{e['epoch']:>5} {e['train_loss']:>10.4f} {e['train_accuracy']:>9.4f} {e['test_loss']:>9.4f} "
            f"{e['test_accuracy']:>8.4f} {e['train_seconds']:>6.1f} {e['images_per_s']:>7.0f}"
        )


def print_summary(results: dict[str, dict], rates: dict[str, list[float]], on_mnist: bool) -> None:
    print("\nsummary")
    head = f"{'layer':>6} {'final test':>10} {'best':>7} {'ep->98%':>7} {'ep1 loss':>8} {'ep1 test':>8}"
    print(f"{head} {'img/s epochs':>12} {'img/s interleaved':>17}")
    for r in results.values():
        print(
            f"{r['layer']:>6} {r['final_test_accuracy']:>10.4f} {r['best_test_accuracy']:>7.4f} "
            f"{str(r[REACHED_KEY]):>7} {r['epoch1_train_loss']:>8.4f} {r['epoch1_test_accuracy']:>8.4f} "
            f"{r['median_images_per_s']:>12.0f} {statistics.median(rates[r['layer']]):>17.0f}"
        )
    for layer in ("ours", "keras"):
        if layer in results:
            epochs = results[layer]["epochs"]
            if not on_mnist or len(epochs) < TARGET_EPOCHS:
                print(f"target: LeNet-BN ({layer}) n/a (needs full MNIST and >= {TARGET_EPOCHS} epochs)")
                continue
            acc = epochs[TARGET_EPOCHS - 1]["test_accuracy"]
            verdict = "PASS" if acc >= TARGET_ACCURACY else "FAIL"
            print(f"target: LeNet-BN ({layer}) test accuracy after epoch {TARGET_EPOCHS} {acc:.4f}", end=" ")
            print(f">= {TARGET_ACCURACY}: {verdict}")
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            # Within a round the two fits ran back to back, so their ratio sees nearly the same load.
            paired = statistics.median(ra / rb for ra, rb in zip(rates[a], rates[b], strict=True))
            ratio = statistics.median(rates[a]) / statistics.median(rates[b])
            per_epoch = results[a]["median_images_per_s"] / results[b]["median_images_per_s"]
            print(
                f"model.fit throughput {a}/{b}: {paired:.2f}x (median of per-round ratios; "
                f"{ratio:.2f}x ratio of interleaved medians, {per_epoch:.2f}x of the training epochs' medians)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--layers", default="ours,keras,none", help="comma list of ours, keras, none")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="MNIST IDX directory")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine", help="learning-rate schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="TF intra-op threads (inter-op is 1)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N train and test images")
    parser.add_argument("--throughput-rounds", type=int, default=5, help="interleaved throughput rounds")
    parser.add_argument("--throughput-images", type=int, default=12_800, help="images per throughput fit")
    parser.add_argument("--json", dest="json_out", default=None, help="write all figures to this file")
    args = parser.parse_args(argv)

    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    unknown = [s for s in layers if s not in LAYER_CHOICES]
    if unknown or not layers or len(set(layers)) != len(layers):
        parser.error(f"--layers takes a comma list of distinct {', '.join(LAYER_CHOICES)}; got {args.layers!r}")
    if min(args.epochs, args.batch_size, args.threads, args.throughput_rounds, args.throughput_images) < 1:
        parser.error("--epochs, --batch-size, --threads and --throughput-* must be positive")

    # Set before any op runs: TF fixes its thread pools on first use.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    data_dir = Path(args.data_dir)
    if data_dir.exists():
        dataset = load_dataset("mnist", data_dir=data_dir)
    else:
        print(f"note: {data_dir} not found; falling back to the embedded default dataset", file=sys.stderr)
        dataset = load_dataset("mnist", data_dir=None)
    full_mnist = dataset.name == "mnist" and not dataset.embedded and args.limit is None
    dataset = dataset.limit(args.limit)
    data = (to_nhwc_float(dataset.x_train), dataset.y_train, to_nhwc_float(dataset.x_test), dataset.y_test)

    opt = f"SGD(lr={args.lr}, momentum={args.momentum})" if args.optimizer == "sgd" else f"Adam(lr={args.lr})"
    opt += ", cosine decay to 0 over the run" if args.schedule == "cosine" else ", constant lr"
    print(f"machine: {describe_machine()} (figures hold for this CPU only)")
    print(f"data: {dataset.name} from {dataset.source}: {len(data[0])} train / {len(data[2])} test images")
    print(
        f"settings: {args.epochs} epochs, batch {args.batch_size}, {opt}, seed {args.seed}, "
        "loss SparseCategoricalCrossentropy(from_logits=True), BN defaults (momentum 0.99, epsilon 1e-3)"
    )
    print(
        f"threads: TF intra-op {tf.config.threading.get_intra_op_parallelism_threads()}, "
        f"inter-op {tf.config.threading.get_inter_op_parallelism_threads()} "
        f"(os.cpu_count()={os.cpu_count()}); TF {tf.__version__}, Keras {keras.__version__}, "
        f"Python {platform.python_version()}"
    )

    results: dict[str, dict] = {}
    models: dict[str, keras.Model] = {}
    for layer in layers:
        start = time.perf_counter()
        results[layer], models[layer] = train_one(layer, data, args)
        print_epochs(results[layer])
        print(f"[{layer}] wall {time.perf_counter() - start:.0f} s", flush=True)

    rates = interleaved_throughput(models, data, args)
    n_images = min(args.throughput_images, len(data[0]))
    print(f"\ninterleaved throughput: {args.throughput_rounds} rounds of one fit epoch on {n_images} images each")
    for layer, values in rates.items():
        print(
            f"{layer:>6}: " + " ".join(f"{v:.0f}" for v in values) + f"  median {statistics.median(values):.0f} img/s"
        )
    print_summary(results, rates, full_mnist)

    if args.json_out:
        payload = {
            "machine": machine_info(),
            "data": {"name": dataset.name, "source": dataset.source, "train": len(data[0]), "test": len(data[2])},
            "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
            "threads": {"intra_op": args.threads, "inter_op": 1, "cpu_count": os.cpu_count()},
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
            "results": results,
            "interleaved_images_per_s": rates,
        }
        Path(args.json_out).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
