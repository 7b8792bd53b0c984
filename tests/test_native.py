import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from keras_prune.inference import native
from keras_prune.inference.sparse_dense import coo_from_kernel, csr_from_coo
from tests.kernels import needs_native as needs_kernel


@pytest.fixture(params=native.LOADS)
def loads(request):
    """Runs a test with each of the kernel's small-batch loads forced."""
    plan = native.plan()
    if plan is not None and request.param not in plan.built:
        pytest.skip(f"this build of the kernel has no {request.param} loads (no AVX2)")
    if plan is not None:
        native.set_loads(request.param)
    yield request.param
    if plan is not None:
        native.set_loads(None)


def csr(kernel):
    """The native kernel's operands for `kernel`: values, row splits, columns."""
    values, indices = coo_from_kernel(np.asarray(kernel, "float32"))
    row_splits, columns = csr_from_coo(indices, np.shape(kernel)[1])
    return tf.constant(values), tf.constant(row_splits), tf.constant(columns)


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
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 16, 20])
def test_kernel_computes_a_product_checkable_by_hand(batch, loads):
    # W = [[0, 2], [3, 0], [0, -1]]: y0 = 3 x1, y1 = 2 x0 - x2.
    x = np.arange(batch * 3, dtype="float32").reshape(batch, 3)
    y = native.sparse_matmul(x, *csr([[0, 2], [3, 0], [0, -1]])).numpy()
    np.testing.assert_array_equal(y[:, 0], 3 * x[:, 1])
    np.testing.assert_array_equal(y[:, 1], 2 * x[:, 0] - x[:, 2])
    with_bias = native.sparse_matmul(
        x, *csr([[0, 2], [3, 0], [0, -1]]), bias=tf.constant([10.0, -1.0])
    ).numpy()
    np.testing.assert_array_equal(with_bias, y + [10.0, -1.0])


@needs_kernel
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("kept", [7, 8, 9, 16, 19])
def test_units_with_eight_nonzeros_or_more_sum_every_one(batch, kept, loads):
    # Unit 0 reads inputs 0..kept-1 with weight 1 (eight at a time in vector
    # registers, the rest one by one), unit 1 only input 20 with weight 2.
    kernel = np.zeros((21, 2), "float32")
    kernel[:kept, 0], kernel[20, 1] = 1.0, 2.0
    x = np.arange(batch * 21, dtype="float32").reshape(batch, 21)
    y = native.sparse_matmul(x, *csr(kernel)).numpy()
    np.testing.assert_array_equal(y[:, 0], x[:, :kept].sum(axis=1))
    np.testing.assert_array_equal(y[:, 1], 2 * x[:, 20])


@needs_kernel
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 300])
def test_kernel_matches_numpy_when_the_work_is_shared_between_threads(batch, loads):
    # 500x300 at 5% (about 25 nonzeros a unit) with 300 rows is enough work
    # for both threads.
    rng = np.random.default_rng(0)
    kernel = (rng.random((500, 300)) < 0.05) * rng.normal(size=(500, 300))
    x = rng.normal(size=(batch, 500)).astype("float32")
    y = native.sparse_matmul(x, *csr(kernel)).numpy()
    np.testing.assert_allclose(y, x @ kernel.astype("float32"), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_products_running_at_the_same_time_do_not_share_buffers():
    # Independent ops in one graph run on different threads at once; each
    # thread transposes into its own buffer.
    rng = np.random.default_rng(4)
    kernels = [(rng.random((400, 200)) < 0.05) * rng.normal(size=(400, 200))
               for _ in range(4)]  # fmt: skip
    operands = [csr(kernel) for kernel in kernels]
    x = rng.normal(size=(64, 400)).astype("float32")

    @tf.function
    def products(x):
        return [native.sparse_matmul(x, *operand) for operand in operands]

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
    values, row_splits, columns = csr(kernel)
    bias = tf.constant(rng.normal(size=4).astype("float32"))
    x = tf.constant(rng.normal(size=(batch, 6)).astype("float32"))
    upstream = rng.normal(size=(batch, 4)).astype("float32")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, values, bias])
        y = native.sparse_matmul(x, values, row_splits, columns, bias)
        loss = tf.reduce_sum(y * upstream)
    dense_kernel = tf.constant(kernel)
    with tf.GradientTape() as dense_tape:
        dense_tape.watch([x, dense_kernel])
        dense_loss = tf.reduce_sum(tf.matmul(x, dense_kernel) * upstream)
    d_x, d_kernel = dense_tape.gradient(dense_loss, [x, dense_kernel])
    np.testing.assert_allclose(tape.gradient(loss, x), d_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        tape.gradient(loss, bias), upstream.sum(axis=0), rtol=1e-5
    )
    unit, inputs = coo_from_kernel(kernel)[1].T
    np.testing.assert_allclose(
        tape.gradient(loss, values), d_kernel.numpy()[inputs, unit], rtol=1e-5
    )


@needs_kernel
@pytest.mark.parametrize("batch", [1, 3, 20])
def test_the_kernel_reads_variables_itself_and_matches_tensors(batch):
    rng = np.random.default_rng(5)
    kernel = ((rng.random((40, 9)) < 0.4) * rng.normal(size=(40, 9))).astype("float32")
    operands = [*csr(kernel), tf.constant(rng.normal(size=9).astype("float32"))]
    variables = [tf.Variable(operand) for operand in operands]
    x = tf.constant(rng.normal(size=(batch, 40)).astype("float32"))

    @tf.function
    def product(x):
        return native.sparse_matmul(x, *variables)

    graph = product.get_concrete_function(x).graph
    ops = {op.type for op in graph.get_operations()}
    assert "KerasPruneCsrMatMulVariables" in ops and "ReadVariableOp" not in ops
    expected = native.sparse_matmul(x, *operands).numpy()
    np.testing.assert_array_equal(product(x).numpy(), expected)
    # Gradients reach the variables, as they do through tensors.
    upstream = rng.normal(size=(batch, 9)).astype("float32")
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(operands)
        loss_from_variables = tf.reduce_sum(
            native.sparse_matmul(x, *variables) * upstream
        )
        loss_from_tensors = tf.reduce_sum(native.sparse_matmul(x, *operands) * upstream)
    for variable, operand in zip(variables, operands, strict=True):
        from_variable = tape.gradient(loss_from_variables, variable)
        from_tensor = tape.gradient(loss_from_tensors, operand)
        if variable.dtype == tf.int32:
            assert from_variable is None and from_tensor is None
        else:
            np.testing.assert_allclose(from_variable, from_tensor, rtol=1e-6)


@needs_kernel
def test_the_kernel_refuses_a_bias_variable_that_is_not_one_per_unit():
    values, row_splits, columns = csr([[0, 2], [3, 0], [0, -1]])
    handles = [tf.Variable(operand).handle for operand in (values, row_splits, columns)]
    for bias in (tf.Variable(1.0), tf.Variable([1.0, 2.0, 3.0])):
        with pytest.raises(
            tf.errors.InvalidArgumentError,
            match=r"bias must have shape \[units\] with units = 2, or \[0\]",
        ):
            native.load().keras_prune_csr_mat_mul_variables(
                tf.ones((1, 3)), *handles, [bias.handle], units=2
            )


@needs_kernel
def test_the_kernel_refuses_variables_of_the_wrong_dtype():
    values, row_splits, columns = csr([[0, 2], [3, 0], [0, -1]])
    library = native.load()
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"row_splits must be a int32 variable, got float",
    ):
        library.keras_prune_csr_mat_mul_variables(
            tf.ones((1, 3)),
            tf.Variable(values).handle,
            tf.Variable(tf.cast(row_splits, tf.float32)).handle,
            tf.Variable(columns).handle,
            [],
            units=2,
        )


@needs_kernel
@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize(
    "row_splits, columns",
    [
        ([0, 1, 3], [0, 3, 1]),  # input 3 of 3
        ([0, 1, 3], [0, -1, 1]),
        ([0, 10, 10], [0, 1, 2, 2, 2, 3, 2, 2, 2, 2]),  # in a block of eight
        ([0, 2, 1], [0, 1, 2]),  # decreasing
        ([0, 1, 4], [0, 1, 2]),  # past nnz = 3
        ([-1, 1, 3], [0, 1, 2]),
    ],
    ids=[
        "input-3",
        "input-minus-1",
        "input-3-of-eight",
        "decreasing",
        "past-nnz",
        "negative",
    ],
)
def test_kernel_refuses_bad_row_splits_or_columns(batch, row_splits, columns, loads):
    message = (
        r"row_splits must rise from 0 to at most nnz = \d+, "
        r"and columns must lie in \[0, 3\)"
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        native.sparse_matmul(
            tf.ones((batch, 3)),
            tf.ones(len(columns)),
            tf.constant(row_splits, tf.int32),
            tf.constant(columns, tf.int32),
        )


@needs_kernel
@pytest.mark.parametrize("size", [1, 3])
def test_kernel_refuses_a_bias_of_another_size_than_units(size):
    message = r"bias must have shape \[units\] with units = 2, or \[0\], got "
    with pytest.raises(tf.errors.InvalidArgumentError, match=message + f"\\[{size}\\]"):
        native.sparse_matmul(
            tf.ones((1, 3)), *csr([[0, 2], [3, 0], [0, -1]]), tf.ones(size)
        )


@needs_kernel
def test_kernel_refuses_columns_that_do_not_match_values():
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"nnz = 3"):
        native.sparse_matmul(
            tf.ones((1, 3)), tf.ones(3), tf.constant([0, 1, 2]), tf.constant([0, 1])
        )


def coo_product(x, values, indices, units):
    """keras_prune 0.2's op, which its SavedModels call."""
    return native.load().keras_prune_sparse_mat_mul(x, values, indices, units=units)


@needs_kernel
@pytest.mark.parametrize("batch", [1, 4, 20])
def test_the_coo_op_of_earlier_versions_still_computes(batch):
    rng = np.random.default_rng(2)
    kernel = ((rng.random((30, 7)) < 0.4) * rng.normal(size=(30, 7))).astype("float32")
    values, indices = coo_from_kernel(kernel)
    x = rng.normal(size=(batch, 30)).astype("float32")
    y = coo_product(x, values, indices, 7).numpy()
    np.testing.assert_allclose(y, x @ kernel, rtol=1e-5, atol=1e-5)


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
def test_the_coo_op_refuses_bad_indices(batch, indices, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        coo_product(tf.ones((batch, 3)), tf.ones(2), tf.constant(indices, tf.int64), 2)


@needs_kernel
def test_the_coo_op_refuses_indices_that_do_not_match_values():
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"nnz = 3"):
        coo_product(tf.ones((1, 3)), tf.ones(3), tf.zeros((2, 2), tf.int64), 2)


@needs_kernel
def test_the_plan_names_the_loads_measured_on_this_cpu():
    plan = native.plan()
    assert plan.loads in plan.built and plan.built[0] == "scalar"
    assert set(plan.timings) == set(plan.built)
    assert all(time > 0 for time in plan.timings.values())
    if "KERAS_PRUNE_LOADS" not in os.environ:
        assert plan.chosen_by == "measurement"
        assert plan.loads == min(plan.timings, key=plan.timings.get)
    assert plan.cpu == native.cpu_description()


@needs_kernel
def test_set_loads_forces_the_loads_until_reset():
    measured = native.plan()
    try:
        for loads in measured.built:
            native.set_loads(loads)
            assert (native.plan().loads, native.plan().chosen_by) == (
                loads,
                "set_loads",
            )
    finally:
        native.set_loads(None)
    assert native.plan() == measured


@needs_kernel
def test_the_timings_are_measured_once_per_machine_and_cached():
    cached = json.loads(native.plan_path().read_text())
    assert cached["timings"] == native.plan().timings
    assert cached["cpu"] == native.cpu_description()


@needs_kernel
def test_keras_prune_loads_forces_the_loads_in_a_new_process():
    for loads in native.plan().built:
        stdout, _ = run_python(
            "from keras_prune.inference import native\n"
            "print(native.plan().loads, native.plan().chosen_by)",
            KERAS_PRUNE_LOADS=loads,
        )
        assert stdout.split() == [loads, "KERAS_PRUNE_LOADS"]


@needs_kernel
def test_a_bad_keras_prune_loads_is_refused_by_name():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from keras_prune.inference import native; native.load()",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_PRUNE_LOADS": "vector"},
    )
    assert result.returncode != 0
    assert "Expected KERAS_PRUNE_LOADS to be one of ['scalar'" in result.stderr
    assert "Received: KERAS_PRUNE_LOADS='vector'" in result.stderr


@needs_kernel
def test_set_loads_refuses_unknown_loads():
    with pytest.raises(
        ValueError,
        match=r"^Expected `loads` to be one of \['scalar'.*Received: loads='vector'$",
    ):
        native.set_loads("vector")


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


@needs_kernel
def test_a_saved_model_that_calls_the_coo_op_of_earlier_versions_still_serves(
    tmp_path,
):
    # What keras_prune 0.2 exported: a graph that calls its COO op.
    values, indices = coo_from_kernel(np.array([[0.0, 2.0], [3.0, 0.0], [0.0, -1.0]]))
    module = tf.Module()
    module.values = tf.Variable(values.astype("float32"))
    module.indices = tf.Variable(indices)
    module.serve = tf.function(
        lambda x: coo_product(x, module.values, module.indices, 2),
        input_signature=[tf.TensorSpec((None, 3), tf.float32)],
    )
    tf.saved_model.save(module, str(tmp_path / "served"))
    stdout, _ = run_python(
        f"""
        import tensorflow as tf
        from keras_prune.inference import native
        native.load()
        served = tf.saved_model.load({str(tmp_path / "served")!r})
        print(served.serve(tf.constant([[1.0, 2.0, 3.0]])).numpy().tolist())
        """
    )
    assert stdout.strip() == "[[6.0, -1.0]]"


PORTABLE_SCRIPT = """
    import numpy as np
    import tensorflow as tf
    from keras_prune.inference import native
    from keras_prune.inference.sparse_dense import coo_from_kernel, csr_from_coo

    native._cpu_flags = lambda: []  # as on a CPU without AVX2
    plan = native.plan()
    print(plan.built, plan.chosen_by)
    rng = np.random.default_rng(0)
    kernel = (rng.random((50, 30)) < 0.3) * rng.normal(size=(50, 30))
    values, indices = coo_from_kernel(kernel.astype("float32"))
    bias = rng.normal(size=30).astype("float32")
    operands = (values, *csr_from_coo(indices, 30), bias)
    for batch in (1, 3, 5, 20):
        x = rng.normal(size=(batch, 50)).astype("float32")
        y = native.sparse_matmul(x, *operands).numpy()
        np.testing.assert_allclose(y, x @ kernel + operands[-1], rtol=1e-5, atol=1e-5)
    try:
        native.sparse_matmul(np.ones((1, 50), "float32"), values, operands[1],
                             np.full_like(operands[2], 50), None)
    except tf.errors.InvalidArgumentError as error:
        print("refused:", "columns must lie in [0, 50)" in str(error))
"""


@needs_kernel
def test_the_portable_build_without_avx2_computes_and_checks(tmp_path):
    # CPUs without AVX2 get the kernel's plain C++ loops and scalar loads only.
    stdout, _ = run_python(PORTABLE_SCRIPT, KERAS_PRUNE_CACHE=str(tmp_path))
    assert stdout.splitlines() == [
        "('scalar',) the only loads built (no AVX2)",
        "refused: True",
    ]
