"""`export_litert`: pruned Dense weights run TFLite's sparse kernel, the file
is checked against the Keras model, and LiteRT's known defects are caught."""

from __future__ import annotations

import sys
import warnings

import keras
import numpy as np
import pytest

import keras_prune as kp
from keras_prune import litert, litert_interpreter

L = keras.layers


def seed_head(fc1_density, fc2_density=None, seed=0):
    """The seed network's head, 3136 -> 1024 -> 10, masked, fc1 pruned at
    random to `fc1_density` (and fc2 to `fc2_density`)."""
    keras.utils.set_random_seed(seed)
    model = kp.make_prunable(
        keras.Sequential(
            [
                keras.Input((3136,)),
                L.Dense(1024, activation="relu", name="fc1"),
                L.Dense(10, name="fc2"),
            ]
        ),
        verbose=False,
    )
    rng = np.random.default_rng(seed)
    model.get_layer("fc1").prune_to(rng.random((3136, 1024)) < fc1_density)
    if fc2_density is not None:
        model.get_layer("fc2").prune_to(rng.random((1024, 10)) < fc2_density)
    return model


def interpreter(path, resolver="default"):
    """The file loaded as a user would: by path, its own input shape."""
    interpreter_class, resolvers, _ = litert.litert_modules()
    kind = (
        resolvers.AUTO
        if resolver == "default"
        else resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    result = interpreter_class(model_path=str(path), experimental_op_resolver_type=kind)
    result.allocate_tensors()
    return result


def run(interpreter_, x):
    detail = interpreter_.get_input_details()[0]
    interpreter_.set_tensor(detail["index"], x)
    interpreter_.invoke()
    return interpreter_.get_tensor(interpreter_.get_output_details()[0]["index"])


def test_a_pruned_head_runs_the_sparse_kernel_and_matches_keras(tmp_path):
    model = seed_head(0.0023)
    before = [np.array(w) for w in model.get_weights()]
    with warnings.catch_warnings():
        # Nothing runs dense, and the file loads the default way.
        warnings.simplefilter("error", UserWarning)
        report = kp.export_litert(model, tmp_path / "head.tflite", repeats=5)
    assert [(w.layer, w.runs) for w in report.weights] == [("fc1", "sparse kernel")]
    assert report.weights[0].kept == pytest.approx(0.0023, rel=0.05)
    assert report.resolver == "default" and report.max_error <= 1e-4
    # Floor: at most 3% of the dense .tflite.
    assert report.bytes <= 0.03 * report.dense_bytes
    assert report.bytes == (tmp_path / "head.tflite").stat().st_size
    assert report.latency_ms > 0 and report.dense_latency_ms > 0
    x = np.random.default_rng(1).normal(size=(1, 3136)).astype("float32")
    np.testing.assert_allclose(
        run(interpreter(tmp_path / "head.tflite"), x),
        model.predict(x, verbose=0),
        atol=1e-4,
    )
    # The input model is untouched and still masked.
    assert kp.masked_layers(model)
    for old, new in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    text = str(report)
    assert "fc1    1024x3136  0.23%" in text and "sparse kernel" in text


def test_int8_sparse_file_is_verified_without_the_default_delegates(tmp_path):
    # LiteRT 2.3's XNNPACK delegate computes int8 sparse weights wrongly.
    model = seed_head(0.0023)
    with pytest.warns(UserWarning, match="computes correctly only without"):
        report = kp.export_litert(
            model, tmp_path / "int8.tflite", quantization="int8", compare=False
        )
    assert report.resolver == "without_default_delegates"
    assert "BUILTIN_WITHOUT_DEFAULT_DELEGATES" in report.load_hint
    assert report.max_error <= litert.TOLERANCE["int8"]
    x = np.random.default_rng(2).normal(size=(1, 3136)).astype("float32")
    got = run(interpreter(tmp_path / "int8.tflite", "without"), x)
    expected = model.predict(x, verbose=0)
    assert np.abs(got - expected).max() <= 0.05 * max(1, np.abs(expected).max())
    # predict refuses the resolver that crashes on this file (in a fresh
    # process LiteRT 2.3 segfaults every time) and runs the one that works.
    with pytest.raises(ValueError, match=r"int8 sparse weights.*resolver='default'$"):
        litert.predict(tmp_path / "int8.tflite", x)
    np.testing.assert_array_equal(
        litert.predict(
            tmp_path / "int8.tflite", x, resolver="without_default_delegates"
        ),
        got,
    )


def test_a_crash_inside_litert_is_a_failure_not_the_end_of_the_process(
    tmp_path, monkeypatch
):
    # Stands in for LiteRT crashing while it prepares a file: the child
    # process dies of a segmentation fault under every resolver.
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(
        litert_interpreter,
        "_child_command",
        lambda *arguments: [sys.executable, "-c", crash],
    )
    with pytest.raises(
        ValueError,
        match=r"default: fails to run \(LiteRT crashed \(SIGSEGV\) while loading "
        r"or running the file\); without_default_delegates: fails to run "
        r"\(LiteRT crashed \(SIGSEGV\).*nothing was written",
    ):
        kp.export_litert(small_model(), tmp_path / "m.tflite", compare=False)
    assert not list(tmp_path.iterdir())


def test_a_file_litert_refuses_is_reported_with_litert_s_message():
    with pytest.raises(
        RuntimeError, match=r"^The model is not a valid Flatbuffer buffer$"
    ):
        litert_interpreter.run_isolated(
            b"not a tflite file", "default", np.ones((1, 8), "float32")
        )
    # predict lets LiteRT say it too, whatever the resolver.
    with pytest.raises(RuntimeError, match="not a valid Flatbuffer"):
        litert.predict(b"not a tflite file", np.ones((1, 8), "float32"))


def test_float16_sparse_weights_are_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^export_litert\(quantization='float16'\) made a file whose outputs "
        r"differ from the model's \(default: (wrong outputs|fails to run) .*nothing "
        r"was written\. "
        r"LiteRT dequantizes sparse float16 weights wrongly",
    ):
        kp.export_litert(
            seed_head(0.0023), tmp_path / "half.tflite", quantization="float16"
        )
    assert not list(tmp_path.iterdir())


def test_a_weight_the_converter_densifies_is_named(tmp_path):
    with pytest.warns(UserWarning, match=r"\['fc1'\] run dense in"):
        report = kp.export_litert(
            seed_head(0.1), tmp_path / "dense.tflite", compare=False
        )
    assert report.weights[0].runs == "dense (DENSIFY at load)"
    assert report.max_error <= 1e-4


def test_the_last_layer_is_found_though_the_converter_renames_it(tmp_path):
    report = kp.export_litert(
        seed_head(0.0023, fc2_density=0.5), tmp_path / "both.tflite", compare=False
    )
    assert [w.layer for w in report.weights] == ["fc1", "fc2"]
    assert report.weights[1].shape == (10, 1024)


def test_an_exported_model_converts_its_sparse_dense_back_to_dense(tmp_path):
    model = seed_head(0.0023)
    exported = kp.export_sparse(model)
    assert isinstance(exported.get_layer("fc1"), kp.SparseDense)
    report = kp.export_litert(exported, tmp_path / "exported.tflite", compare=False)
    assert [(w.layer, w.runs) for w in report.weights] == [("fc1", "sparse kernel")]


def small_model():
    model = kp.make_prunable(
        keras.Sequential([keras.Input((8,)), L.Dense(4, name="fc")]), verbose=False
    )
    model.get_layer("fc").prune_to(np.eye(8, 4))
    return model


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"path": "model.keras"}, r"Expected `path` to end with '\.tflite'\. "
         r"Received: path='model\.keras'"),
        ({"quantization": "int4"}, r"Expected `quantization` to be one of "
         r"\['float', 'float16', 'int8'\]\. Received: quantization='int4'"),
        ({"repeats": 0}, r"Expected `repeats` to be a positive integer\. "
         r"Received: repeats=0"),
        ({"sample": np.ones((3, 5))}, r"Expected `sample` to be a batch of inputs "
         r"of shape \(None, 8\)\. Received: sample\.shape=\(3, 5\)"),
    ],
    ids=["path", "quantization", "repeats", "sample"],
)  # fmt: skip
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    arguments = {"path": tmp_path / "model.tflite", **kwargs}
    with pytest.raises(ValueError, match=f"^{message}$"):
        kp.export_litert(small_model(), **arguments)


def test_models_with_several_inputs_export_and_check_by_name(tmp_path):
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    model = keras.Model([a, b], L.Dense(2)(L.Concatenate()([a, b])))
    x = [np.ones((2, 4), "float32"), np.arange(6, dtype="float32").reshape(2, 3)]
    for sample in (x, {"b": x[1], "a": x[0]}, None):
        report = kp.export_litert(model, tmp_path / "two.tflite", sample=sample,
                                  compare=False)  # fmt: skip
        assert report.max_error < 1e-6
    with pytest.raises(ValueError, match=r"^Expected `sample\['b'\]` to be a batch"):
        kp.export_litert(model, tmp_path / "two.tflite", sample={**{"a": x[0]},
                         "b": x[0]})  # fmt: skip
    with pytest.raises(ValueError, match=r"hold the model's inputs \['a', 'b'\]"):
        kp.export_litert(model, tmp_path / "two.tflite", sample={"a": x[0]})
    two = keras.Model(a, [L.Dense(2)(a), L.Dense(1)(a)])
    with pytest.raises(ValueError, match="one output. Received: a model with 2"):
        kp.export_litert(two, tmp_path / "outputs.tflite")


def test_masks_in_blocks_of_four_inputs_run_as_blocks(tmp_path):
    model = seed_head(1.0)
    kp.IterativePruningCallback.prune_layer(
        model.get_layer("fc1"), 0.9977, granularity=(1, 4)
    )
    report = kp.export_litert(model, tmp_path / "blocks.tflite", compare=False)
    assert [(w.storage, w.runs) for w in report.weights] == [
        ("sparse, 1x4 blocks", "sparse kernel")
    ]
    assert report.max_error <= 1e-4


def test_the_output_check_is_relative_to_small_outputs():
    # Outputs around 1e-5, off by 2e-5: an absolute tolerance of 0.05 would
    # pass them; relative to the outputs' scale the error is 2.
    expected = np.array([[1e-5, -1e-5]])
    assert litert._error(expected + 2e-5, expected) == pytest.approx(2.0)
    assert litert._error(expected, expected) == 0.0
    assert litert._error(np.array([[np.nan, 0.0]]), expected) == float("inf")


def test_a_sparse_dense_layer_with_inputs_not_a_multiple_of_four_is_named(tmp_path):
    # LiteRT's sparse FULLY_CONNECTED kernel reads 1x4 blocks past the end.
    model = kp.make_prunable(
        keras.Sequential([keras.Input((50,)), L.Dense(256, name="odd")]),
        verbose=False,
    )
    model.get_layer("odd").prune_to(np.random.default_rng(0).random((50, 256)) < 0.02)
    with pytest.raises(
        ValueError,
        match=r"computes \['odd'\] wrongly: their input size is not a multiple of 4",
    ):
        kp.export_litert(model, tmp_path / "odd.tflite", compare=False)
    assert not list(tmp_path.iterdir())


def test_subclassed_and_multi_output_models_are_refused_clearly(tmp_path):
    class Sub(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.fc = L.Dense(2)

        def call(self, x):
            return self.fc(x)

    sub = Sub()
    sub(np.ones((1, 4)))
    with pytest.raises(ValueError, match="takes a Sequential or Functional model"):
        kp.export_litert(sub, tmp_path / "sub.tflite", sample=np.ones((2, 4)))
    inputs = keras.Input((4,))
    two = keras.Model(inputs, [L.Dense(2)(inputs), L.Dense(3)(inputs)])
    with pytest.raises(
        ValueError, match="with one output. Received: a model with 2 outputs"
    ):
        kp.export_litert(two, tmp_path / "two.tflite")


def test_nan_outputs_on_the_sample_are_refused(tmp_path):
    with pytest.raises(ValueError, match="outputs on `sample` to be finite"):
        kp.export_litert(
            small_model(), tmp_path / "nan.tflite", sample=np.full((2, 8), np.nan)
        )


def test_predict_checks_its_arguments(tmp_path):
    model = small_model()
    kp.export_litert(model, tmp_path / "m.tflite", compare=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        litert.predict(tmp_path / "m.tflite", np.ones((3, 8)), batch_size=0)
    with pytest.raises(ValueError, match="at least one row"):
        litert.predict(tmp_path / "m.tflite", np.ones((0, 8)))
    got = litert.predict(
        tmp_path / "m.tflite", np.ones((5, 8), "float32"), batch_size=2
    )
    np.testing.assert_allclose(
        got, model.predict(np.ones((5, 8)), verbose=0), atol=1e-5
    )


def test_a_layer_the_model_never_calls_does_not_stop_the_export(tmp_path):
    from tests.test_copying import skips_one

    masked = kp.make_prunable(skips_one(), verbose=False)
    masked.get_layer("head").prune_to(np.eye(3, 2))
    report = kp.export_litert(
        masked, tmp_path / "skips.tflite", sample=np.ones((1, 4), "float32"),
        compare=False,
    )  # fmt: skip
    assert [w.layer for w in report.weights] == ["head"]
