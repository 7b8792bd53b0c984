"""`keras_prune.storage`: compact encodings of sparse tensors round-trip
exactly and are never larger than the dense array."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_prune import storage


def _nbytes(parts):
    return sum(np.asarray(part).nbytes for part in parts.values())


def test_hand_checked_encodings():
    kernel = np.zeros((4, 4), dtype="float32")
    kernel[0, 1] = 2.0
    kernel[3, 3] = -1.0
    parts = storage.encode_nonzeros(
        kernel[kernel != 0], np.flatnonzero(kernel), kernel.shape
    )
    # 16 weights: two 1-byte gaps tie with a 2-byte bitmask; ties go to gaps.
    assert parts["gaps"].tolist() == [1, 14]
    assert parts["gaps"].dtype == np.uint8
    assert parts["values"].tolist() == [2.0, -1.0]
    np.testing.assert_array_equal(storage.decode(parts), kernel)

    dense = np.arange(1, 7, dtype="float32").reshape(2, 3)
    assert set(storage.encode(dense)) == {"dense"}
    np.testing.assert_array_equal(storage.decode(storage.encode(dense)), dense)

    half = np.zeros(64, dtype="float32")
    half[::2] = 1.0  # 32 nonzeros: 8-byte bitmask beats 32 gap bytes
    parts = storage.encode(half)
    assert parts["bitmask"].tolist() == [0b10101010] * 8
    np.testing.assert_array_equal(storage.decode(parts), half)


@pytest.mark.parametrize("density, most", [(0.10, 0.14), (0.0023, 0.016), (0.01, 0.03)])
def test_float32_sizes_follow_the_kept_fraction(density, most):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3136, 1024)).astype("float32")
    kernel[rng.random(kernel.shape) >= density] = 0.0
    parts = storage.encode(kernel)
    assert _nbytes(parts) <= most * kernel.nbytes
    np.testing.assert_array_equal(storage.decode(parts), kernel)


def test_explicit_zeros_are_kept_by_encode_nonzeros():
    parts = storage.encode_nonzeros(np.array([0.0, 3.0]), np.array([2, 5]), (3, 3))
    values, positions, shape = storage.decode_nonzeros(parts)
    assert values.tolist() == [0.0, 3.0]
    assert positions.tolist() == [2, 5]
    assert shape == (3, 3)


def test_wide_gaps_use_wider_integers():
    parts = storage.encode_nonzeros(np.ones(2), np.array([0, 70_000]), (1, 10**6))
    assert parts["gaps"].dtype == np.uint32
    assert storage.decode_nonzeros(parts)[1].tolist() == [0, 70_000]


@pytest.mark.parametrize("positions", [[3, 3], [5, 2], [0, 9], [-1]])
def test_bad_positions_are_named(positions):
    with pytest.raises(ValueError, match="positions"):
        storage.encode_nonzeros(np.ones(len(positions)), np.array(positions), (3, 3))


def test_mismatched_lengths_and_unknown_parts_are_refused():
    with pytest.raises(ValueError, match="same length"):
        storage.encode_nonzeros(np.ones(3), np.array([0, 1]), (3,))
    with pytest.raises(ValueError, match="Received: \\['shape', 'values'\\]"):
        storage.decode({"shape": np.array([2]), "values": np.ones(1)})
    with pytest.raises(ValueError, match="positions beyond"):
        storage.decode(
            {"shape": np.array([2]), "values": np.ones(1), "gaps": np.array([7])}
        )


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from(["float32", "float16", "float64", "int8"]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=9),
        elements=st.sampled_from([0, 0, 0, 0, 1, -2, 3]),
    )
)
def test_any_tensor_round_trips_and_is_never_larger(array):
    parts = storage.encode(array)
    decoded = storage.decode(parts)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    assert _nbytes(parts) <= array.nbytes
