import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_prune.masks import (
    block_scores,
    expand_blocks,
    global_magnitude_masks,
    magnitude_mask,
    sparsity_of,
    std_threshold_mask,
    validate_granularity,
    validate_sparsity,
)


def test_linspace_half_keeps_exactly_the_fifty_largest():
    weights = np.linspace(-1.0, 1.0, 100)
    mask = magnitude_mask(weights, None, 0.5)
    assert np.count_nonzero(mask) == 50
    assert set(np.unique(mask)) == {0.0, 1.0}
    # The survivors are exactly those with |w| >= the 50th largest magnitude.
    assert np.abs(weights[mask == 1]).min() > np.abs(weights[mask == 0]).max()


def test_only_live_weights_are_ranked_and_pruned_ones_never_return():
    weights = np.array([10.0, 9.0, 1.0, 2.0, 3.0, 4.0])
    current = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # the two largest already cut
    mask = magnitude_mask(weights, current, 0.5)
    # One more cut, and it falls on the smallest live weight (1.0), not on 9 or 10.
    np.testing.assert_array_equal(mask, [0, 0, 0, 1, 1, 1])


def test_target_below_current_sparsity_returns_current_mask():
    current = np.array([0.0, 0.0, 0.0, 1.0])
    mask = magnitude_mask(np.array([5.0, 6.0, 7.0, 0.1]), current, 0.25)
    np.testing.assert_array_equal(mask, current)


def test_extremely_sparse_mask_keeps_the_single_largest():
    weights = np.random.default_rng(0).normal(size=(40, 25))
    mask = magnitude_mask(weights, None, 0.999)
    assert np.count_nonzero(mask) == 1
    assert mask.reshape(-1)[np.argmax(np.abs(weights))] == 1


def test_zero_sparsity_keeps_everything_and_preserves_shape_and_dtype():
    weights = np.ones((3, 4), dtype=np.float32)
    mask = magnitude_mask(weights, None, 0.0)
    assert mask.shape == (3, 4) and mask.dtype == np.float32
    assert mask.all()


def test_mask_shape_mismatch_is_refused():
    with pytest.raises(
        ValueError,
        match=r"^Expected `mask` to have the shape of `weights`, \(2, 2\)\. "
        r"Received: mask.shape=\(4,\)$",
    ):
        magnitude_mask(np.ones((2, 2)), np.ones(4), 0.5)


@pytest.mark.parametrize(
    "value",
    [1.0, 1.5, -0.1, float("nan"), "0.5x", None, True],
    ids=["one", "above", "negative", "nan", "string", "none", "bool"],
)
def test_bad_sparsity_names_argument_and_value(value):
    with pytest.raises(
        ValueError,
        match=r"^Expected `final_sparsity` in \[0, 1\)\. Received: final_sparsity="
        + repr(value).replace("(", r"\(").replace(")", r"\)")
        + "$",
    ):
        validate_sparsity(value, "final_sparsity")


def test_sparsity_of_counts_zeros():
    assert sparsity_of(np.array([[1, 0], [0, 0]])) == 0.75
    assert sparsity_of(np.array([])) == 0.0


# --- blocks ---------------------------------------------------------------


def test_blocks_of_four_inputs_are_ranked_by_mean_magnitude():
    # 8 inputs x 2 units; block (1, 4): four blocks, means 1, 2 | 10, 0.5.
    kernel = np.array(
        [[1, 10], [1, 10], [1, 10], [1, 10], [2, 0.5], [2, 0.5], [2, 0.5], [2, 0.5]],
        dtype="float32",
    )
    mask = magnitude_mask(kernel, None, 0.5, block=(1, 4))
    np.testing.assert_array_equal(mask[:, 0], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(mask[:, 1], [1, 1, 1, 1, 0, 0, 0, 0])
    assert mask.dtype == np.float32


def test_blocks_rank_only_live_weights_and_never_revive():
    kernel = np.array([[5.0], [5.0], [0.1], [0.2], [0.3], [0.4]])
    current = np.array([[0.0], [0.0], [1], [1], [1], [1]])  # 5s pruned before
    # Blocks of 2: (5, 5) dead, (0.1, 0.2) mean 0.15, (0.3, 0.4) mean 0.35.
    mask = magnitude_mask(kernel, current, 2 / 3, block=(1, 2))
    np.testing.assert_array_equal(mask.ravel(), [0, 0, 0, 0, 1, 1])
    # A block with one live weight keeps only that weight alive.
    partial = np.array([[1.0], [0.0], [1], [1], [1], [1]])
    mask = magnitude_mask(kernel, partial, 1 / 3, block=(1, 2))
    np.testing.assert_array_equal(mask.ravel(), [1, 0, 0, 0, 1, 1])


def test_edge_blocks_are_partial_and_conv_kernels_block_input_channels():
    # 6 inputs with blocks of 4: one block of 4 and one of 2.
    scores, live = block_scores(np.arange(6.0).reshape(6, 1), np.ones((6, 1)), (1, 4))
    np.testing.assert_array_equal(scores.ravel(), [1.5, 4.5])
    # A 3x3 convolution, 8 input channels, 2 filters: blocks of 4 channels.
    kernel = np.random.default_rng(0).normal(size=(3, 3, 8, 2))
    mask = magnitude_mask(kernel, None, 0.75, block=(1, 4))
    grouped = mask.reshape(3, 3, 2, 4, 2)
    assert np.all(grouped.min(axis=3) == grouped.max(axis=3))  # whole blocks
    assert np.count_nonzero(mask) == 9 * 2 * 2 // 4 * 4


def test_global_ranking_of_blocks_across_tensors():
    small = np.full((4, 2), 0.1)
    large = np.full((4, 2), 1.0)
    large[:2, 0] = 0.05  # one block of `large` is the smallest of all
    masks = global_magnitude_masks([small, large], [None, None], 0.5, block=(1, 2))
    kept = [int(np.count_nonzero(m)) for m in masks]
    assert kept == [2, 6]  # small keeps one block of 2 (never emptied)
    assert masks[1][0, 0] == 0 and masks[1][:, 1].all()


@pytest.mark.parametrize("value", ["block", (0, 4), (1,), (1.5, 4), (True, 4), 4, None])
def test_bad_granularity_is_named(value):
    with pytest.raises(
        ValueError,
        match=r'^Expected `granularity` to be "weight" or \(units, inputs\), two '
        r"positive integers such as \(1, 4\) \(or \"unit\", for the callback\)\. "
        r"Received: granularity=",
    ):
        validate_granularity(value)


@settings(max_examples=40, derandomize=True, database=None, deadline=None)
@given(
    rows=st.integers(1, 13),
    cols=st.integers(1, 5),
    block=st.tuples(st.integers(1, 3), st.integers(1, 5)),
    sparsities=st.lists(st.floats(0.0, 0.99), min_size=1, max_size=4),
)
def test_block_masks_are_whole_blocks_and_only_lose_weights(
    rows, cols, block, sparsities
):
    weights = np.random.default_rng(rows * 10 + cols).normal(size=(rows, cols))
    mask = np.ones((rows, cols))
    for sparsity in sorted(sparsities):
        new = magnitude_mask(weights, mask, sparsity, block=block)
        assert np.all(new <= mask) and new.any()
        _, live = block_scores(new, new, block)
        # Starting from a full mask, each block is all kept or all pruned.
        np.testing.assert_array_equal(expand_blocks(live, block, new.shape), new)
        mask = new


def test_std_threshold_prunes_below_quality_standard_deviations_of_live_weights():
    # Live weights 2, -2, 1, -1 and two pruned ones: their std is sqrt(10/4).
    weights = np.array([2.0, -2.0, 1.0, -1.0, 5.0, 0.1])
    mask = np.array([1, 1, 1, 1, 0, 0], "float64")
    new, threshold = std_threshold_mask(weights, mask, 0.8)
    assert threshold == pytest.approx(0.8 * np.sqrt(2.5))  # 1.265
    np.testing.assert_array_equal(new, [1, 1, 0, 0, 0, 0])  # 5.0 stays pruned
    # Quality 0 prunes nothing; a huge quality keeps the largest live weight.
    np.testing.assert_array_equal(std_threshold_mask(weights, mask, 0)[0], mask)
    np.testing.assert_array_equal(
        std_threshold_mask(weights, mask, 100)[0], [1, 0, 0, 0, 0, 0]
    )


@pytest.mark.parametrize("quality", [-0.5, float("nan"), float("inf"), "1", True])
def test_std_threshold_refuses_a_bad_quality(quality):
    with pytest.raises(ValueError, match=r"Expected `quality` to be a finite number"):
        std_threshold_mask(np.ones(3), None, quality)
