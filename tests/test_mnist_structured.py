"""`keras-prune mnist-structured`: prunes whole filters and units of the
seed network, shrinks it, and measures it; stops and resumes like the main
job."""

import os
import signal
import time

import keras
import numpy as np
import pytest

from keras_prune.cli import main
from tests.backend_utils import same_without_native_kernel
from tests.test_mnist import MNIST, finish, keras_prune_command, read_rows

pytestmark = same_without_native_kernel

OPTIONS = ("--quick", "--train-samples", "3000", "--test-samples", "1000")


def keras_prune_structured(*options):
    return keras_prune_command("mnist-structured", *OPTIONS, *options)


@pytest.fixture(scope="module")
def structured_run(tmp_path_factory):
    if not os.path.isfile(MNIST):
        pytest.skip(f"needs the shared MNIST file at {MNIST}")
    out = tmp_path_factory.mktemp("structured")
    status, stdout, stderr = finish(
        keras_prune_structured("--data", MNIST, "--out", str(out))
    )
    assert status == 0, stderr
    return out, stdout


def test_structured_run_reaches_its_targets_and_writes_a_smaller_model(
    structured_run,
):
    out, printed = structured_run
    assert "| epoch | phase | conv1 filters kept" in printed
    rows = read_rows(out)
    assert [row["phase"] for row in rows] == ["dense", "prune", "prune", "tune"]
    last = rows[-1]
    # Defaults: 12 of 32 conv1 filters, 16 of 64 conv2 filters, 128 of 1024 units.
    assert float(last["kept_conv1"]) == 0.375
    assert float(last["kept_conv2"]) == 0.25
    assert float(last["kept_fc1"]) == 0.125
    assert float(last["flops"]) < 0.1
    assert all(float(row["test_accuracy"]) > 0.5 for row in rows)  # chance: 0.1
    shrunk = keras.saving.load_model(out / "shrunk.keras")
    assert [layer.__class__.__module__.split(".")[0] for layer in shrunk.layers] == [
        "keras"
    ] * len(shrunk.layers)
    assert shrunk.get_layer("conv2").filters == 16
    assert shrunk.get_layer("fc1").units == 128
    assert shrunk.count_params() < 0.04 * 3_274_634
    report = (out / "report.md").read_text()
    assert "Quick mode" in report and "| shrunk |" in report
    png = (out / "accuracy_vs_speedup.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_structured_run_resumes_to_the_same_masks_and_accuracies(
    structured_run, tmp_path
):
    out = tmp_path / "run"
    process = keras_prune_structured("--data", MNIST, "--out", str(out))
    while not (out / "rounds.csv").exists() or len(read_rows(out)) < 2:
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    status, _, stderr = finish(process)
    assert status == 130, stderr
    assert "**Stopped after" in (out / "report.md").read_text()
    status, _, stderr = finish(
        keras_prune_structured("--data", MNIST, "--out", str(out), "--resume")
    )
    assert status == 0, stderr

    def measured(rows):  # timings differ from run to run; the rest may not
        return [{k: v for k, v in r.items() if k != "speedup"} for r in rows]

    assert measured(read_rows(out)) == measured(read_rows(structured_run[0]))
    a = keras.saving.load_model(out / "shrunk.keras")
    b = keras.saving.load_model(structured_run[0] / "shrunk.keras")
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_bad_structured_option_stops_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["mnist-structured", "--kept-fc1", "0", "--out", str(out)])
    assert status == 2
    assert (
        "Expected --kept-fc1 (a kept fraction) in (0, 1]. Received: --kept-fc1=0"
        in (capsys.readouterr().err)
    )
    assert not out.exists()
