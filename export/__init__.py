"""ONNX export (:mod:`export.onnx`), agreement across runtimes, and the `keras-bn` command line."""
