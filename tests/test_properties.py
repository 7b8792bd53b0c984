"""Property-based tests: what must hold for every shape, mask, schedule and
target order, not only for the hand-picked fixtures of the other test files.

1. `export_sparse` predicts what the masked model predicts, on every compute
   path, for any kernel shape, mask (empty, one weight, random with empty
   rows and columns, full), batch size and input rank (TensorFlow only).
2. Masks only ever lose weights, and each cut keeps the count it targets:
   the pure ranking functions, `IterativePruningCallback.prune_layer` and
   the callback under every schedule class and under targets in any order.
3. A `.keras` round trip is the identity on masks, weights and outputs.

Hypothesis is derandomized and keeps no example database, so every run (and
CI) tries the same examples; the example counts keep the file fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import keras_prune as kp
from keras_prune.masks import pruned_count
from tests.backend_utils import BACKEND, tensorflow_only, to_numpy

if BACKEND == "tensorflow":
    # tests.kernels imports keras_prune.inference, which needs TensorFlow.
    from tests.kernels import compute_paths

    EXPORT_PATHS = compute_paths("auto", "dense", "native", "coo", "csr")
else:
    EXPORT_PATHS = ["auto", "dense", "native", "coo", "csr"]  # tensorflow_only

PROPERTY = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Unit round-off of float32.
FLOAT32_EPS = 2.0**-24


def gamma(n: int) -> float:
    """Higham's bound on the relative error of an n-term float32 sum of
    products: |fl(x . w) - x . w| <= gamma(n) * (|x| . |w|), whatever the
    order of the additions (and with or without fused multiply-adds)."""
    return n * FLOAT32_EPS / (1.0 - n * FLOAT32_EPS)


def random_mask(rng, shape, density, fraction=0.5):
    """A 0/1 float32 mask: `"empty"`, `"one"` (a single random weight),
    `"fraction"` (each weight kept with probability `fraction`) or `"full"`."""
    if density == "empty":
        return np.zeros(shape, "float32")
    if density == "full":
        return np.ones(shape, "float32")
    if density == "one":
        mask = np.zeros(shape, "float32")
        mask.reshape(-1)[rng.integers(mask.size)] = 1
        return mask
    return (rng.random(shape) < fraction).astype("float32")


DENSITIES = ("empty", "one", "fraction", "full")


# --- 1. export_sparse predicts what the masked model predicts ---------------


@dataclasses.dataclass(frozen=True)
class ExportCase:
    input_dim: int
    units: int
    density: str
    fraction: float
    one_at: tuple[int, int]
    empty_rows: tuple[int, ...]
    empty_columns: tuple[int, ...]
    batch: int
    time_steps: int | None  # None: rank-2 inputs, else (batch, time, features)
    activation: str | None
    seed: int
    predict_batch: int | None = None  # predict's batch_size; None: `batch`

    def arrays(self):
        """`(kernel, bias, mask, inputs)` as float32 numpy arrays."""
        rng = np.random.default_rng(self.seed)
        shape = (self.input_dim, self.units)
        kernel = rng.normal(size=shape).astype("float32")
        bias = rng.normal(size=self.units).astype("float32")
        if self.density == "one":
            mask = np.zeros(shape, "float32")
            mask[self.one_at] = 1
        else:
            mask = random_mask(rng, shape, self.density, self.fraction)
            if self.density == "fraction":
                mask[list(self.empty_rows), :] = 0
                mask[:, list(self.empty_columns)] = 0
        lead = (
            (self.batch,) if self.time_steps is None else (self.batch, self.time_steps)
        )
        inputs = rng.normal(size=(*lead, self.input_dim)).astype("float32")
        return kernel, bias, mask, inputs


@st.composite
def export_cases(draw):
    input_dim = draw(st.integers(1, 300))
    units = draw(st.integers(1, 300))
    density = draw(st.sampled_from(DENSITIES))

    def indices(size):
        # Random rows (columns) and, half the time, the last one.
        chosen = set(draw(st.sets(st.integers(0, size - 1), max_size=4)))
        if draw(st.booleans()):
            chosen.add(size - 1)
        return tuple(sorted(chosen))

    def last_or_any(size):
        return st.one_of(st.just(size - 1), st.integers(0, size - 1))

    # The sparse kernels switch strategy at 4 rows (COO one row at a time)
    # and 128 (CSR in two halves).
    batch = draw(st.one_of(st.sampled_from([1, 4, 5, 128, 130]), st.integers(1, 130)))
    return ExportCase(
        input_dim=input_dim,
        units=units,
        density=density,
        fraction=draw(st.floats(0.0, 1.0)),
        one_at=(draw(last_or_any(input_dim)), draw(last_or_any(units))),
        empty_rows=indices(input_dim),
        empty_columns=indices(units),
        batch=batch,
        time_steps=draw(st.one_of(st.none(), st.integers(1, 4))),
        activation=draw(st.sampled_from([None, "relu"])),
        seed=draw(st.integers(0, 2**32 - 1)),
        # Smaller predict batches leave a partial last batch (Keras's
        # default is 32).
        predict_batch=draw(st.one_of(st.none(), st.integers(1, batch))),
    )


@tensorflow_only
@pytest.mark.parametrize("compute", EXPORT_PATHS)
@settings(PROPERTY, max_examples=16)
@given(case=export_cases())
# The corners every path must get right, tried on each run whatever is drawn.
@example(
    case=ExportCase(
        300, 300, "fraction", 0.1, (0, 0), (5, 299), (7, 299), 130, None, None, 0
    )
)
@example(case=ExportCase(1, 1, "empty", 0.0, (0, 0), (), (), 1, None, None, 1))
@example(case=ExportCase(7, 3, "one", 0.0, (6, 2), (), (), 5, 3, "relu", 2))
@example(
    case=ExportCase(9, 300, "fraction", 0.5, (0, 0), (8,), (0, 299), 128, 2, None, 3)
)
@example(  # large and sparse enough for "auto" to pick SparseDense
    case=ExportCase(
        400, 300, "fraction", 0.02, (0, 0), (399,), (299,), 130, None, "relu", 4, 32
    )
)
def test_exported_model_predicts_what_the_masked_model_predicts(compute, case):
    from keras_prune.inference import sparse_ops

    kernel, bias, mask, inputs = case.arrays()
    model = keras.Sequential(
        [
            keras.Input(inputs.shape[1:]),
            kp.MaskedDense(case.units, activation=case.activation),
        ]
    )
    layer = model.layers[0]
    layer.prunable_weights["kernel"].assign(kernel)
    layer.bias.assign(bias)
    layer.prune_to(mask)
    masked_kernel = kernel * mask

    exported = kp.export_sparse(model, compute=compute)
    new = exported.layers[0]
    goes_sparse = compute in ("native", "coo", "csr") or (
        compute == "auto"
        and sparse_ops.pays_off(np.count_nonzero(mask) / mask.size, mask.size)
    )
    if mask.all():  # nothing pruned: the stock layer
        assert type(new) is keras.layers.Dense
        np.testing.assert_array_equal(to_numpy(new.kernel), masked_kernel)
    else:
        assert type(new) is kp.SparseDense
        assert new.compute == compute
        assert (new.compute_path(case.batch) != "dense") == goes_sparse
        assert new.nnz == np.count_nonzero(mask)
        np.testing.assert_array_equal(new.dense_kernel(), masked_kernel)
    np.testing.assert_array_equal(to_numpy(new.bias), bias)

    batch_size = case.predict_batch or case.batch
    expected = model.predict(inputs, batch_size=batch_size, verbose=0)
    got = exported.predict(inputs, batch_size=batch_size, verbose=0)
    assert got.shape == expected.shape == (*inputs.shape[:-1], case.units)
    # Both are float32 sums of the same input_dim products plus the bias, in
    # different orders: each is within gamma(input_dim + 1) * (|x| @ |W| + |b|)
    # of the exact value (relu is 1-Lipschitz and exact), so they differ by
    # at most twice that. A dropped, duplicated or misplaced weight or bias
    # moves an output by a whole |x_i * w_ij|, far above this bound.
    scale = np.abs(inputs.astype("float64")) @ np.abs(masked_kernel.astype("float64"))
    bound = 2 * gamma(case.input_dim + 1) * (scale + np.abs(bias))
    excess = np.abs(got.astype("float64") - expected) - bound
    worst = float(excess.max())
    where = np.unravel_index(excess.argmax(), excess.shape)
    assert worst <= 0, f"error over the float32 bound by {worst} at {where}"


# --- 2. masks only lose weights, and each cut keeps what it targets ---------

sparsities = st.floats(0.0, 1.0, exclude_max=True)


def random_weights(rng, shape, ties):
    """Normal weights, or small integers (many ties and exact zeros)."""
    if ties:
        return rng.integers(-3, 4, size=shape).astype("float32")
    return rng.normal(size=shape).astype("float32")


shapes = st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple)


@settings(PROPERTY, max_examples=100)
@given(
    shape=shapes,
    targets=st.lists(sparsities, min_size=1, max_size=6),
    ties=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_magnitude_mask_prunes_the_smallest_survivors_and_never_revives(
    shape, targets, ties, seed
):
    rng = np.random.default_rng(seed)
    size = math.prod(shape)
    mask = None
    for target in targets:  # in any order: a lower target must not revive
        # Between cuts training moves every raw weight, pruned ones too.
        weights = random_weights(rng, shape, ties)
        old = np.ones(shape, "float32") if mask is None else mask
        mask = kp.magnitude_mask(weights, mask, target)
        assert mask.shape == shape and mask.dtype == weights.dtype
        assert np.isin(mask, (0, 1)).all()
        assert (mask <= old).all(), "a pruned weight came back"
        zeros_before = size - np.count_nonzero(old)
        assert size - np.count_nonzero(mask) == max(
            zeros_before, pruned_count(target, size)
        )
        assert np.count_nonzero(mask) >= 1
        newly_pruned = np.abs(weights[(old != 0) & (mask == 0)])
        kept = np.abs(weights[mask != 0])
        if newly_pruned.size:
            assert newly_pruned.max() <= kept.min()


@st.composite
def global_cases(draw):
    count = draw(st.integers(1, 3))
    bounded = draw(st.booleans())
    return {
        "shapes": [draw(shapes) for _ in range(count)],
        "targets": draw(st.lists(sparsities, min_size=1, max_size=5)),
        "min_kept": [draw(st.floats(0, 1)) for _ in range(count)] if bounded else None,
        "ties": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(PROPERTY, max_examples=100)
@given(case=global_cases())
def test_global_masks_never_revive_and_prune_the_total_they_target(case):
    rng = np.random.default_rng(case["seed"])
    shapes_, min_kept = case["shapes"], case["min_kept"]
    sizes = [math.prod(shape) for shape in shapes_]
    masks = [np.ones(shape, "float32") for shape in shapes_]
    for target in case["targets"]:
        weights = [random_weights(rng, shape, case["ties"]) for shape in shapes_]
        new = kp.global_magnitude_masks(weights, masks, target, min_kept=min_kept)
        alive_before = [int(np.count_nonzero(m)) for m in masks]
        alive = [int(np.count_nonzero(m)) for m in new]
        for old, mask, kept in zip(masks, new, alive, strict=True):
            assert np.isin(mask, (0, 1)).all()
            assert (mask <= old).all(), "a pruned weight came back"
            assert kept >= 1
        if min_kept is None:
            # The whole target, unless earlier cuts went past it or it
            # would leave a tensor empty.
            zeros_before = sum(sizes) - sum(alive_before)
            most = sum(size - 1 for size in sizes)
            wanted = round(target * sum(sizes))
            assert sum(sizes) - sum(alive) == min(max(wanted, zeros_before), most)
            # One threshold for all: what went is no larger than what stays,
            # but for the largest weight of each tensor, which always stays.
            newly_pruned = np.concatenate(
                [
                    np.abs(w[(o != 0) & (m == 0)])
                    for w, o, m in zip(weights, masks, new, strict=True)
                ]
            )
            free_survivors = np.concatenate(
                [
                    np.sort(np.abs(w[m != 0]))[:-1]
                    for w, m in zip(weights, new, strict=True)
                ]
            )
            if newly_pruned.size and free_survivors.size:
                assert newly_pruned.max() <= free_survivors.min()
        else:
            for floor, size, kept_before, kept in zip(
                min_kept, sizes, alive_before, alive, strict=True
            ):
                least = max(1, math.ceil(floor * size - 1e-9))
                assert kept >= min(kept_before, least)
        masks = new


masked_layer_kinds = st.sampled_from(["dense", "simple_rnn"])


@settings(PROPERTY, max_examples=25)
@given(
    kind=masked_layer_kinds,
    features=st.integers(1, 6),
    units=st.integers(1, 6),
    targets=st.lists(sparsities, min_size=1, max_size=5),
    ties=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_prune_layer_never_revives_whatever_the_order_of_targets(
    kind, features, units, targets, ties, seed
):
    rng = np.random.default_rng(seed)
    if kind == "dense":
        layer = kp.MaskedDense(units)
        layer(np.ones((1, features), "float32"))
    else:
        layer = kp.masked_class(keras.layers.SimpleRNN)(units)
        layer(np.ones((1, 2, features), "float32"))
    highest = 0.0
    for target in targets:
        before = {key: to_numpy(mask) for key, mask in layer.masks.items()}
        # Training moved the live weights (pruned ones get no gradient).
        for key, variable in layer.prunable_weights.items():
            moved = random_weights(rng, tuple(variable.shape), ties)
            variable.assign(moved * before[key])
        kp.IterativePruningCallback.prune_layer(layer, target)
        highest = max(highest, target)
        for key, mask in layer.masks.items():
            mask = to_numpy(mask)
            assert (mask <= before[key]).all(), f"{key}: a pruned weight came back"
            assert mask.size - np.count_nonzero(mask) == pruned_count(
                highest, mask.size
            )
            raw = to_numpy(layer.prunable_weights[key])
            assert not raw[mask == 0].any(), f"{key}: a pruned raw weight is nonzero"


class ReplaySchedule(kp.PruningSchedule):
    """Targets in any order, one per epoch: it breaks the schedules' promise
    never to decrease, which the callback must survive without reviving."""

    def __init__(self, targets):
        self.targets = list(targets)

    def __call__(self, step):
        return self.targets[min(step, len(self.targets) - 1)]

    def get_config(self):
        return {"targets": self.targets}


SCHEDULE_KINDS = ("polynomial", "geometric", "constant", "list")


@st.composite
def schedules(draw, kinds=(*SCHEDULE_KINDS, "replay")):
    final = draw(sparsities)
    begin = draw(st.integers(0, 3))
    kind = draw(st.sampled_from(kinds))
    if kind == "polynomial":
        return kp.PolynomialSchedule(
            final,
            begin_step=begin,
            end_step=begin + draw(st.integers(0, 4)),
            initial_sparsity=draw(st.floats(0.0, final)),
            power=draw(st.sampled_from([1, 2, 3, 0.5])),
            frequency=draw(st.integers(1, 3)),
        )
    if kind == "geometric":
        return kp.GeometricSchedule(
            final,
            begin_step=begin,
            end_step=draw(st.one_of(st.none(), st.integers(begin, begin + 4))),
            factor=draw(st.floats(0.05, 0.95)),
            frequency=draw(st.integers(1, 3)),
        )
    if kind == "constant":
        return kp.ConstantSchedule(final, begin_step=begin)
    if kind == "list":
        values = sorted(draw(st.lists(sparsities, min_size=1, max_size=4)))
        return kp.ListSchedule(
            values, begin_step=begin, frequency=draw(st.integers(1, 3))
        )
    return ReplaySchedule(draw(st.lists(sparsities, min_size=1, max_size=6)))


def final_and_end(schedule):
    """`(final sparsity, first step that must reach it or None)`."""
    if isinstance(schedule, kp.ListSchedule):
        cuts = len(schedule.sparsities)
        end = schedule.begin_step + (cuts - 1) * schedule.frequency
        return schedule.sparsities[-1], end
    if isinstance(schedule, kp.ConstantSchedule):
        return schedule.final_sparsity, schedule.begin_step
    return schedule.final_sparsity, schedule.end_step


@settings(PROPERTY, max_examples=100)
@given(schedule=schedules(kinds=SCHEDULE_KINDS))
def test_schedules_never_lower_the_target_and_end_on_their_final_sparsity(schedule):
    values = [schedule(step) for step in range(30)]
    assert values == sorted(values), "the target went down"
    final, end = final_and_end(schedule)
    assert all(0.0 <= value <= final for value in values)
    assert values[: schedule.begin_step] == [0.0] * schedule.begin_step
    if end is not None:
        assert values[end:] == [final] * (30 - end)
    # The config round trip gives the same schedule.
    assert type(schedule).from_config(schedule.get_config()) == schedule


def small_masked_model(filters, units):
    """A masked Conv1D and a MaskedDense: two prunable kernels."""
    return keras.Sequential(
        [
            keras.Input((6, 3)),
            kp.masked_class(keras.layers.Conv1D)(filters, 3, name="conv"),
            keras.layers.Flatten(),
            kp.MaskedDense(units, name="fc"),
        ]
    )


@pytest.mark.filterwarnings("ignore:A sparsity of .* would prune all")
@pytest.mark.filterwarnings('ignore:scope="global" left')
@pytest.mark.filterwarnings("ignore:Something restored an older mask")
@settings(PROPERTY, max_examples=25)
@given(
    schedule=schedules(),
    scope=st.sampled_from(["layer", "global"]),
    epochs=st.integers(1, 7),
    filters=st.integers(1, 4),
    units=st.integers(1, 5),
    restore_at=st.sets(st.integers(1, 6), max_size=2),
    ties=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_callback_masks_only_shrink_and_keep_the_scheduled_count(
    schedule, scope, epochs, filters, units, restore_at, ties, seed
):
    rng = np.random.default_rng(seed)
    model = small_masked_model(filters, units)
    entries = [
        (layer, key, layer.prunable_weights[key], mask)
        for layer in kp.masked_layers(model)
        for key, mask in layer.masks.items()
    ]
    sizes = [math.prod(mask.shape) for *_, mask in entries]
    callback = kp.IterativePruningCallback(schedule=schedule, scope=scope)
    callback.set_model(model)
    callback.set_params({"epochs": epochs})
    callback.on_train_begin()
    masks = [np.ones(mask.shape, "float32") for *_, mask in entries]
    highest = 0.0
    for epoch in range(epochs):
        if epoch in restore_at:
            # Something (a checkpoint, EarlyStopping) restores the first
            # masks: the callback must put back those of its last cut.
            for *_, mask in entries:
                mask.assign(np.ones(mask.shape, "float32"))
        callback.on_epoch_begin(epoch)
        highest = max(highest, schedule(epoch))
        new = [to_numpy(mask) for *_, mask in entries]
        for (layer, key, *_), old, mask in zip(entries, masks, new, strict=True):
            assert (mask <= old).all(), f"{layer.name}/{key}: a pruned weight came back"
        zeros = [size - np.count_nonzero(m) for size, m in zip(sizes, new, strict=True)]
        if scope == "layer":
            assert zeros == [pruned_count(highest, size) for size in sizes]
        else:
            most = sum(size - 1 for size in sizes)
            assert sum(zeros) == min(round(highest * sum(sizes)), most)
        masks = new
        # Training moves every raw weight, pruned ones too (an optimizer's
        # momentum, weight decay); the end of the epoch zeroes them again.
        for _, _, variable, _ in entries:
            variable.assign(random_weights(rng, tuple(variable.shape), ties))
        logs = {}
        callback.on_epoch_end(epoch, logs)
        for (layer, _, variable, _), mask, size, zero in zip(
            entries, masks, sizes, zeros, strict=True
        ):
            assert not to_numpy(variable)[mask == 0].any()
            # One prunable kernel per layer: its sparsity is the layer's.
            assert logs[f"sparsity/{layer.name}"] == pytest.approx(zero / size)
    callback.on_train_end()
    for (*_, mask), last in zip(entries, masks, strict=True):
        np.testing.assert_array_equal(to_numpy(mask), last)


# --- 3. a .keras round trip is the identity -----------------------------------


def stock_model(kind, size, channels, filters, units):
    layers = keras.layers
    if kind == "mlp":
        return keras.Sequential(
            [
                keras.Input((size,)),
                layers.Dense(filters, activation="relu"),
                layers.Dense(units),
            ]
        )
    if kind == "conv2d":
        return keras.Sequential(
            [
                keras.Input((size, size, channels)),
                layers.Conv2D(filters, 3, padding="same", activation="relu"),
                layers.BatchNormalization(),
                layers.Flatten(),
                layers.Dense(units),
            ]
        )
    inputs = keras.Input((size + 2, channels))
    x = layers.SeparableConv1D(filters, 3, activation="relu")(inputs)
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, layers.Dense(units)(x))


@settings(PROPERTY, max_examples=15)
@given(
    kind=st.sampled_from(["mlp", "conv2d", "separable_conv1d"]),
    size=st.integers(1, 5),
    channels=st.integers(1, 3),
    filters=st.integers(1, 4),
    units=st.integers(1, 4),
    density=st.sampled_from(DENSITIES),
    fraction=st.floats(0.0, 1.0),
    drift=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_keras_round_trip_keeps_masks_weights_and_outputs(
    kind, size, channels, filters, units, density, fraction, drift, seed
):
    rng = np.random.default_rng(seed)
    model = kp.make_prunable(stock_model(kind, size, channels, filters, units))
    for layer in kp.masked_layers(model):
        layer.prune_to(
            {
                key: random_mask(rng, tuple(mask.shape), density, fraction)
                for key, mask in layer.masks.items()
            }
        )
        if drift:
            # Raw weights written where they are pruned (by anything but the
            # optimizer's masked step) are saved as weight * mask.
            for variable in layer.prunable_weights.values():
                variable.assign(
                    rng.normal(size=tuple(variable.shape)).astype(variable.dtype)
                )
    inputs = rng.normal(size=(3, *model.input_shape[1:])).astype("float32")
    expected = to_numpy(model(inputs))
    before = [to_numpy(w) for w in model.weights]

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)

    # Saving leaves the live model alone.
    for old, weight in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(weight), old)
    originals, copies = kp.masked_layers(model), kp.masked_layers(loaded)
    assert [type(layer) for layer in copies] == [type(layer) for layer in originals]
    assert all(isinstance(layer, kp.MaskedLayer) for layer in copies)
    for original, copy in zip(originals, copies, strict=True):
        assert sorted(copy.masks) == sorted(original.masks)
        for key, mask in original.masks.items():
            mask = to_numpy(mask)
            np.testing.assert_array_equal(to_numpy(copy.masks[key]), mask)
            # The file holds weight * mask: the pruned raw weights load as 0.
            np.testing.assert_array_equal(
                to_numpy(copy.prunable_weights[key]),
                to_numpy(original.prunable_weights[key]) * mask,
            )
    # Every other weight (biases, normalization statistics) is as it was.
    prunable = {id(v) for layer in originals for v in layer.prunable_weights.values()}
    for original, copy in zip(model.weights, loaded.weights, strict=True):
        assert original.path == copy.path
        if id(original) not in prunable:
            np.testing.assert_array_equal(to_numpy(copy), to_numpy(original))
    np.testing.assert_array_equal(to_numpy(loaded(inputs)), expected)
