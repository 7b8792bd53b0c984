"""Shared pytest set-up: quiet TensorFlow and give doctests `np` and `keras`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["np"] = np
    doctest_namespace["keras"] = keras


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
