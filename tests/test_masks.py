import numpy as np
import pytest

from keras_prune.masks import magnitude_mask, sparsity_of, validate_sparsity


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
