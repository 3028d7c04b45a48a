"""The fused/generic choice of BatchNorm(fused=None): overrides, caching in-process and on disk, the layer's use.

Nothing here asserts a time: ``tuning.measure`` is replaced by a stub returning fixed "times", except
in the one test that runs a real measurement and checks only that a decision was recorded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":
    pytest.skip("the fused kernel exists on the TensorFlow backend only", allow_module_level=True)

import keras_bn  # noqa: E402
from keras_bn import _fused, tuning  # noqa: E402

SHAPE = (8, 6, 6, 4)  # NHWC, 4 channels: the fixed rule says fused


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test starts with no decisions and measuring on (the suite's default is the fixed rule)."""
    monkeypatch.setattr(tuning, "_decisions", {})
    monkeypatch.setattr(tuning, "_cache_loaded", set())
    monkeypatch.setenv(tuning.MODE_VARIABLE, "measure")
    monkeypatch.delenv(tuning.CACHE_VARIABLE, raising=False)


def test_default_is_the_fixed_rule_so_a_seed_trains_the_same_on_every_run(monkeypatch):
    """Unset, ``KERAS_BN_FUSED`` means the rule: no timing decides which (differently rounding) path trains."""
    monkeypatch.delenv(tuning.MODE_VARIABLE)
    monkeypatch.setattr(tuning, "measure", lambda *a: pytest.fail("measured without KERAS_BN_FUSED=measure"))
    assert tuning.mode() == "rule"
    layer = keras_bn.BatchNorm()
    layer(np.ones(SHAPE, np.float32), training=True)  # would call the failing stub if it measured


@pytest.fixture
def stub_times(monkeypatch):
    """Replace the timing by fixed medians: ``stub_times(fused_s, generic_s)``; returns the list of calls."""
    calls = []

    def install(fused_s: float, generic_s: float):
        def measure(shape, channel_axis, dtype, repeats):
            calls.append((shape, channel_axis, dtype))
            return fused_s, generic_s

        monkeypatch.setattr(tuning, "measure", measure)
        return calls

    return install


def _no_timing(monkeypatch):
    monkeypatch.setattr(tuning, "measure", lambda *a: pytest.fail("measured although no measurement was due"))


@pytest.mark.parametrize(("mode", "expected"), [("always", True), ("never", False)], ids=["always", "never"])
def test_environment_forces_the_path_without_timing(monkeypatch, mode, expected):
    _no_timing(monkeypatch)
    monkeypatch.setenv(tuning.MODE_VARIABLE, mode)
    assert tuning.use_fused(SHAPE, 3, "float32") is expected
    assert tuning.use_fused((8, 6, 6, 7), 3, "float32") is expected  # the rule would refuse 7 channels


@pytest.mark.parametrize("shape", [(8, 6, 6, 4), (8, 6, 6, 7), (128, 84)], ids=["nhwc-c4", "nhwc-c7", "nc-c84"])
def test_rule_mode_is_the_fixed_rule(monkeypatch, shape):
    _no_timing(monkeypatch)
    monkeypatch.setenv(tuning.MODE_VARIABLE, "rule")
    assert tuning.use_fused(shape, len(shape) - 1, "float32") is _fused.pays_off(shape, len(shape) - 1)


def test_unknown_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(tuning.MODE_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match="KERAS_BN_FUSED='sometimes' is not one of measure, rule, always, never"):
        tuning.use_fused(SHAPE, 3, "float32")


@pytest.mark.parametrize(("fused_s", "generic_s", "expected"), [(1.0, 2.0, True), (2.0, 1.0, False)])
def test_faster_path_is_chosen_and_measured_once(stub_times, fused_s, generic_s, expected):
    calls = stub_times(fused_s, generic_s)
    assert [tuning.use_fused(SHAPE, 3, "float32") for _ in range(3)] == [expected] * 3
    assert calls == [(SHAPE, 3, "float32")]
    tuning.use_fused(SHAPE, 3, "bfloat16")  # another dtype is another decision
    tuning.use_fused((8, 6, 6, 8), 3, "float32")  # and so is another shape
    assert len(calls) == 3 and len(tuning.decisions()) == 3


def test_unknown_batch_is_timed_at_a_fixed_size_and_other_unknowns_use_the_rule(stub_times):
    calls = stub_times(2.0, 1.0)
    assert tuning.use_fused((None, 6, 6, 4), 3, "float32") is False
    assert calls == [((tuning.UNKNOWN_BATCH, 6, 6, 4), 3, "float32")]
    assert tuning.use_fused((8, None, None, 4), 3, "float32") is _fused.pays_off((8, None, None, 4), 3)
    assert len(calls) == 1


def test_decisions_persist_on_disk_and_are_reused_without_timing(monkeypatch, stub_times, tmp_path):
    cache = tmp_path / "fused.json"
    monkeypatch.setenv(tuning.CACHE_VARIABLE, str(cache))
    stub_times(2.0, 1.0)
    assert tuning.use_fused(SHAPE, 3, "float32") is False
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [False] and "8x6x6x4" in next(iter(stored))
    # A new process: nothing in memory, the file decides (the rule alone would say True here).
    monkeypatch.setattr(tuning, "_decisions", {})
    monkeypatch.setattr(tuning, "_cache_loaded", set())
    _no_timing(monkeypatch)
    assert tuning.use_fused(SHAPE, 3, "float32") is False


def test_a_decision_under_a_capped_or_disabled_onednn_is_not_reused_natively(monkeypatch, stub_times):
    # The fused kernel is oneDNN's on x86; ONEDNN_MAX_CPU_ISA picks its code, TF_ENABLE_ONEDNN_OPTS=0 swaps it for
    # Eigen's (bench/_isa.py): each setting is another device for the decision.
    for name in tuning._KERNEL_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    calls = stub_times(1.0, 2.0)
    assert tuning.use_fused(SHAPE, 3, "float32") is True
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert tuning.use_fused(SHAPE, 3, "float32") is True
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert tuning.use_fused(SHAPE, 3, "float32") is True
    assert len(calls) == 3
    keys = list(tuning.decisions())
    assert "(ONEDNN_MAX_CPU_ISA=AVX2)" in keys[1] and "(ONEDNN_MAX_CPU_ISA=AVX2, TF_ENABLE_ONEDNN_OPTS=0)" in keys[2]


@pytest.mark.parametrize("content", ["not json", '["a list"]', '{"key": "yes"}'], ids=["text", "list", "not-bool"])
def test_unreadable_cache_is_refused_and_left_as_it_was(monkeypatch, stub_times, tmp_path, content):
    cache = tmp_path / "fused.json"
    cache.write_text(content)
    monkeypatch.setenv(tuning.CACHE_VARIABLE, str(cache))
    stub_times(1.0, 2.0)
    with pytest.raises(ValueError, match=f"KERAS_BN_FUSED_CACHE: .*{cache.name}"):
        tuning.use_fused(SHAPE, 3, "float32")
    assert cache.read_text() == content


def _count_fused_calls(monkeypatch) -> list:
    calls = []
    train = _fused.train

    def counting(*args, **kwargs):
        calls.append(1)
        return train(*args, **kwargs)

    monkeypatch.setattr(_fused, "train", counting)
    return calls


@pytest.mark.parametrize(("fused_s", "generic_s", "fused_calls"), [(1.0, 2.0, 1), (2.0, 1.0, 0)])
def test_layer_follows_the_measured_decision(monkeypatch, stub_times, fused_s, generic_s, fused_calls):
    stub_times(fused_s, generic_s)
    calls = _count_fused_calls(monkeypatch)
    keras_bn.BatchNorm()(np.ones(SHAPE, np.float32), training=True)
    assert len(calls) == fused_calls


@pytest.mark.parametrize("fused", [True, False])
def test_layer_argument_overrides_any_measurement(monkeypatch, fused):
    _no_timing(monkeypatch)
    monkeypatch.setenv(tuning.MODE_VARIABLE, "never" if fused else "always")
    calls = _count_fused_calls(monkeypatch)
    keras_bn.BatchNorm(fused=fused)(np.ones(SHAPE, np.float32), training=True)
    assert len(calls) == int(fused)


def test_inference_calls_make_no_decision(monkeypatch):
    _no_timing(monkeypatch)
    keras_bn.BatchNorm()(np.ones(SHAPE, np.float32), training=False)
    assert tuning.decisions() == {}


def test_tune_measures_and_records_a_decision():
    """A real (tiny) measurement: which path wins is the machine's business; that it is recorded is ours."""
    choice = keras_bn.tune((None, 4, 4, 4), repeats=1)
    assert tuning.decisions() == {tuning._key((None, 4, 4, 4), 3, "float32"): choice}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (8, 4), "axis": 0}, "channel axis last or at 1"),
        ({"input_shape": (8, 4, 4, 4), "axis": 4}, "axis 4 is out of range"),
        ({"input_shape": (8, 4, 4, 4), "dtype": "float64"}, "got dtype 'float64'"),
        ({"input_shape": (8, None, 4, 4)}, "unknown size beyond the batch axis"),
        ({"input_shape": (8, 4, 4, 4), "repeats": 0}, "repeats must be an int >= 1"),
    ],
    ids=["axis-0", "axis-out-of-range", "float64", "unknown-height", "no-repeats"],
)
def test_tune_refuses_what_it_cannot_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_bn.tune(**kwargs)


def test_first_training_call_in_a_traced_function_measures_eagerly():
    """The layer decides while tf.function traces it; the timing runs eagerly in its own thread."""
    import tensorflow as tf

    layer = keras_bn.BatchNorm()
    y = tf.function(lambda x: layer(x, training=True))(np.ones(SHAPE, np.float32))
    assert y.shape == SHAPE
    assert list(tuning.decisions()) == [tuning._key(SHAPE, 3, "float32")]
