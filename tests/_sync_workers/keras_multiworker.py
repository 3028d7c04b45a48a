"""MultiWorkerMirroredStrategy with 2 worker processes on 127.0.0.1: synchronized BN statistics.

    python keras_multiworker.py launch --inputs in.npz --out out.npz [--workers 2] [--timeout 120]

The launcher (no TensorFlow import) picks free ports, starts one ``worker`` process per task with
its ``TF_CONFIG``, waits at most ``--timeout`` seconds and always ends the workers it started
(by process id, each in its own session). Each worker also arms a watchdog that exits the
process if it outlives the launcher's deadline, so nothing lingers if the launcher is killed.

``in.npz`` holds cases ``<case>/x`` (global batch, NHWC float32), ``<case>/splits`` (rows per
worker) and ``<case>/gamma|beta|dy``. Per case, each worker runs ``cross_replica_moments`` and
a functional BN on its rows inside ``strategy.run`` (gradients of L = sum(y * dy)), and one
training step of ``keras_bn.BatchNorm(synchronized=True)``. ``out.npz`` gets
``<case>/<name>`` (statistics stacked over workers, y and dx concatenated, dgamma/dbeta summed)
and ``<case>/single_*``: the same function on the concatenated batch in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from _common import EPS, KERAS_MOMENTUM, cases, functional_bn_step, replica_rows


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:  # held open together, so the ports differ
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def worker(index: int, inputs_path: str, out_path: str, deadline: float) -> int:
    # Watchdog: a hung collective must not outlive the launcher's time budget.
    threading.Thread(target=lambda: (time.sleep(max(deadline - time.time(), 0)), os._exit(4)), daemon=True).start()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    from keras_bn.sync import cross_replica_moments

    with np.load(inputs_path) as data:
        inputs = {k: data[k] for k in data.files}
    out: dict[str, np.ndarray] = {}
    from keras_bn import BatchNorm

    for case in cases(inputs):
        x, gamma, beta, dy = (inputs[f"{case}/{k}"] for k in ("x", "gamma", "beta", "dy"))
        splits = inputs[f"{case}/splits"]
        xr, dyr = tf.constant(replica_rows(x, splits, index)), tf.constant(replica_rows(dy, splits, index))
        g, b = tf.constant(gamma), tf.constant(beta)

        def step(xr, dyr, g=g, b=b):
            return functional_bn_step(xr, dyr, g, b)

        res = tf.function(lambda xr, dyr, step=step: strategy.run(step, args=(xr, dyr)))(xr, dyr)
        for name, value in zip(("count", "mean", "var", "y", "dx", "dgamma", "dbeta"), res, strict=True):
            out[f"{case}/{name}"] = strategy.experimental_local_results(value)[0].numpy()
        _, mean, var = cross_replica_moments(tf.constant(x), [0, 1, 2])  # one process, whole batch
        out[f"{case}/single_mean"], out[f"{case}/single_var"] = mean.numpy(), var.numpy()
        with strategy.scope():
            layer = BatchNorm(momentum=KERAS_MOMENTUM, epsilon=EPS, synchronized=True)
            layer.build((None, None, None, x.shape[-1]))
            layer.gamma.assign(gamma)
            layer.beta.assign(beta)
        y = tf.function(lambda xr, layer=layer: strategy.run(lambda t: layer(t, training=True), args=(xr,)))(xr)
        out[f"{case}/layer_y"] = strategy.experimental_local_results(y)[0].numpy()
        out[f"{case}/layer_moving_mean"] = np.asarray(layer.moving_mean.value)
        out[f"{case}/layer_moving_variance"] = np.asarray(layer.moving_variance.value)
    np.savez(out_path, **out)
    return 0


def launch(inputs_path: str, out_path: str, workers: int, timeout: float) -> int:
    ports = _free_ports(workers)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    deadline = time.time() + timeout
    procs: list[subprocess.Popen] = []
    logs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for index in range(workers):
                env = dict(os.environ)
                env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
                result = os.path.join(tmp, f"w{index}.npz")
                cmd = [sys.executable, os.path.abspath(__file__), "worker", "--index", str(index)]
                cmd += ["--inputs", inputs_path, "--out", result, "--deadline", str(deadline)]
                logs.append(open(os.path.join(tmp, f"w{index}.log"), "w"))  # noqa: SIM115 (closed below)
                procs.append(
                    subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True)
                )
            for proc in procs:
                try:
                    proc.wait(timeout=max(deadline - time.time(), 0.1))
                except subprocess.TimeoutExpired:
                    print(f"keras_multiworker: workers still running after {timeout} s", file=sys.stderr)
                    return 3
            failed = [i for i, p in enumerate(procs) if p.returncode != 0]
            if failed:
                for i in failed:
                    with open(os.path.join(tmp, f"w{i}.log")) as log:
                        print(f"--- worker {i} (rc {procs[i].returncode}) ---\n{log.read()[-4000:]}", file=sys.stderr)
                return 2
            parts = [dict(np.load(os.path.join(tmp, f"w{i}.npz"))) for i in range(workers)]
        finally:
            for proc in procs:  # only the processes this launcher started, by id
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for log in logs:
                log.close()
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        name = key.split("/")[1]
        if name in ("y", "dx", "layer_y"):
            out[key] = np.concatenate(values)
        elif name in ("dgamma", "dbeta"):
            out[key] = np.sum(values, axis=0)
        else:
            out[key] = np.stack(values)
    out["ports"] = np.array(ports)
    np.savez(out_path, **out)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("launch", "worker"))
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.mode == "launch":
        return launch(args.inputs, args.out, args.workers, args.timeout)
    return worker(args.index, args.inputs, args.out, args.deadline)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
