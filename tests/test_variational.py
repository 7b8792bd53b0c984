"""Sparse variational dropout: the noisy forward pass, its KL term, saving,
and the callback's signal-to-noise ranking; on every backend."""

import os

import keras
import numpy as np
import pytest

import keras_prune as kp
from keras_prune.masking import masked_class
from keras_prune.variational import (
    kl_divergence,
    log_alpha,
    signal_to_noise,
)
from tests.backend_utils import to_numpy

L = keras.layers


def dense_model(kernel, bias=None, activation=None):
    """A Sequential of one masked Dense with the given kernel `(inputs,
    units)` and bias."""
    kernel = np.asarray(kernel, "float32")
    layer = kp.MaskedDense(kernel.shape[1], activation=activation, name="dense")
    model = keras.Sequential([keras.Input((kernel.shape[0],)), layer])
    layer.kernel.assign(kernel)
    layer.bias.assign(np.zeros(kernel.shape[1]) if bias is None else bias)
    return model, layer


def set_log_sigma2(layer, values):
    layer.variational_dropout.log_sigma2["kernel"].assign(np.asarray(values, "float32"))


def test_kl_divergence_matches_molchanov_et_al():
    # -KL = k1 sigmoid(k2 + k3 log a) - log(1 + 1/a) / 2 - k1, by hand at
    # log a = 0: sigmoid(1.8732) = 0.86681, log(2) / 2 = 0.34657.
    at_zero = 0.63576 - (0.63576 * 0.86681 - 0.34657)
    values = to_numpy(kl_divergence(np.array([-4.0, 0.0, 8.0], "float32")))
    assert values[1] == pytest.approx(at_zero, abs=1e-4)
    assert values[0] > values[1] > values[2] >= 0.0
    assert values[2] == pytest.approx(0.0, abs=1e-3)  # all noise: free


def test_log_alpha_is_the_log_noise_to_signal_ratio_clipped():
    values = to_numpy(
        log_alpha(np.array([1.0, 0.1, 1.0, 1.0]), np.array([0.0, 0.0, 30.0, -30.0]))
    )
    np.testing.assert_allclose(
        values, [0.0, np.log(100.0), 10.0, -10.0], rtol=1e-5, atol=1e-6
    )


def test_inference_is_unchanged_and_training_draws_noise():
    model, layer = dense_model([[1.0, -2.0], [0.5, 3.0]], bias=[0.1, 0.2])
    x = np.array([[1.0, 2.0]], "float32")
    before = to_numpy(model(x))
    assert kp.add_variational_dropout(model, examples=10, seed=1) == ["dense"]
    np.testing.assert_allclose(to_numpy(model(x)), before, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(model(x, training=False)), before, rtol=1e-6)
    set_log_sigma2(layer, np.zeros((2, 2)))  # sigma = 1
    first, second = to_numpy(model(x, training=True)), to_numpy(model(x, training=True))
    assert not np.allclose(first, second)


def test_training_output_has_the_local_reparameterization_mean_and_variance():
    # One unit reading two inputs: the pre-activation is normal with mean
    # x . theta + b and variance x^2 . sigma^2, over the live weights only.
    model, layer = dense_model([[2.0], [1.0], [5.0]], bias=[0.5])
    layer.prune_to(np.array([[1.0], [1.0], [0.0]]))
    kp.add_variational_dropout(model, examples=10, seed=3)
    set_log_sigma2(layer, np.log([[0.25], [1.0], [100.0]]))
    x = np.tile(np.array([[1.0, 2.0, 1.0]], "float32"), (20000, 1))
    draws = to_numpy(model(x, training=True))[:, 0]
    # mean: 1*2 + 2*1 + 0.5 = 4.5; variance: 1*0.25 + 4*1 = 4.25 (the pruned
    # weight's huge sigma adds nothing).
    assert draws.mean() == pytest.approx(4.5, abs=0.05)
    assert draws.var() == pytest.approx(4.25, rel=0.05)


def test_activation_applies_after_the_noise():
    model, layer = dense_model([[1.0]], activation="relu")
    kp.add_variational_dropout(model, examples=10, seed=0)
    set_log_sigma2(layer, [[0.0]])
    draws = to_numpy(model(np.ones((20000, 1), "float32"), training=True))
    # relu of N(1, 1): zero with probability Phi(-1) = 0.159, else positive.
    assert draws.min() == 0.0
    assert np.mean(draws == 0.0) == pytest.approx(0.159, abs=0.015)


def test_a_convolution_gets_the_same_mean_and_variance():
    # A 2x2 kernel on a 2x2 image is one dot product: the same numbers as
    # the Dense test, read through Conv2D.
    conv = masked_class(L.Conv2D)(1, 2, name="conv")
    model = keras.Sequential([keras.Input((2, 2, 1)), conv])
    conv.kernel.assign(np.array([2.0, 1.0, 5.0, 0.0]).reshape(2, 2, 1, 1))
    conv.bias.assign([0.5])
    conv.prune_to(np.array([1.0, 1.0, 0.0, 1.0]).reshape(2, 2, 1, 1))
    kp.add_variational_dropout(model, examples=10, seed=3)
    conv.variational_dropout.log_sigma2["kernel"].assign(
        np.log(np.array([0.25, 1.0, 100.0, 1.0], "float32")).reshape(2, 2, 1, 1)
    )
    x = np.tile(
        np.array([1.0, 2.0, 1.0, 0.0], "float32").reshape(1, 2, 2, 1), (20000, 1, 1, 1)
    )
    draws = to_numpy(model(x, training=True)).ravel()
    assert draws.mean() == pytest.approx(4.5, abs=0.05)
    assert draws.var() == pytest.approx(4.25, rel=0.05)
    np.testing.assert_allclose(to_numpy(model(x[:1])).ravel(), [4.5], rtol=1e-6)


def test_the_kl_term_counts_live_weights_over_examples():
    model, layer = dense_model([[1.0], [1.0], [1.0]])
    layer.prune_to(np.array([[1.0], [1.0], [0.0]]))
    kp.add_variational_dropout(model, examples=4, seed=0)
    set_log_sigma2(layer, [[0.0], [0.0], [0.0]])  # log alpha = 0 each
    model(np.ones((2, 3), "float32"), training=True)
    per_weight = float(to_numpy(kl_divergence(np.array(0.0, "float32"))))
    assert len(model.losses) == 1
    assert float(to_numpy(model.losses[0])) == pytest.approx(2 * per_weight / 4)
    model(np.ones((2, 3), "float32"), training=False)
    assert not model.losses  # inference adds no loss


def test_training_raises_the_noise_of_weights_the_data_does_not_need():
    # y = x0: the weight on x1 is useless, so the KL term drives its noise up.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 2)).astype("float32")
    y = x[:, :1]
    model, layer = dense_model([[1.0], [0.3]])
    kp.add_variational_dropout(model, examples=256, seed=0)
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(x, y, epochs=30, batch_size=64, verbose=0)
    ratio = signal_to_noise(layer)["kernel"].ravel()
    assert ratio[0] > 10 * ratio[1]


def test_the_noise_saves_loads_and_trains_on(tmp_path):
    model, layer = dense_model([[1.0, 2.0], [3.0, 4.0]])
    kp.add_variational_dropout(model, examples=8, seed=0)
    set_log_sigma2(layer, [[-1.0, -2.0], [-3.0, -4.0]])
    layer.prune_to(np.array([[1.0, 0.0], [1.0, 1.0]]))
    model.compile("adam", "mse")
    model.fit(np.ones((8, 2)), np.ones((8, 2)), verbose=0)
    path = os.path.join(tmp_path, "noisy.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    noise = loaded.layers[0].variational_dropout
    np.testing.assert_array_equal(
        to_numpy(noise.log_sigma2["kernel"]),
        to_numpy(layer.variational_dropout.log_sigma2["kernel"]),
    )
    np.testing.assert_array_equal(
        to_numpy(loaded.layers[0].masks["kernel"]), [[1, 0], [1, 1]]
    )
    assert noise.examples == 8
    loaded.fit(np.ones((8, 2)), np.ones((8, 2)), verbose=0)  # the optimizer resumes


def test_removing_the_noise_gives_a_plain_masked_layer():
    model, layer = dense_model([[1.0], [2.0]])
    kp.add_variational_dropout(model, examples=8)
    assert "variational_dropout" in layer.get_config()
    assert kp.remove_variational_dropout(model) == ["dense"]
    assert "variational_dropout" not in layer.get_config()
    assert len(model.trainable_variables) == 2  # kernel and bias
    assert kp.remove_variational_dropout(model) == []
    x = np.ones((3, 2), "float32")
    np.testing.assert_allclose(to_numpy(model(x, training=True)), [[3.0]] * 3)


@pytest.mark.parametrize("examples", [0, 2.5, True, "100"])
def test_a_bad_number_of_examples_is_named(examples):
    model, _ = dense_model([[1.0]])
    with pytest.raises(ValueError, match=f"examples={examples!r}"):
        kp.add_variational_dropout(model, examples=examples)


def test_layers_without_a_linear_kernel_are_named():
    embedding = masked_class(L.Embedding)(5, 2, name="embedding")
    model = keras.Sequential([keras.Input((3,), dtype="int32"), embedding])
    with pytest.raises(ValueError, match="'embedding'"):
        kp.add_variational_dropout(model, examples=10)
    dense = kp.MaskedDense(2, name="dense")
    mixed = keras.Sequential([keras.Input((3,), dtype="int32"), embedding, dense])
    with pytest.warns(UserWarning, match=r"get no noise: \['embedding'\]"):
        assert kp.add_variational_dropout(mixed, examples=10) == ["dense"]
    with pytest.raises(ValueError, match=r"\['dense'\] have variational dropout"):
        kp.add_variational_dropout(mixed, examples=10)


def test_the_callback_cuts_the_noisiest_weight_not_the_smallest():
    model, layer = dense_model([[2.0], [1.0], [0.5], [3.0]])
    kp.add_variational_dropout(model, examples=4)
    # |theta| / sigma: 2/10, 1/0.1, 0.5/0.1, 3/0.1 -> the largest weight but
    # one is the noisiest.
    set_log_sigma2(layer, np.log(np.square([[10.0], [0.1], [0.1], [0.1]])))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    pruning = kp.IterativePruningCallback(
        0.25, schedule="constant", ranking="signal_to_noise"
    )
    model.fit(
        np.zeros((4, 4)), np.zeros((4, 1)), epochs=1, verbose=0, callbacks=[pruning]
    )
    np.testing.assert_array_equal(to_numpy(layer.masks["kernel"]).ravel(), [0, 1, 1, 1])


def test_signal_to_noise_ranking_needs_the_noise():
    model, _ = dense_model([[2.0], [1.0]])
    model.compile("sgd", "mse")
    pruning = kp.IterativePruningCallback(
        0.5, schedule="constant", ranking="signal_to_noise"
    )
    with pytest.raises(ValueError, match="'dense' has no variational dropout"):
        model.fit(np.zeros((2, 2)), np.zeros((2, 1)), verbose=0, callbacks=[pruning])


def test_a_bad_ranking_is_named():
    with pytest.raises(ValueError, match="ranking='wanda'"):
        kp.IterativePruningCallback(0.5, ranking="wanda")
    with pytest.raises(ValueError, match="scope='global'"):
        kp.IterativePruningCallback(0.5, scope="global", ranking="signal_to_noise")


def test_each_layer_draws_its_own_noise():
    # Two same-shaped layers on the same input, zero weights and sigma 1:
    # each output is its layer's noise alone.
    inputs = keras.Input((1,))
    first = kp.MaskedDense(3, use_bias=False, name="first")
    second = kp.MaskedDense(3, use_bias=False, name="second")
    model = keras.Model(inputs, [first(inputs), second(inputs)])
    kp.add_variational_dropout(model, examples=10, seed=7)
    for layer in (first, second):
        layer.kernel.assign(np.zeros((1, 3)))
        set_log_sigma2(layer, np.zeros((1, 3)))
    a, b = model(np.ones((4, 1), "float32"), training=True)
    assert np.all(to_numpy(a) != 0) and not np.allclose(to_numpy(a), to_numpy(b))


def test_mixed_float16_trains_with_pruned_weights():
    # Under float16, log(theta^2 + 1e-8) of a pruned weight had an infinite
    # gradient: the loss-scaling optimizer then skipped every step.
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model, layer = dense_model([[1.0, 0.5], [0.25, 2.0]])
        layer.prune_to(np.array([[1.0, 0.0], [1.0, 1.0]]))
        kp.add_variational_dropout(model, examples=8, seed=0)
        model.compile(keras.optimizers.Adam(0.01), "mse")
        before = to_numpy(layer.kernel)
        history = model.fit(
            np.ones((8, 2)), np.zeros((8, 2)), epochs=2, batch_size=4, verbose=0
        )
        assert np.isfinite(history.history["loss"]).all()
        assert to_numpy(model(np.ones((1, 2)), training=True)).dtype == np.float16
        moved = to_numpy(layer.kernel) != before
        assert moved[[0, 1, 1], [0, 0, 1]].all() and not moved[0, 1]
    finally:
        keras.config.set_dtype_policy("float32")
