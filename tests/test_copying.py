"""Copies of the user's own live models (`keras_prune.copying`): every model
that Keras itself can copy, and the user code that Keras refuses to read
from an untrusted file, goes through `make_prunable` and the converters
with the input untouched and Keras's safe mode as it was."""

import threading
import warnings

import keras
import numpy as np
import pytest

import keras_prune as kp
from keras_prune.copying import copy_model
from tests.backend_utils import to_numpy

L = keras.layers


class GuideModel(keras.Model):
    """A subclassed model as the Keras guides write one: no constructor
    arguments, no `get_config`."""

    def __init__(self):
        super().__init__()
        self.hidden = L.Dense(8, activation="relu")
        self.out = L.Dense(2)

    def call(self, x):
        return self.out(self.hidden(x))


@keras.saving.register_keras_serializable(package="tests")
class RegisteredGuideModel(GuideModel):
    """The same, registered with Keras (which then looks it up by its
    registered name, before any custom object of ours)."""


def guide_model(cls=GuideModel):
    model = cls()
    model(np.zeros((1, 4), "float32"))
    return model


def lambda_activation():
    scale = 3.0  # a closure: the copy must keep it
    return keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(8, activation=lambda t: keras.ops.relu(t) * scale),
            L.Dense(2),
        ]
    )


def lambda_layer():
    inputs = keras.Input((4,))
    x = L.Lambda(lambda t: t * 2.0 + 1.0)(L.Dense(8)(inputs))
    return keras.Model(inputs, L.Dense(2)(x))


USER_CODE = {
    "subclassed, no-argument constructor": guide_model,
    "registered, no-argument constructor": lambda: guide_model(RegisteredGuideModel),
    "lambda activation": lambda_activation,
    "Lambda layer": lambda_layer,
}


def x4():
    return np.random.default_rng(0).normal(size=(5, 4)).astype("float32")


@pytest.mark.parametrize("make", USER_CODE.values(), ids=USER_CODE.keys())
def test_user_code_is_made_prunable_pruned_and_exported(make, tmp_path):
    model = make()
    before = [to_numpy(w).copy() for w in model.weights]
    x = x4()
    expected = to_numpy(model(x))
    masked = kp.make_prunable(model, verbose=False)
    assert len(kp.masked_layers(masked)) == 2
    np.testing.assert_array_equal(to_numpy(masked(x)), expected)
    # The input is untouched: same classes, same weights.
    assert not kp.masked_layers(model)
    for old, new in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, to_numpy(new))
    for layer in kp.masked_layers(masked):
        layer.prune_to({"kernel": np.eye(*layer.masks["kernel"].shape)})
    pruned = to_numpy(masked(x))
    np.testing.assert_allclose(to_numpy(kp.strip_pruning(masked)(x)), pruned, 1e-6)
    np.testing.assert_allclose(to_numpy(kp.export_sparse(masked)(x)), pruned, 1e-6)


@pytest.mark.parametrize("make", USER_CODE.values(), ids=USER_CODE.keys())
def test_a_model_compiled_with_a_lambda_loss_converts_without_keras_warnings(make):
    # Keras's clone_model recompiles from the serialized compile config,
    # which it refuses to read with a lambda in it; and it warns about
    # lambdas it serializes, though nothing is saved for later here.
    model = make()
    model.compile("adam", loss=lambda a, b: keras.ops.mean(keras.ops.abs(a - b)))
    x = x4()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "The object being serialized includes")
        masked = kp.make_prunable(model, verbose=False)
        assert masked.compiled
        masked.fit(x, np.zeros((5, 2)), verbose=0)
        expected = to_numpy(masked(x))
        for convert in (kp.strip_pruning, kp.export_sparse):
            np.testing.assert_allclose(to_numpy(convert(masked)(x)), expected, 1e-6)


class OwnCompile(GuideModel):
    """A subclassed model whose `compile` takes arguments of its own."""

    def compile(self, rate=0.01, **kwargs):
        super().compile(optimizer=keras.optimizers.SGD(rate), loss="mse", **kwargs)


def test_a_compile_with_its_own_arguments_is_repeated_with_keras_s_record():
    model = guide_model(OwnCompile)
    model.compile(rate=0.5)
    with pytest.warns(UserWarning, match="overrides `compile\\(\\)` with arguments"):
        copy = copy_model(model)
    assert copy.compiled and isinstance(copy.optimizer, keras.optimizers.SGD)
    assert float(to_numpy(copy.optimizer.learning_rate)) == 0.5


@pytest.mark.parametrize("cls", [GuideModel, RegisteredGuideModel])
def test_a_subclassed_model_without_arguments_saves_and_loads_pruned(cls, tmp_path):
    # Keras writes `trainable` and `dtype` into such a model's config and
    # cannot read it back (the stock model does not load); the masked model
    # and the exported one do.
    masked = kp.make_prunable(guide_model(cls), verbose=False)
    masked.layers[0].prune_to({"kernel": np.eye(4, 8)})
    x = x4()
    for model in (masked, kp.export_sparse(masked)):
        path = str(tmp_path / f"{type(model).__name__}.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        assert type(loaded) is type(model)
        np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


def test_a_lambda_keeps_its_closure_through_the_copy():
    model = lambda_activation()
    x = x4()
    copy = copy_model(model)
    np.testing.assert_array_equal(to_numpy(copy(x)), to_numpy(model(x)))
    assert copy.layers[0].activation is model.layers[0].activation


def test_mobilenet_v3_copies_although_two_classes_are_named_add():
    # `x + 3.0` in MobileNetV3 is Keras's `Add` operation; the model also has
    # `Add` layers: the copy must not mistake one for the other.
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), weights=None, classes=3, include_preprocessing=False
    )
    masked = kp.make_prunable(model, verbose=False)
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(masked(x)), to_numpy(model(x)), rtol=1e-5, atol=1e-6
    )
    assert len(kp.masked_layers(masked)) > 30


def test_safe_mode_is_as_it_was_after_a_copy_and_after_a_failed_one():
    from keras.src.saving import serialization_lib

    copy_model(lambda_layer())
    assert serialization_lib.in_safe_mode() is None

    class Unbuildable(keras.Model):
        def __init__(self, width):  # not a type Keras can put in a config
            super().__init__()
            self.width = width
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Unbuildable(width=[object()])
    model(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="Could not copy model 'unbuildable"):
        kp.make_prunable(model)
    assert serialization_lib.in_safe_mode() is None
    # Another thread never saw safe mode off either.
    seen = []
    thread = threading.Thread(
        target=lambda: seen.append(serialization_lib.in_safe_mode())
    )
    thread.start()
    thread.join()
    assert seen == [None]


def test_a_model_that_cannot_be_copied_is_named_and_inplace_offered():
    class Unbuildable(keras.Model):
        def __init__(self, layer, name=None):  # a layer: no automatic config
            super().__init__(name=name)
            self.inner = layer

        def call(self, x):
            return self.inner(x)

    model = Unbuildable(L.Dense(2), name="user_model")
    model(np.zeros((1, 3)))
    with pytest.raises(ValueError) as error:
        kp.make_prunable(model)
    message = str(error.value)
    assert "Could not copy model 'user_model' of type Unbuildable" in message
    assert "inplace=True" in message
    masked = kp.make_prunable(model, inplace=True, verbose=False)
    assert masked is model and len(kp.masked_layers(model)) == 1


def test_a_copy_keeps_what_the_user_froze():
    model = guide_model()
    model.hidden.trainable = False
    masked = kp.make_prunable(model, verbose=False)
    assert [layer.name for layer in kp.masked_layers(masked)] == [masked.out.name]
    assert not masked.hidden.trainable and masked.out.trainable


def test_lambdas_with_the_same_code_keep_their_own_closures():
    def scaled(factor):
        return lambda t: t * factor

    helper = abs  # a closure holding a function, not JSON

    model = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(4, activation=scaled(2.0)),
            L.Dense(4, activation=scaled(-3.0)),
            L.Dense(2, activation=lambda t: helper(t)),
        ]
    )
    model.compile("adam", loss=lambda y, p: keras.ops.mean((y - p) ** 2))
    x = x4()
    copy = copy_model(model)
    np.testing.assert_array_equal(to_numpy(copy(x)), to_numpy(model(x)))
    for original, copied in zip(model.layers, copy.layers, strict=True):
        assert copied.activation is original.activation
    copy.fit(x, np.zeros((5, 2)), verbose=0)  # compiled with the live loss


@keras.saving.register_keras_serializable(package="tests")
class Tower(keras.Model):
    """A Functional subclass rebuilt from its constructor's arguments (as a
    keras-hub backbone is), with a Sequential inside."""

    def __init__(self, width=4, **kwargs):
        inputs = keras.Input((3,))
        x = L.Dense(width, name="first")(inputs)
        x = keras.Sequential([L.Dense(width, name="inner")], name="stack")(x)
        super().__init__(inputs, x, **kwargs)
        self.width = width

    def get_config(self):
        return {"width": self.width, "name": self.name, "trainable": self.trainable}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def test_model_rebuilt_from_arguments_with_a_sequential_inside_loads(tmp_path):
    masked = kp.make_prunable(Tower(), verbose=False)
    for layer in kp.masked_layers(masked):
        layer.prune_to({"kernel": np.eye(*layer.masks["kernel"].shape)})
    masked.save(tmp_path / "tower.keras")
    loaded = keras.models.load_model(tmp_path / "tower.keras")
    x = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(masked(x)))
    assert sorted(layer.name for layer in kp.masked_layers(loaded)) == [
        "first",
        "inner",
    ]


def test_a_users_class_never_takes_a_libraries_masked_name():
    from keras_prune.masking import masked_class

    class TransformerEncoder(L.Layer):  # the keras.io name keras-hub has too
        def get_prunable_weights(self):
            return []

    assert masked_class(TransformerEncoder).__name__ == "MaskedTransformerEncoder"

    class Other(L.Layer):
        pass

    Other.__name__ = Other.__qualname__ = "TransformerEncoder"
    Other.__module__ = "elsewhere"
    with pytest.raises(ValueError, match="one layer class named 'TransformerEncoder'"):
        masked_class(Other)


class SkipsOne(L.Layer):
    """Makes two Dense layers and calls one (as keras-hub's EfficientNet
    blocks make squeeze-and-excite layers they skip at ratio 0)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.used = L.Dense(3, name="used")
        self.unused = L.Dense(3, name="unused")

    def call(self, x):
        return self.used(x)


def skips_one():
    inputs = keras.Input((4,))
    return keras.Model(inputs, L.Dense(2, name="head")(SkipsOne()(inputs)))


def test_a_layer_the_model_never_calls_is_left_and_said_so():
    model = skips_one()
    said = r"left 1 layer\(s\) unmasked:\n  1 layer\(s\) the model never calls"
    with pytest.warns(UserWarning, match=said + r".*: unused \(Dense\)"):
        masked = kp.make_prunable(model)
    assert sorted(layer.name for layer in kp.masked_layers(masked)) == ["head", "used"]
    left = {e.name: e.reason for e in kp.conversion_report(masked).left}
    assert "never calls it" in left["unused"]
    # Training prunes what runs, and the converters take the model whole.
    x = x4()
    masked.compile("adam", "mse")
    masked.fit(
        x,
        np.zeros((5, 2)),
        epochs=2,
        verbose=0,
        callbacks=[kp.IterativePruningCallback(final_sparsity=0.5)],
    )
    pruned = to_numpy(masked(x))
    np.testing.assert_allclose(to_numpy(kp.export_sparse(masked)(x)), pruned, 1e-6)
    np.testing.assert_array_equal(to_numpy(kp.strip_pruning(masked)(x)), pruned)


def test_a_copy_s_optimizer_excludes_what_the_original_excluded_from_decay():
    model = lambda_layer()
    optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    model.compile(optimizer, "mse")
    copy = copy_model(model)
    assert copy.optimizer is not optimizer and copy.optimizer.weight_decay == 0.1
    # Keras's optimizer config does not hold the exclusions.
    assert copy.optimizer._exclude_from_weight_decay_pattern.search("dense/bias")
