import csv
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_prune.cli import COMMANDS, main
from keras_prune.experiments.data import load_mnist
from keras_prune.experiments.mnist import (
    Data,
    kept_ladder,
    prune,
    seed_convnet,
    split_ladder,
)
from keras_prune.experiments.settings import MnistConfig
from tests.backend_utils import end_to_end_once

MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                     "mnist.npz")  # fmt: skip


@pytest.fixture
def mnist_path():
    if not os.path.isfile(MNIST):
        pytest.skip(f"needs the shared MNIST file at {MNIST}")
    return MNIST


def test_kept_ladder_is_the_seed_reports_geometric_ladder():
    ladder = kept_ladder(18, 0.7)
    assert ladder[16] == pytest.approx(0.0023, abs=5e-5)  # the seed's 0.23% row
    assert ladder[17] == pytest.approx(0.0016, abs=5e-5)  # and its 0.16% row


def test_split_ladder_keeps_the_total_and_gives_fc2_its_floor():
    sizes = {"fc1": 3136 * 1024, "fc2": 1024 * 10}
    split = split_ladder([0.7, 0.0023], sizes, fc2_min_kept=0.04)
    kept = {name: [1 - s for s in split[name]] for name in split}
    assert kept["fc2"] == pytest.approx([0.7, 0.04])
    for k, total in enumerate([0.7, 0.0023]):
        kept_weights = sum(kept[name][k] * sizes[name] for name in sizes)
        assert kept_weights == pytest.approx(total * sum(sizes.values()))


def test_split_ladder_refuses_a_floor_that_starves_fc1():
    with pytest.raises(ValueError, match=r"^Expected `fc2_min_kept` to leave fc1"):
        split_ladder([0.01], {"fc1": 100, "fc2": 100}, fc2_min_kept=0.5)


def test_the_default_ladder_is_the_seed_reports_down_to_0056_percent():
    assert kept_ladder(MnistConfig().rounds, MnistConfig().factor)[-1] == (
        pytest.approx(0.00056, rel=0.01)
    )


def test_prune_convs_prunes_the_convolutions_down_to_their_floors():
    config = MnistConfig(prune_convs=True, rounds=2, factor=0.3, epochs_per_round=1)
    rng = np.random.default_rng(0)
    images = rng.random((64, 28, 28, 1)).astype("float32")
    labels = rng.integers(0, 10, 64)
    dense = seed_convnet()
    masked, rounds = prune(config, dense, Data(images, labels, images, labels), 0)
    assert [(r.kept_conv1, r.kept_conv2) for r in rounds] == [
        pytest.approx((0.5, 0.3)), pytest.approx((0.5, 0.1)),
    ]  # fmt: skip
    sizes = {"conv1": 800, "conv2": 51_200, "fc1": 3136 * 1024, "fc2": 10_240}
    last = rounds[-1]
    kept = {"conv1": 0.5, "conv2": 0.1, "fc1": last.kept_fc1, "fc2": last.kept_fc2}
    assert last.kept_all == pytest.approx(
        sum(kept[n] * sizes[n] for n in sizes) / sum(sizes.values())
    )
    assert type(dense.get_layer("conv1")) is keras.layers.Conv2D  # left unchanged


def test_seed_convnet_has_the_seed_reports_shapes():
    model = seed_convnet()
    assert model.get_layer("fc1").kernel.shape == (3136, 1024)
    assert model.get_layer("fc2").kernel.shape == (1024, 10)
    assert model.output_shape == (None, 10)


def test_missing_data_file_names_both_options(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["mnist", "--data", str(tmp_path / "nope.npz"), "--quick",
                   "--out", str(out)])  # fmt: skip
    assert status == 2
    error = capsys.readouterr().err
    assert "Expected `data` to be an .npz file in Keras's MNIST layout" in error
    assert "keras.datasets.mnist" in error and "nope.npz" in error
    assert not out.exists()  # checked before anything was made


def test_failed_download_says_to_pass_a_local_file(monkeypatch):
    def offline():
        raise OSError("Name or service not known")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(RuntimeError, match=r"`--data PATH` on the command line"):
        load_mnist(None)


def test_npz_without_the_four_arrays_is_refused(tmp_path):
    import numpy as np

    np.savez(tmp_path / "bad.npz", x_train=np.zeros(1))
    with pytest.raises(
        ValueError,
        match=r"missing \['x_test', 'y_test', 'y_train'\]$",
    ):
        load_mnist(tmp_path / "bad.npz")


# Quick mode, 8 rounds keeping half each: down to 0.39% of the Dense weights,
# past the point where fc2's floor of 4% holds and fc1 gives up the rest.
QUICK = ("--quick", "--rounds", "8", "--factor", "0.5")


def keras_prune_mnist(*options):
    """Starts `keras-prune mnist` in quick mode in a new process."""
    return keras_prune_command("mnist", *QUICK, *options)


def keras_prune_command(*arguments):
    """Starts `keras-prune` in a new process, as a user would from a
    terminal (Ctrl-C on: a process started in the background of a script
    inherits SIGINT ignored)."""
    return subprocess.Popen(
        [sys.executable, "-m", "keras_prune", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def finish(process, timeout=600):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One uninterrupted quick run: its output folder and printed text."""
    if not os.path.isfile(MNIST):
        pytest.skip(f"needs the shared MNIST file at {MNIST}")
    out = tmp_path_factory.mktemp("quick")
    status, stdout, stderr = finish(
        keras_prune_mnist("--data", MNIST, "--out", str(out))
    )
    assert status == 0, stderr
    return out, stdout


def read_rows(folder):
    with open(folder / "rounds.csv") as file:
        return list(csv.DictReader(file))


def test_quick_run_writes_a_sane_report_csv_and_plot(quick_run):
    out, printed = quick_run
    assert "| round | kept (all Dense)" in printed
    rows = read_rows(out)
    assert len(rows) == 9  # the dense model, then 8 rounds
    expected = [1.0, *kept_ladder(8, 0.5)]
    for row, kept in zip(rows, expected, strict=True):
        assert float(row["kept"]) == pytest.approx(kept)
        # fc1 and fc2 together keep what the ladder says, to the weight.
        together = float(row["kept_fc1"]) * 3136 * 1024 + float(row["kept_fc2"]) * 10240
        assert together == pytest.approx(kept * (3136 * 1024 + 10240), abs=1.0)
        assert float(row["test_accuracy"]) > 0.5  # chance is 0.1
    report = (out / "report.md").read_text()
    assert "Quick mode" in report and "| sparse |" in report
    # The deployable files, and the LiteRT file scoring what Keras scores.
    assert (out / "sparse.keras").stat().st_size < 1_000_000
    assert (out / "sparse.tflite").stat().st_size < 1_000_000
    found = re.search(
        r"test accuracy\s+([\d.]+)% \(the Keras model's: ([\d.]+)%\)", report
    )
    assert found and abs(float(found[1]) - float(found[2])) <= 0.1
    assert "fc1    1024x3136" in report and "sparse kernel" in report
    png = (out / "accuracy_vs_kept.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # Only the last round's checkpoint is kept, beside the dense model's.
    assert sorted(os.listdir(out / "checkpoints")) == ["dense-1.keras",
                                                       "masked-9.keras"]  # fmt: skip


@end_to_end_once
def test_stopped_run_leaves_a_report_and_resumes_to_the_same_table(quick_run, tmp_path):
    out = tmp_path / "run"
    process = keras_prune_mnist("--data", MNIST, "--out", str(out))
    csv_file = out / "rounds.csv"
    # Stop early: the last rounds and the export take only seconds in quick
    # mode, and a loaded machine may poll late (CI once saw the run finish).
    while not csv_file.exists() or len(read_rows(out)) < 4:  # dense, rounds 1-3
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    status, _, stderr = finish(process)
    assert status == 130, stderr
    assert "rerun with --resume to continue" in stderr
    finished = read_rows(out)
    assert 4 <= len(finished) < 9
    report = (out / "report.md").read_text()
    last = len(finished) - 1
    assert f"**Stopped after round {last}, before round {last + 1} of 8**" in report
    assert f"| {last} | {float(finished[-1]['kept']):.4%} |" in report

    # A stop by SIGTERM (`kill`, a job scheduler) is a stop too.
    if len(finished) < 8:  # a round is left to stop in
        process = keras_prune_mnist("--data", MNIST, "--out", str(out), "--resume")
        while len(read_rows(out)) < len(finished) + 1:
            assert process.poll() is None, process.communicate()[1]
            time.sleep(0.2)
        process.terminate()
        status, _, stderr = finish(process)
        assert status == 143, stderr
        finished = read_rows(out)
        report = (out / "report.md").read_text()
        assert f"**Stopped after round {len(finished) - 1}," in report

    # Without --resume, the unfinished run is not overwritten.
    status, _, stderr = finish(keras_prune_mnist("--data", MNIST, "--out", str(out)))
    assert status == 2 and "Pass --resume" in stderr
    assert read_rows(out) == finished

    status, stdout, stderr = finish(
        keras_prune_mnist("--data", MNIST, "--out", str(out), "--resume")
    )
    assert status == 0, stderr
    uninterrupted = read_rows(quick_run[0])
    assert read_rows(out) == uninterrupted  # every round, to the last digit


def test_resume_with_other_settings_names_them(quick_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(quick_run[0], out)
    status, _, stderr = finish(
        keras_prune_mnist(
            "--data", MNIST, "--out", str(out), "--resume", "--rounds", "5"
        )  # fmt: skip
    )
    assert status == 2
    assert "Received: rounds=5 (the run has 8)" in stderr


def test_missing_optional_dependency_stops_before_anything_runs(
    monkeypatch, tmp_path, capsys
):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "matplotlib" else real_find_spec(name),
    )
    out = tmp_path / "run"
    assert main(["mnist", "--quick", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "keras-prune mnist needs matplotlib, which is not installed" in error
    assert error.strip().endswith(
        "nothing was run. Install with: pip install matplotlib"
    )
    assert not out.exists()  # nothing was trained or written


WITHOUT_TENSORFLOW_AND_MATPLOTLIB = """
import importlib.abc
import sys


class Uninstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Uninstalled())
import keras_prune as kp
from keras_prune.cli import main

try:
    kp.make_prunable
except ImportError as error:
    print(error)
sys.exit(main(sys.argv[1:]))
"""


def test_without_a_keras_backend_the_command_names_the_extra(tmp_path):
    # As after `pip install .` alone: Keras cannot import its default backend.
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW_AND_MATPLOTLIB,
         "mnist", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith(
        "keras-prune mnist needs tensorflow and matplotlib, which are not "
        "installed; nothing was run. Install with: "
        "pip install 'keras_prune[demo]'"
    )
    assert result.stdout.startswith(
        "keras_prune.make_prunable needs Keras with an installed backend, and "
        "importing Keras failed: No module named 'tensorflow'"
    )
    assert not out.exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_accepts_its_own_defaults(command):
    # A check that reads a setting the command does not have would stop
    # every run of it; the end-to-end tests run only some commands per backend.
    settings = COMMANDS[command][0]
    settings().validate()
    settings(quick=True).resolved().validate()


def test_a_bad_option_stops_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["mnist", "--quick", "--factor", "1.5", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        "Expected --factor (the fraction kept per round) in (0, 1). "
        "Received: --factor=1.5"
    )
    assert not out.exists()


def test_a_signal_that_surfaces_as_another_error_still_stops_cleanly(
    tmp_path, monkeypatch, capsys
):
    # Ctrl-C landing inside TensorFlow's C++ code (tracing) can come out as a
    # TypeError of a tensor conversion: the run still stops with 130.
    from keras_prune import cli
    from keras_prune.experiments import mnist

    def interrupted_run(config, verbose, folder):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:
            raise TypeError("Failed to convert (None, 3136) to Tensor") from None

    monkeypatch.setattr(mnist, "run", interrupted_run)
    out = tmp_path / "run"
    # As in a terminal (a background job of a script starts with it ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = cli.main(["mnist", "--data", MNIST, "--out", str(out), "--quick"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == 130
    assert "rerun with --resume to continue" in capsys.readouterr().err
