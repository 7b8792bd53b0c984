import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from keras_prune.inference import native
from keras_prune.inference.sparse_dense import coo_from_kernel
from tests.kernels import needs_native as needs_kernel


def coo(kernel):
    values, indices = coo_from_kernel(np.asarray(kernel, "float32"))
    return tf.constant(values), tf.constant(indices)


def test_kernel_builds_where_a_compiler_exists():
    # CI has one: a broken build must fail here, not fall back quietly.
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    if os.environ.get("KERAS_PRUNE_NATIVE") == "0":
        pytest.skip("the native kernel is turned off (KERAS_PRUNE_NATIVE=0)")
    assert native.available()
    assert native.library_path().exists()
    assert native.library_path().parent == native.cache_dir()


def test_cache_defaults_to_the_user_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("KERAS_PRUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.cache_dir() == tmp_path / "keras_prune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert native.cache_dir() == native.Path.home() / ".cache" / "keras_prune"


@needs_kernel
@pytest.mark.parametrize("batch", [1, 2, 5, 16, 20])
def test_kernel_computes_a_product_checkable_by_hand(batch):
    # W = [[0, 2], [3, 0], [0, -1]]: y0 = 3 x1, y1 = 2 x0 - x2.
    values, indices = coo([[0, 2], [3, 0], [0, -1]])
    x = np.arange(batch * 3, dtype="float32").reshape(batch, 3)
    y = native.sparse_matmul(x, values, indices, units=2).numpy()
    np.testing.assert_array_equal(y[:, 0], 3 * x[:, 1])
    np.testing.assert_array_equal(y[:, 1], 2 * x[:, 0] - x[:, 2])


@needs_kernel
@pytest.mark.parametrize("batch", [3, 300])
def test_kernel_matches_numpy_when_the_work_is_shared_between_threads(batch):
    # 300 rows of a 500x300 kernel at 5% is enough work for both threads.
    rng = np.random.default_rng(0)
    kernel = (rng.random((500, 300)) < 0.05) * rng.normal(size=(500, 300))
    x = rng.normal(size=(batch, 500)).astype("float32")
    y = native.sparse_matmul(x, *coo(kernel), units=300).numpy()
    np.testing.assert_allclose(y, x @ kernel.astype("float32"), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_products_running_at_the_same_time_do_not_share_buffers():
    # Independent ops in one graph run on different threads at once; each
    # thread transposes into its own buffer.
    rng = np.random.default_rng(4)
    kernels = [(rng.random((400, 200)) < 0.05) * rng.normal(size=(400, 200))
               for _ in range(4)]  # fmt: skip
    operands = [coo(kernel) for kernel in kernels]
    x = rng.normal(size=(64, 400)).astype("float32")

    @tf.function
    def products(x):
        return [native.sparse_matmul(x, *operand, units=200) for operand in operands]

    for _ in range(3):
        for y, kernel in zip(products(x), kernels, strict=True):
            np.testing.assert_allclose(
                y.numpy(), x @ kernel.astype("float32"), rtol=1e-5, atol=1e-5
            )


@needs_kernel
@pytest.mark.parametrize("batch", [2, 24])
def test_gradients_match_the_dense_product(batch):
    rng = np.random.default_rng(1)
    kernel = ((rng.random((6, 4)) < 0.5) * rng.normal(size=(6, 4))).astype("float32")
    values, indices = coo(kernel)
    x = tf.constant(rng.normal(size=(batch, 6)).astype("float32"))
    upstream = rng.normal(size=(batch, 4)).astype("float32")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, values])
        y = native.sparse_matmul(x, values, indices, units=4)
        loss = tf.reduce_sum(y * upstream)
    dense_kernel = tf.constant(kernel)
    with tf.GradientTape() as dense_tape:
        dense_tape.watch([x, dense_kernel])
        dense_loss = tf.reduce_sum(tf.matmul(x, dense_kernel) * upstream)
    d_x, d_kernel = dense_tape.gradient(dense_loss, [x, dense_kernel])
    np.testing.assert_allclose(tape.gradient(loss, x), d_x, rtol=1e-5, atol=1e-6)
    unit, inputs = indices.numpy().T
    np.testing.assert_allclose(
        tape.gradient(loss, values), d_kernel.numpy()[inputs, unit], rtol=1e-5
    )


@needs_kernel
@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize(
    "indices, message",
    [
        ([[0, 0], [1, 3]], "input < 3"),  # input 3 of 3
        ([[1, 0], [0, 1]], "sorted by unit"),
        ([[0, 0], [2, 1]], r"units in \[0, 2\)"),  # unit 2 of 2
    ],
    ids=["input-out-of-range", "unsorted", "unit-out-of-range"],
)
def test_kernel_refuses_bad_indices(batch, indices, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        native.sparse_matmul(
            tf.ones((batch, 3)),
            tf.ones(2),
            tf.constant(indices, tf.int64),
            units=2,
        )


@needs_kernel
def test_kernel_refuses_indices_that_do_not_match_values():
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"nnz = 3"):
        native.sparse_matmul(
            tf.ones((1, 3)), tf.ones(3), tf.zeros((2, 2), tf.int64), units=2
        )


def run_python(script, **environment):
    """Runs `script` in a fresh interpreter; returns its stdout and stderr."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **environment},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, result.stderr


FALLBACK_SCRIPT = """
    import warnings
    import numpy as np
    from keras_prune import SparseDense
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 10^6 weights, 2 kept: sparse even with TensorFlow's kernels.
        kernel = np.zeros((1000, 1000), "float32")
        kernel[0, 1], kernel[1, 0] = 2.0, 3.0
        layer = SparseDense.from_kernel(kernel)
        print(layer.compute_path(1), layer.compute_path(64))
        print(layer(np.ones((1, 1000), "float32")).numpy()[:, :2].tolist())
    print([str(warning.message) for warning in caught])
"""


def test_without_a_compiler_layers_fall_back_to_tensorflow_kernels(tmp_path):
    stdout, _ = run_python(
        FALLBACK_SCRIPT,
        CXX="false",
        KERAS_PRUNE_CACHE=str(tmp_path),
        KERAS_PRUNE_NATIVE="1",  # also when this suite runs with it off
    )
    paths, product, warnings = stdout.splitlines()
    assert paths == "coo csr"
    assert product == "[[3.0, 2.0]]"
    assert "could not build its sparse kernel" in warnings
    assert "false -std=c++17" in warnings  # the command that failed


def test_native_kernel_can_be_turned_off(tmp_path):
    stdout, _ = run_python(
        FALLBACK_SCRIPT, KERAS_PRUNE_NATIVE="0", KERAS_PRUNE_CACHE=str(tmp_path)
    )
    assert stdout.splitlines() == ["coo csr", "[[3.0, 2.0]]", "[]"]
    assert not list(tmp_path.iterdir())  # nothing built


@needs_kernel
def test_saved_model_with_the_native_kernel_serves_in_a_fresh_process(tmp_path):
    import keras

    from keras_prune import SparseDense

    kernel = np.array([[0.0, 2.0], [3.0, 0.0], [0.0, -1.0]], "float32")
    layer = SparseDense.from_kernel(kernel, compute="native")
    model = keras.Sequential([keras.Input((3,)), layer])
    model.export(str(tmp_path / "served"), verbose=False)
    stdout, _ = run_python(
        f"""
        import tensorflow as tf
        from keras_prune.inference import native
        native.load()  # registers the kernel's op before the graph is read
        served = tf.saved_model.load({str(tmp_path / "served")!r})
        print(served.serve(tf.constant([[1.0, 2.0, 3.0]])).numpy().tolist())
        """
    )
    assert stdout.strip() == "[[6.0, -1.0]]"
