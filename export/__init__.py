"""ONNX export (:mod:`export.onnx`), agreement across runtimes, and the `keras-bn` command line (``run``, ``check``,
``verify``). :func:`check_model` is ``keras-bn check`` for Python callers."""

from export.check import CheckResult, check_model

__all__ = ["CheckResult", "check_model"]
