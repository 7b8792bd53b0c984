import json
import os

import keras
import numpy as np
import pytest

from keras_prune.experiments.progress import RunFolder
from tests.backend_utils import to_numpy


def dropout_model():
    # A seeded dropout draws from its own generator on every backend (an
    # unseeded one uses PyTorch's global generator on PyTorch).
    return keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5, seed=1)])


def drops(model):
    """Which of 64 ones the model's dropout zeroes, as booleans."""
    return to_numpy(model(np.ones((1, 64), "float32"), training=True)) == 0


def test_a_resumed_folder_gives_back_rows_models_and_their_random_state(tmp_path):
    model = dropout_model()
    drops(model)  # advance its random-number state past the start
    RunFolder(tmp_path, {"seed": 0}).record([{"round": 0}], {"net": model})
    resumed = RunFolder(tmp_path, {"seed": 0}, resume=True)
    assert resumed.rows == [{"round": 0}]
    loaded = resumed.load_model("net")
    # The next dropout draws are the same as the saved model's own next ones.
    np.testing.assert_array_equal(drops(loaded), drops(model))
    assert (tmp_path / "rounds.csv").read_text().splitlines() == ["round", "0"]


def test_a_save_stopped_halfway_leaves_the_last_record_intact(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path, {"seed": 0})
    folder.record([{"round": 0}], {"net": dropout_model()})
    before = json.loads((tmp_path / "progress.json").read_text())

    def stopped(self, path, *args, **kwargs):
        with open(path, "wb") as file:
            file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", stopped)
    with pytest.raises(KeyboardInterrupt):
        folder.record([{"round": 0}, {"round": 1}], {"net": dropout_model()})
    monkeypatch.undo()
    assert json.loads((tmp_path / "progress.json").read_text()) == before
    assert os.listdir(tmp_path / "checkpoints") == ["net-1.keras"]  # no partial
    resumed = RunFolder(tmp_path, {"seed": 0}, resume=True)
    assert resumed.rows == [{"round": 0}]
    assert resumed.load_model("net").layers[0].rate == 0.5


def test_only_the_latest_checkpoint_of_each_model_is_kept(tmp_path):
    folder = RunFolder(tmp_path, {})
    folder.record([{"round": 0}], {"dense": dropout_model()})
    folder.record([{"round": 0}, {"round": 1}], {"masked": dropout_model()})
    folder.record(
        [{"round": 0}, {"round": 1}, {"round": 2}], {"masked": dropout_model()}
    )
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "dense-1.keras",
        "masked-3.keras",
    ]


def test_an_unfinished_run_is_never_overwritten_without_resume(tmp_path):
    RunFolder(tmp_path, {"seed": 0}).record([{"round": 0}])
    with pytest.raises(FileExistsError, match=r"holds an unfinished run \(1 rows"):
        RunFolder(tmp_path, {"seed": 0})
    with pytest.raises(
        ValueError,
        match=r"^Expected the settings of the run recorded in .* to resume it\. "
        r"Received: seed=1 \(the run has 0\)$",
    ):
        RunFolder(tmp_path, {"seed": 1}, resume=True)


def test_a_finished_run_is_not_overwritten_either(tmp_path):
    RunFolder(tmp_path, {}).record([{"round": 0}], {"net": dropout_model()}, True)
    with pytest.raises(FileExistsError, match=r"holds a finished run \(1 rows"):
        RunFolder(tmp_path, {})
    assert os.listdir(tmp_path / "checkpoints") == ["net-1.keras"]


def test_a_setting_added_after_a_run_was_recorded_counts_as_its_default(tmp_path):
    RunFolder(tmp_path, {"rounds": 3}).record([{"round": 0}])
    newer = {"rounds": 3, "schedule": "polynomial"}
    resumed = RunFolder(tmp_path, newer, True, defaults={"schedule": "polynomial"})
    assert resumed.rows == [{"round": 0}]
    with pytest.raises(ValueError, match=r"schedule='geometric' \(the run has "
                       r"'polynomial'\)"):  # fmt: skip
        RunFolder(tmp_path, {**newer, "schedule": "geometric"}, True,
                  defaults={"schedule": "polynomial"})  # fmt: skip
    with pytest.raises(ValueError, match=r"schedule='polynomial' \(the run has None"):
        RunFolder(tmp_path, newer, resume=True)  # without defaults


def test_reporting_a_finished_run_again_keeps_its_wall_time(tmp_path):
    folder = RunFolder(tmp_path, {})
    folder.record([{"round": 0}])  # an unfinished run: its time counts on
    unfinished = json.loads((tmp_path / "progress.json").read_text())["seconds"]
    resumed = RunFolder(tmp_path, {}, resume=True)
    assert resumed.seconds() > unfinished
    resumed.earlier_seconds = 600.0  # 10 minutes before the stop,
    resumed.started -= 50.0  # and 50 seconds to finish it after the resume
    resumed.record(resumed.rows, finished=True)
    again = RunFolder(tmp_path, {}, resume=True)
    again.started -= 100.0  # as if reporting it again took 100 seconds
    again.record(again.rows, finished=True)  # what a job does when reporting
    assert again.seconds() == pytest.approx(650.0, abs=1.0)
    recorded = json.loads((tmp_path / "progress.json").read_text())["seconds"]
    assert recorded == pytest.approx(650.0, abs=1.0)


def test_a_resumed_run_makes_layers_with_the_seeds_a_run_that_went_on_made(tmp_path):
    import random

    def seed_of_a_new_dropout():  # unseeded: Keras draws from Python's random
        return to_numpy(keras.layers.Dropout(0.5).seed_generator.state)

    random.seed(7)
    RunFolder(tmp_path, {}).record([{"round": 0}])
    went_on = seed_of_a_new_dropout()
    random.seed(8)  # as in a new process
    assert not np.array_equal(seed_of_a_new_dropout(), went_on)
    RunFolder(tmp_path, {}, resume=True).restore_python_random()
    np.testing.assert_array_equal(seed_of_a_new_dropout(), went_on)


def test_an_unreadable_progress_file_names_itself_and_the_fix(tmp_path):
    (tmp_path / "progress.json").write_text('{"rows": [')
    with pytest.raises(ValueError, match=r"^Could not read .*progress\.json .*Delete"):
        RunFolder(tmp_path, {}, resume=True)
