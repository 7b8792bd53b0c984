import csv
import os

import keras
import pytest

from keras_prune.cli import main
from keras_prune.experiments.data import load_mnist
from keras_prune.experiments.mnist import kept_ladder, seed_convnet, split_ladder

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


def test_seed_convnet_has_the_seed_reports_shapes():
    model = seed_convnet()
    assert model.get_layer("fc1").kernel.shape == (3136, 1024)
    assert model.get_layer("fc2").kernel.shape == (1024, 10)
    assert model.output_shape == (None, 10)


def test_missing_data_file_names_both_options(tmp_path, capsys):
    status = main(["mnist", "--data", str(tmp_path / "nope.npz"), "--quick"])
    assert status == 2
    error = capsys.readouterr().err
    assert "Expected `data` to be an .npz file in Keras's MNIST layout" in error
    assert "keras.datasets.mnist" in error and "nope.npz" in error


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


def test_quick_run_writes_a_sane_report_csv_and_plot(mnist_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["mnist", "--data", mnist_path, "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| round | kept (all Dense)" in printed
    with open(out / "rounds.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 19  # the dense model, then 18 rounds
    expected = [1.0, *kept_ladder(18, 0.7)]
    for row, kept in zip(rows, expected, strict=True):
        assert float(row["kept"]) == pytest.approx(kept)
        # fc1 and fc2 together keep what the ladder says, to the weight.
        together = float(row["kept_fc1"]) * 3136 * 1024 + float(row["kept_fc2"]) * 10240
        assert together == pytest.approx(kept * (3136 * 1024 + 10240), abs=1.0)
        assert float(row["test_accuracy"]) > 0.5  # chance is 0.1
    report = (out / "report.md").read_text()
    assert "Quick mode" in report and "| sparse |" in report
    png = (out / "accuracy_vs_kept.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
