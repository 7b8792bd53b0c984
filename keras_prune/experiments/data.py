"""MNIST loading: keras.datasets by default, a local npz for offline use."""

from __future__ import annotations

import os

import numpy as np

Arrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def load_mnist(path: str | os.PathLike | None = None) -> Arrays:
    """Loads MNIST as `((x_train, y_train), (x_test, y_test))`, raw uint8.

    Args:
        path: An `.npz` file in Keras's layout (`x_train`, `y_train`,
            `x_test`, `y_test`), or `None` to download through
            `keras.datasets.mnist`. Defaults to `None`.

    Returns:
        The four arrays, exactly as `keras.datasets.mnist.load_data()`.

    Raises:
        FileNotFoundError: If `path` is given but is not a file.
        ValueError: If the file is not an .npz or lacks one of the four arrays.
        RuntimeError: If `path` is `None` and the download fails.

    Example:

    >>> (x_train, y_train), _ = load_mnist("../shared/data/mnist.npz")  # doctest: +SKIP
    >>> x_train.shape  # doctest: +SKIP
    (60000, 28, 28)
    """
    if path is None:
        import keras

        try:
            return keras.datasets.mnist.load_data()
        except Exception as error:
            raise RuntimeError(
                "Could not download MNIST through keras.datasets.mnist "
                f"({type(error).__name__}: {error}). Without internet, pass a "
                "local copy in Keras's npz layout: `--data PATH` on the command "
                "line, or `data=PATH` in Python."
            ) from error
    check_path(path)
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(
            "Expected `data` to be an .npz file in Keras's MNIST layout. "
            f"Received: data={str(path)!r}, which numpy cannot read as one"
        ) from error
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise ValueError(
            "Expected `data` to be an .npz file in Keras's MNIST layout. "
            f"Received: data={str(path)!r}, a single .npy array"
        )
    with arrays:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays.files)
        if missing:
            raise ValueError(
                f"Expected `data` to hold x_train, y_train, x_test and y_test. "
                f"Received: data={str(path)!r}, missing {sorted(missing)}"
            )
        return (arrays["x_train"], arrays["y_train"]), (
            arrays["x_test"],
            arrays["y_test"],
        )


def check_path(path: str | os.PathLike | None) -> None:
    """Raises `FileNotFoundError` unless `path` is `None` or a file.

    Example:

    >>> check_path(None)
    """
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(
            "Expected `data` to be an .npz file in Keras's MNIST layout, or None "
            f"to download with keras.datasets.mnist. Received: data={str(path)!r}, "
            "which is not a file"
        )


def preprocess(images: np.ndarray) -> np.ndarray:
    """Scales uint8 images to float32 in [0, 1] with a channel axis.

    Example:

    >>> preprocess(np.full((2, 28, 28), 255, np.uint8)).shape
    (2, 28, 28, 1)
    """
    return (images.astype("float32") / 255.0)[..., None]
