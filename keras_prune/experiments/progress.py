"""An experiment's output folder, written as the experiment goes.

A long job must never lose finished work. `RunFolder` keeps, in the job's
output folder:

- `rounds.csv`: one row per finished round, rewritten after every round;
- `progress.json`: the settings, the rows and the wall time so far, which
  say how far the job got;
- `checkpoints/<name>-<rows>.keras`: the models a resumed job continues from
  (compiled models keep their optimizer state, masked models their masks;
  the progress file adds the random-number states Keras does not save).

Every file is written to a temporary name and then renamed over the old
one, and a checkpoint is deleted only once the progress file names its
successor, so a job killed at any moment leaves the last finished round
intact.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import keras
import numpy as np

PROGRESS = "progress.json"
CSV = "rounds.csv"
CHECKPOINTS = "checkpoints"


@contextmanager
def _replacing(path: str) -> Iterator[str]:
    """Yields a temporary path next to `path`; renames it over `path` once
    written (an atomic step on POSIX file systems)."""
    partial = f"{path}.partial{os.path.splitext(path)[1]}"
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


class RunFolder:
    """The output folder of one experiment run: its progress and checkpoints.

    Args:
        path: The folder; created if missing.
        settings: The run's settings (JSON-serializable), recorded with its
            progress; a resumed run must have the same ones.
        resume: Whether to continue the run recorded in `path` (a folder
            without one starts a new run). Defaults to `False`, which refuses
            a folder that holds a run: nothing recorded is ever overwritten.
        defaults: For runs recorded before a setting existed, the value it
            counts as when the recorded run lacks it: its default, or what
            runs did before it existed (see `settings.earlier_values`).
            Defaults to `None` (a missing setting differs).

    Raises:
        FileExistsError: If `resume` is `False` and `path` holds a run.
        ValueError: If `resume` is `True` and the recorded run has other
            settings (each one that differs is named), or the progress file
            cannot be read.
        OSError: If the folder cannot be made.

    Example:

    >>> import tempfile
    >>> folder = RunFolder(tempfile.mkdtemp(), {"rounds": 3})
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dropout(0.5)])
    >>> folder.record([{"round": 0, "accuracy": 0.9}], {"net": model})
    >>> resumed = RunFolder(folder.path, {"rounds": 3}, resume=True)
    >>> resumed.rows, resumed.load_model("net").count_params()
    ([{'round': 0, 'accuracy': 0.9}], 0)
    """

    def __init__(
        self,
        path: str,
        settings: dict[str, Any],
        resume: bool = False,
        defaults: dict[str, Any] | None = None,
    ):
        self.path = os.fspath(path)
        self.settings = json.loads(json.dumps(settings))  # as read back
        self.rows: list[dict[str, Any]] = []
        self.finished = False
        self.finished_before = False  # finished when resumed: only reported
        self.earlier_seconds = 0.0  # wall time of the run's earlier sessions
        self.checkpoints: dict[str, str] = {}  # name -> file in checkpoints/
        self.seed_states: dict[str, list[Any]] = {}
        self.python_random: list[Any] | None = None
        self.started = time.perf_counter()
        recorded = self._read()
        if recorded is not None and not resume:
            state = "a finished" if recorded["finished"] else "an unfinished"
            raise FileExistsError(
                f"{self.path} holds {state} run ({len(recorded['rows'])} rows "
                "recorded). Pass --resume (resume=True) to continue it (a "
                "finished run is then only reported again), or choose another "
                "output folder, or delete this one."
            )
        if recorded is not None and resume:
            before = {**json.loads(json.dumps(defaults or {})), **recorded["settings"]}
            different = {
                key: (value, before.get(key))
                for key, value in self.settings.items()
                if before.get(key) != value
            }
            if different:
                raise ValueError(
                    f"Expected the settings of the run recorded in {self.path} "
                    "to resume it. Received: "
                    + ", ".join(
                        f"{key}={value!r} (the run has {old!r})"
                        for key, (value, old) in different.items()
                    )
                )
            self.rows = recorded["rows"]
            self.finished = recorded["finished"]
            self.finished_before = self.finished
            self.earlier_seconds = recorded["seconds"]
            self.checkpoints = recorded["checkpoints"]
            self.seed_states = recorded["seed_states"]
            self.python_random = recorded["python_random"]
        os.makedirs(os.path.join(self.path, CHECKPOINTS), exist_ok=True)

    def _read(self) -> dict[str, Any] | None:
        path = os.path.join(self.path, PROGRESS)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as file:
                recorded = json.load(file)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Could not read {path} ({error}); it records the run in "
                f"{self.path}. Delete that folder to start over."
            ) from error
        return recorded

    def file(self, name: str) -> str:
        """The path of `name` in the folder."""
        return os.path.join(self.path, name)

    def load_model(self, name: str) -> keras.Model:
        """Loads the model checkpointed as `name` with the last record,
        compiled as it was saved, random-number state included.

        Raises:
            KeyError: If no record saved a model `name`.
        """
        path = os.path.join(self.path, CHECKPOINTS, self.checkpoints[name])
        model = keras.models.load_model(path)
        for variable, state in zip(
            _seed_states(model), self.seed_states[name], strict=True
        ):
            variable.assign(np.asarray(state, variable.dtype))
        return model

    def restore_python_random(self) -> None:
        """Puts Python's `random` back as it was at the last record, so that
        layers made now get the seeds they got in the run that went on."""
        if self.python_random is not None:
            version, state, gauss = self.python_random
            random.setstate((version, tuple(state), gauss))

    def seconds(self) -> float:
        """Wall time of the run so far, over all its sessions, in seconds. A
        run that was finished when resumed is only reported again: its time
        stays what it was."""
        if self.finished_before:
            return self.earlier_seconds
        return self.earlier_seconds + time.perf_counter() - self.started

    def record(
        self,
        rows: list[dict[str, Any]],
        models: dict[str, keras.Model] | None = None,
        finished: bool = False,
    ) -> None:
        """Saves `models`, then writes `rows` to the CSV and the progress file.

        Each model goes to a new checkpoint file, named after the number of
        rows; the progress file then names it, and only then is the one it
        replaces deleted: a job killed at any moment leaves a progress file
        whose checkpoints match its rows.

        Args:
            rows: Every finished round so far, as flat dicts with the same keys.
            models: `{name: model}` to checkpoint with these rows; the
                checkpoints of other names recorded before are kept.
                Defaults to `None` (no new checkpoint).
            finished: Whether the run is complete. Defaults to `False`.
        """
        stale = []
        for name, model in (models or {}).items():
            file_name = f"{name}-{len(rows)}.keras"
            with _replacing(os.path.join(self.path, CHECKPOINTS, file_name)) as part:
                model.save(part)
            if self.checkpoints.get(name, file_name) != file_name:
                stale.append(self.checkpoints[name])
            self.checkpoints[name] = file_name
            # Keras does not save random-number states (keras-team/keras#19796):
            # without them, a resumed run would drop out other units.
            self.seed_states[name] = [
                np.asarray(v).tolist() for v in _seed_states(model)
            ]
        self.rows, self.finished = list(rows), finished
        # Keras draws the seeds of the layers it makes (dropout's generators)
        # from Python's `random`: a run resumed from here restores it, and so
        # builds the same layers as a run that went on.
        version, state, gauss = random.getstate()
        self.python_random = [version, list(state), gauss]
        if rows:
            with _replacing(self.file(CSV)) as partial:
                with open(partial, "w", newline="") as file:
                    writer = csv.DictWriter(file, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
        progress = {
            "settings": self.settings,
            "rows": self.rows,
            "seconds": self.seconds(),
            "finished": finished,
            "checkpoints": self.checkpoints,
            "seed_states": self.seed_states,
            "python_random": self.python_random,
        }
        with _replacing(self.file(PROGRESS)) as partial:
            with open(partial, "w") as file:
                json.dump(progress, file, indent=1)
        for file_name in stale:
            os.remove(os.path.join(self.path, CHECKPOINTS, file_name))


def _seed_states(model: keras.Model) -> list[Any]:
    """The state variables of `model`'s random-number generators (dropout's
    and others'), in a fixed order."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]
