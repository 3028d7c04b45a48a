"""Everything that reads or writes an ONNX graph: the two exporters (:mod:`.exporters`), graph surgery shared by them
(:mod:`.graph`: names, batch axis, metadata, BN restoration, checks) and BN folding (:mod:`.fold`).

Running the files (ONNX Runtime, OpenVINO, the reference evaluator) is :mod:`export.runtimes`, beside Keras, PyTorch
and LiteRT, since the agreement check treats every runtime alike. Inside this package ``import onnx`` is the ONNX
package itself (absolute imports); ours is always spelled ``export.onnx``.
"""
