"""`shrink` removes what pruning emptied, physically, without changing a
prediction; `ChannelGraph` says which channels go together."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

import keras_prune as kp
from keras_prune.channels import ChannelGraph
from tests.backend_utils import BACKEND, to_numpy

L = keras.layers


def assign(layer, name, value):
    variable = next(v for v in layer.weights if v.path.endswith("/" + name))
    variable.assign(np.asarray(value, dtype="float32"))


def shrink_quietly(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kp.shrink(model, **kwargs)


def prune_groups(masked, fraction, seed=0):
    """Masks that prune `fraction` of the removable channel groups, chosen
    at random, wholly (units, the rows that read them, coupled layers)."""
    graph = ChannelGraph(masked)
    groups = graph.removable_groups()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(groups, int(fraction * len(groups)), replace=False)
    for name, masks in graph.masks_without(chosen).items():
        masked.get_layer(name).prune_to(masks)
    return len(chosen)


def randomize_statistics(model, seed=0):
    """Batch-normalization statistics and offsets far from the identity, so
    that a wrongly sliced or dropped channel changes the logits."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n))
            layer.beta.assign(rng.normal(0, 0.5, n))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n))


def max_difference(a, b, x):
    return float(np.max(np.abs(to_numpy(a(x)) - to_numpy(b(x)))))


# --- hand-checked fixtures ------------------------------------------------


def test_units_whose_outgoing_weights_are_zero_go():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(4, activation="relu", name="hidden"),
            L.Dense(2, name="out"),
        ]
    )
    hidden = model.get_layer("hidden")
    kernel = to_numpy(hidden.kernel)
    model.get_layer("out").kernel.assign([[1, 2], [0, 0], [3, 4], [0, 0]])
    small = shrink_quietly(model)
    assert small.get_layer("hidden").units == 2
    np.testing.assert_array_equal(
        to_numpy(small.get_layer("hidden").kernel), kernel[:, [0, 2]]
    )
    np.testing.assert_array_equal(
        to_numpy(small.get_layer("out").kernel), [[1, 2], [3, 4]]
    )
    assert [type(layer).__name__ for layer in small.layers] == ["Dense", "Dense"]


def test_dead_unit_constant_is_folded_into_the_next_bias():
    # Unit 1 of "hidden" has no live input: it outputs relu(bias) = 2.
    model = keras.Sequential(
        [
            keras.Input((2,)),
            L.Dense(2, activation="relu", name="hidden"),
            L.Dense(1, name="out"),
        ]
    )
    assign(model.get_layer("hidden"), "kernel", [[1.0, 0.0], [1.0, 0.0]])
    assign(model.get_layer("hidden"), "bias", [0.0, 2.0])
    assign(model.get_layer("out"), "kernel", [[3.0], [5.0]])
    assign(model.get_layer("out"), "bias", [1.0])
    small = shrink_quietly(model)
    assert small.get_layer("hidden").units == 1
    # out = 3 * relu(x0 + x1) + 5 * 2 + 1
    np.testing.assert_allclose(to_numpy(small.get_layer("out").bias), [11.0])
    x = np.array([[1.0, 2.0], [-3.0, 1.0]], dtype="float32")
    np.testing.assert_allclose(to_numpy(small(x)), [[20.0], [11.0]])


def test_dead_unit_without_a_bias_to_fold_into_gets_one():
    model = keras.Sequential(
        [
            keras.Input((2,)),
            L.Dense(2, activation="sigmoid", name="hidden"),
            L.Dense(1, use_bias=False, name="out"),
        ]
    )
    assign(model.get_layer("hidden"), "kernel", [[1.0, 0.0], [1.0, 0.0]])
    assign(model.get_layer("out"), "kernel", [[1.0], [4.0]])
    small = shrink_quietly(model)
    out = small.get_layer("out")
    assert out.use_bias and small.get_layer("hidden").units == 1
    np.testing.assert_allclose(to_numpy(out.bias), [2.0])  # 4 * sigmoid(0)


def test_conv_filter_goes_with_its_batchnorm_channel_and_flattened_rows():
    model = keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            L.Conv2D(3, 3, name="conv"),  # (2, 2, 3)
            L.BatchNormalization(name="bn"),
            L.ReLU(),
            L.Flatten(),
            L.Dense(2, name="head"),
        ]
    )
    randomize_statistics(model)
    masked = kp.make_prunable(model)
    graph = ChannelGraph(masked)
    filter_1 = graph.layers["conv"].outputs[1]
    masked.get_layer("conv").prune_to(graph.masks_without([filter_1])["conv"]["kernel"])
    masked.get_layer("head").prune_to(graph.masks_without([filter_1])["head"]["kernel"])
    small = shrink_quietly(masked)
    assert small.get_layer("conv").filters == 2
    np.testing.assert_array_equal(
        to_numpy(small.get_layer("bn").moving_mean),
        to_numpy(model.get_layer("bn").moving_mean)[[0, 2]],
    )
    # Flattened features are (position, channel): channel 1 is rows 1, 4, 7, 10.
    kept_rows = [r for r in range(12) if r % 3 != 1]
    np.testing.assert_array_equal(
        to_numpy(small.get_layer("head").kernel),
        to_numpy(model.get_layer("head").kernel)[kept_rows],
    )
    x = np.random.default_rng(0).normal(size=(5, 4, 4, 1)).astype("float32")
    assert max_difference(masked, small, x) <= 1e-5


def residual_block():
    inputs = keras.Input((6, 6, 2))
    a = L.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(4, 1, name="b")(inputs)
    x = L.Add(name="add")([a, b])
    x = L.Activation("relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(3, name="head")(x))


def test_residual_add_couples_the_filters_of_both_branches():
    model = residual_block()
    graph = ChannelGraph(model)
    np.testing.assert_array_equal(graph.layers["a"].outputs, graph.layers["b"].outputs)
    assert len(graph.removable_groups()) == 4
    masks = graph.masks_without([graph.layers["a"].outputs[2]])
    assert sorted(masks) == ["a", "b", "head"]
    assert not masks["a"]["kernel"][..., 2].any() and masks["a"]["kernel"][..., 1].all()


def test_a_residual_channel_read_elsewhere_stays():
    # Filter 2 pruned in branch "a" only: the sum still carries branch b's
    # channel 2, which the head reads, so the channel stays in both.
    masked = kp.make_prunable(residual_block())
    mask = np.ones((3, 3, 2, 4), "float32")
    mask[..., 2] = 0
    masked.get_layer("a").prune_to(mask)
    small = shrink_quietly(masked)
    assert small.get_layer("a").filters == 4 and small.get_layer("b").filters == 4
    prune_groups(masked, 0.5)
    small = shrink_quietly(masked)
    assert small.get_layer("a").filters == 2 == small.get_layer("b").filters
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 2)).astype("float32")
    assert max_difference(masked, small, x) <= 1e-5


def test_concatenate_keeps_each_inputs_offset():
    inputs = keras.Input((3,))
    a = L.Dense(2, name="a")(inputs)
    b = L.Dense(3, name="b")(inputs)
    x = L.Concatenate()([a, b])
    model = keras.Model(inputs, L.Dense(1, name="head")(x))
    head = np.arange(1, 6, dtype="float32").reshape(5, 1)
    head[3] = 0  # unit 1 of "b"
    model.get_layer("head").kernel.assign(head)
    small = shrink_quietly(model)
    assert small.get_layer("a").units == 2 and small.get_layer("b").units == 2
    np.testing.assert_array_equal(
        to_numpy(small.get_layer("head").kernel).ravel(), [1, 2, 3, 5]
    )


def test_depthwise_channels_go_with_their_input_filter():
    inputs = keras.Input((5, 5, 1))
    x = L.Conv2D(3, 1, name="expand")(inputs)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise")(x)
    x = L.Conv2D(2, 1, name="project")(x)
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    masked = kp.make_prunable(model)
    graph = ChannelGraph(masked)
    group = graph.layers["expand"].outputs[1]
    # Depthwise outputs 2 and 3 (multiplier 2) come from input channel 1.
    np.testing.assert_array_equal(graph.layers["depthwise"].outputs[2:4], [group] * 2)
    for name, masks in graph.masks_without([group]).items():
        masked.get_layer(name).prune_to(masks)
    small = shrink_quietly(masked)
    assert tuple(small.get_layer("depthwise").kernel.shape) == (3, 3, 2, 2)
    assert tuple(small.get_layer("project").kernel.shape) == (1, 1, 4, 2)
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 1)).astype("float32")
    assert max_difference(masked, small, x) <= 1e-5


def test_dense_on_sequences_and_einsum_dense_shrink():
    inputs = keras.Input((4, 3))
    x = L.Dense(5, activation="relu", name="dense")(inputs)
    x = L.EinsumDense("abc,cd->abd", (4, 6), bias_axes="d", name="einsum")(x)
    model = keras.Model(inputs, L.Dense(2, name="head")(x))
    masked = kp.make_prunable(model)
    prune_groups(masked, 0.5, seed=3)
    small = shrink_quietly(masked)
    assert (
        small.get_layer("dense").units + small.get_layer("einsum").kernel.shape[1] < 11
    )
    x = np.random.default_rng(0).normal(size=(2, 4, 3)).astype("float32")
    assert max_difference(masked, small, x) <= 1e-5


# --- what is kept, and says so ----------------------------------------------


def test_channels_into_layer_normalization_are_kept_with_a_warning():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(4, name="hidden"),
            L.LayerNormalization(name="norm"),
            L.Dense(2, name="out"),
        ]
    )
    graph = ChannelGraph(model)
    assert graph.removable_groups() == []
    assert "LayerNormalization" in graph.pinned[graph.layers["hidden"].outputs[0]]
    assign(model.get_layer("hidden"), "kernel", np.zeros((3, 4)))
    with pytest.warns(UserWarning, match=r"4 of 'hidden' \(.*LayerNormalization"):
        small = kp.shrink(model)
    assert small.get_layer("hidden").units == 4


def test_dead_filter_into_same_padding_is_kept_unless_its_constant_is_zero():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            L.Conv2D(3, 3, padding="same", activation="relu", name="conv1"),
            L.Conv2D(2, 3, padding="same", name="conv2"),
            L.GlobalAveragePooling2D(),
        ]
    )
    kernel = to_numpy(model.get_layer("conv1").kernel)
    kernel[..., 1:] = 0  # filters 1 and 2 are dead
    assign(model.get_layer("conv1"), "kernel", kernel)
    assign(model.get_layer("conv1"), "bias", [0.0, -1.0, 0.5])  # relu: 0 and 0.5
    with pytest.warns(
        UserWarning, match=r"1 of 'conv1' \(dead with constant output 0.5"
    ):
        small = kp.shrink(model)
    assert small.get_layer("conv1").filters == 2
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 1)).astype("float32")
    assert max_difference(model, small, x) <= 1e-5


def test_subclassed_models_and_non_models_are_refused():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="subclassed.*Received: model of type Net"):
        kp.shrink(net)
    with pytest.raises(TypeError, match="Received: model="):
        kp.shrink("model.keras")


def test_input_model_is_untouched_and_the_result_is_stock_and_saves(tmp_path):
    masked = kp.make_prunable(residual_block())
    prune_groups(masked, 0.5)
    before = [to_numpy(w) for w in masked.weights]
    small = shrink_quietly(masked)
    assert all(
        np.array_equal(a, to_numpy(b))
        for a, b in zip(before, masked.weights, strict=True)
    )
    assert not kp.masked_layers(small)
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 2)).astype("float32")
    assert max_difference(small, loaded, x) == 0.0


# --- real networks: exact within float32 round-off ---------------------------


def seed_network():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            L.Conv2D(32, 5, padding="same", activation="relu", name="conv1"),
            L.MaxPooling2D(),
            L.Conv2D(64, 5, padding="same", activation="relu", name="conv2"),
            L.MaxPooling2D(),
            L.Flatten(),
            L.Dense(1024, activation="relu", name="fc1"),
            L.Dropout(0.5),
            L.Dense(10, name="fc2"),
        ]
    )


slow_on_jax = pytest.mark.skipif(
    BACKEND == "jax",
    reason="45 s each on JAX (compiling every layer); the TensorFlow and "
    "PyTorch suites run it",
)


@pytest.mark.parametrize(
    "build, shape",
    [
        (seed_network, (28, 28, 1)),
        pytest.param(
            lambda: keras.applications.MobileNetV2(
                input_shape=(96, 96, 3), weights=None, classes=10
            ),
            (96, 96, 3),
            marks=slow_on_jax,
        ),
        pytest.param(
            lambda: keras.applications.ResNet50(
                input_shape=(64, 64, 3), weights=None, classes=10
            ),
            (64, 64, 3),
            marks=slow_on_jax,
        ),
    ],
    ids=["seed", "mobilenetv2", "resnet50"],
)
def test_random_unit_masks_on_real_networks_shrink_exactly(build, shape):
    model = build()
    randomize_statistics(model)
    masked = kp.make_prunable(model)
    removed = prune_groups(masked, 0.3, seed=1)
    small = shrink_quietly(masked)
    assert small.count_params() < 0.8 * model.count_params()
    assert removed > 0
    x = np.random.default_rng(0).normal(size=(4, *shape)).astype("float32")
    assert max_difference(masked, small, x) <= 1e-4


def test_dead_neurons_of_unstructured_pruning_fold_exactly():
    model = keras.Sequential(
        [
            keras.Input((20,)),
            L.Dense(64, activation="relu", name="fc1"),
            L.Dense(32, activation="tanh", name="fc2"),
            L.Dense(5, name="out"),
        ]
    )
    rng = np.random.default_rng(0)
    for layer in model.layers:
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    masked = kp.make_prunable(model)
    for layer in kp.masked_layers(masked):
        layer.prune_to((rng.random(tuple(layer.kernel.shape)) < 0.05).astype("float32"))
    dead = sum(
        int(np.sum(~to_numpy(layer.masks["kernel"]).any(axis=0)))
        for layer in kp.masked_layers(masked)[:2]
    )
    assert dead > 10
    small = shrink_quietly(masked)
    assert small.get_layer("fc1").units + small.get_layer("fc2").units <= 96 - dead
    x = rng.normal(size=(16, 20)).astype("float32")
    assert max_difference(masked, small, x) <= 1e-4


def test_shrink_summary_counts_units_parameters_and_flops():
    model = seed_network()
    masked = kp.make_prunable(model)
    graph = ChannelGraph(masked)
    # Half of conv2's filters, wholly (their rows in fc1 too).
    conv2 = graph.layers["conv2"].outputs
    for name, masks in graph.masks_without(conv2[:32]).items():
        masked.get_layer(name).prune_to(masks)
    summary = kp.shrink_summary(masked, shrink_quietly(masked))
    # Multiply-adds: conv1 28*28*32*25, conv2 14*14*64*800, fc1 3136*1024, fc2 10240.
    assert summary.flops_before == 2 * (627_200 + 10_035_200 + 3_211_264 + 10_240)
    assert summary["conv2"].units_before == 64 and summary["conv2"].units_after == 32
    assert summary["conv2"].flops_after == summary["conv2"].flops_before // 2
    assert summary["fc1"].params_after == 1568 * 1024 + 1024
    assert summary.params_before == model.count_params()
    assert "conv2" in str(summary) and "conv1" not in str(summary)


def test_a_nested_backbone_is_walked_through_and_shrunk():
    backbone = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            L.Conv2D(8, 3, padding="same", name="inner_conv"),
            L.BatchNormalization(name="inner_bn"),
            L.ReLU(),
        ],
        name="backbone",
    )
    randomize_statistics(backbone)
    inputs = keras.Input((6, 6, 2))
    x = L.GlobalAveragePooling2D()(backbone(inputs))
    model = keras.Model(inputs, L.Dense(3, name="head")(x))
    masked = kp.make_prunable(model)
    graph = ChannelGraph(masked)
    assert [names for names, _ in graph.unit_sets()] == [["inner_conv"]]
    assert kp.prune_units(masked, 0.5) == 4
    small = shrink_quietly(masked)
    inner = small.get_layer("backbone")
    assert inner.get_layer("inner_conv").filters == 4
    assert inner.get_layer("inner_bn").gamma.shape[0] == 4
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 2)).astype("float32")
    assert max_difference(masked, small, x) <= 1e-5
    summary = kp.shrink_summary(masked, small)
    # 6*6*8 outputs of 3*3*2 multiply-adds, then half the filters.
    assert summary["inner_conv"].flops_before == 2 * 6 * 6 * 8 * 18
    assert summary["inner_conv"].flops_after == summary["inner_conv"].flops_before // 2


# --- found by a newcomer's trial -----------------------------------------------


def test_a_nested_model_fed_by_a_layer_keeps_its_input_and_shrinks_inside():
    # The inner model's names repeat the outer ones: both stay distinct.
    inner = keras.Sequential(
        [
            keras.Input((8,)),
            L.Dense(6, activation="relu", name="h"),
            L.Dense(4, name="out"),
        ],
        name="inner",
    )
    inputs = keras.Input((6,))
    hidden = L.Dense(8, activation="relu", name="h")(inputs)
    model = keras.Model(inputs, L.Dense(2, name="out")(inner(hidden)))
    masked = kp.make_prunable(model)
    graph = ChannelGraph(masked)
    assert sorted(graph.layers) == ["h", "inner/h", "inner/out", "out"]
    assert "input of nested model 'inner'" in graph.pinned[graph.layers["h"].outputs[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kp.prune_units(masked, 0.5)
    small = shrink_quietly(masked)
    assert small.get_layer("h").units == 8  # what enters the nested model stays
    assert small.get_layer("inner").get_layer("h").units == 3
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    assert max_difference(masked, small, x) <= 1e-5


def test_keras_ops_in_the_graph_are_kept_and_copied():
    inputs = keras.Input((6,))
    hidden = keras.ops.relu(L.Dense(8, name="h")(inputs)) * 2.0
    model = keras.Model(inputs, L.Dense(2, name="out")(L.Dense(5, name="mid")(hidden)))
    model.get_layer("out").kernel.assign(np.zeros((5, 2)) + [[1.0], [0], [1], [0], [0]])
    small = shrink_quietly(model)
    assert small.get_layer("mid").units == 2 and small.get_layer("h").units == 8
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    assert max_difference(model, small, x) <= 1e-5


def test_a_reshape_that_keeps_the_channel_axis_follows_the_channels():
    inputs = keras.Input((4, 4, 3))
    x = L.Conv2D(8, 1, name="conv")(inputs)
    x = L.Reshape((16, 8), name="reshape")(x)
    model = keras.Model(inputs, L.Dense(5, name="out")(x))
    kernel = to_numpy(model.get_layer("out").kernel)
    kernel[:2] = 0  # channels 0 and 1 feed nothing
    model.get_layer("out").kernel.assign(kernel)
    small = shrink_quietly(model)
    assert small.get_layer("conv").filters == 6
    assert tuple(small.get_layer("reshape").target_shape) == (16, 6)
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype("float32")
    assert max_difference(model, small, x) <= 1e-5


def test_dict_inputs_take_a_dict_sample():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    x = L.Concatenate()([L.Dense(4, name="da")(a), L.Dense(4, name="db")(b)])
    model = keras.Model({"a": a, "b": b}, L.Dense(1, name="out")(x))
    model.get_layer("out").kernel.assign(np.array([[1.0], [0], [1], [0]] * 2))
    sample = {"a": np.ones((2, 3), "float32"), "b": np.ones((2, 2), "float32")}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "The structure of")  # Keras's
        small = kp.shrink(model, sample=sample)
    assert small.get_layer("da").units == 2 == small.get_layer("db").units


def test_prune_units_needs_masks_and_names_what_it_keeps():
    model = keras.Sequential(
        [keras.Input((4,)), L.Dense(6, name="hidden"), L.Dense(2, name="out")]
    )
    with pytest.raises(ValueError, match=r"make_prunable\(model\) first"):
        kp.prune_units(model, 0.5)
    masked = kp.make_prunable(model)
    with pytest.warns(UserWarning, match=r"keeps every unit of 'out' \(model output\)"):
        assert kp.prune_units(masked, 0.5) == 3
