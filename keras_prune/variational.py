"""Sparse variational dropout: a learned noise level per weight, to rank by.

Molchanov et al. 2017 ("Variational Dropout Sparsifies Deep Neural
Networks", arXiv:1701.05369) train each weight as a Gaussian, `w = theta +
sigma * eps`, with a log-uniform prior: the training loss gains a KL term
that pushes `alpha = sigma^2 / theta^2` up wherever the data loss allows.
A weight with a large `alpha` is mostly noise, and dropping it costs little;
their LeNet-5 keeps 0.36% of its weights at 0.75% test error (Han et
al.'s magnitude pruning kept 8%, Dynamic Network Surgery 0.9%).

Here the noise is an add-on to a masked layer, for one training phase:

- `add_variational_dropout(model, examples)` gives each masked `Dense`,
  `EinsumDense` and convolution layer a child layer, `VariationalNoise`,
  holding a trainable `log_sigma2` of each prunable weight's shape;
- while training, such a layer computes its output with the local
  reparameterization trick (Kingma et al. 2015, arXiv:1506.02557): the
  pre-activation is drawn from `N(op(x, theta * mask), op(x^2, sigma^2 *
  mask))`, one draw per output, and the layer adds the KL term of its live
  weights, divided by `examples`, to the model's losses. Outside training
  it computes exactly what the masked layer computes (`theta * mask`);
- `IterativePruningCallback(ranking="signal_to_noise")` then prunes the
  live weights with the smallest `|theta| / sigma` (the largest `alpha`),
  on the usual schedules;
- `remove_variational_dropout(model)` takes the noise away again, to
  retrain the pruned network without it.

A model with the noise attached saves and loads as one (its layers' configs
carry `"variational_dropout"`, the noise variables their values), so a
long job resumes in the middle of the phase.

Reference:
    Molchanov, Ashukha & Vetrov 2017, arXiv:1701.05369 (the KL
    approximation's constants k1, k2, k3 are theirs); Kingma, Salimans &
    Welling 2015, arXiv:1506.02557.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_prune.masking import (  # noqa: F401 - MaskedDense: doctests
    MaskedDense,
    MaskedLayer,
    _Hidden,
    _unlocked,
    masked_layers,
    stock_class,
)
from keras_prune.masks import check_finite

__all__ = [
    "LOCAL_REPARAMETERIZATION",
    "VariationalNoise",
    "add_variational_dropout",
    "kl_divergence",
    "log_alpha",
    "remove_variational_dropout",
    "signal_to_noise",
]

_L = keras.layers

#: Layer classes whose output is linear in their kernel before the bias and
#: activation, so that the local reparameterization applies to them.
LOCAL_REPARAMETERIZATION: tuple[type, ...] = (
    _L.Dense,
    _L.EinsumDense,
    _L.Conv1D,
    _L.Conv2D,
    _L.Conv3D,
    _L.Conv1DTranspose,
    _L.Conv2DTranspose,
    _L.Conv3DTranspose,
    _L.DepthwiseConv1D,
    _L.DepthwiseConv2D,
)

# Molchanov et al.'s fit of the KL divergence from the log-uniform prior.
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695
# log(alpha) is clipped to this range, as in their code: beyond it the
# weight is all noise (or none) and the KL term is flat.
LOG_ALPHA_RANGE = (-10.0, 10.0)
_EPSILON = 1e-8


def log_alpha(weight: Any, log_sigma2: Any) -> Any:
    """`log(sigma^2 / weight^2)`, clipped to `LOG_ALPHA_RANGE`.

    Args:
        weight: The weights' means `theta`, any shape (a tensor or array).
        log_sigma2: `log(sigma^2)` of the same shape.

    Returns:
        A tensor of that shape: the log of each weight's dropout rate
        `alpha` (`alpha = p / (1 - p)` for Gaussian dropout of rate `p`).

    Example:

    >>> [round(float(v), 3) for v in log_alpha(np.array([0.1, 0.01]),
    ...                                        np.array([0.0, 0.0]))]
    [4.605, 9.21]
    """
    value = ops.subtract(log_sigma2, ops.log(ops.square(weight) + _EPSILON))
    return ops.clip(value, *LOG_ALPHA_RANGE)


def kl_divergence(log_alpha_value: Any) -> Any:
    """Each weight's KL divergence from the log-uniform prior, approximated.

    `-KL ~= k1 * sigmoid(k2 + k3 * log_alpha) - log1p(1 / alpha) / 2 - k1`
    (Molchanov et al. 2017, eq. 14): about 0 for a weight that is all noise,
    growing as `alpha` falls, so minimizing it raises every `alpha` the data
    loss does not hold down.

    Args:
        log_alpha_value: `log_alpha(...)`, any shape.

    Returns:
        A tensor of that shape, in nats.

    Example:

    >>> [round(float(v), 3) for v in kl_divergence(np.array([-4.0, 0.0, 8.0]))]
    [2.634, 0.431, 0.0]
    """
    sigmoid = ops.sigmoid(_K2 + _K3 * log_alpha_value)
    softplus = ops.log1p(ops.exp(-log_alpha_value))
    return -(_K1 * sigmoid - 0.5 * softplus - _K1)


@contextlib.contextmanager
def _attributes(layer: Any, **values: Any) -> Iterator[None]:
    """Sets attributes of `layer` for the duration of the block, untracked."""
    saved = {name: vars(layer)[name] for name in values}
    try:
        for name, value in values.items():
            object.__setattr__(layer, name, value)
        yield
    finally:
        for name, value in saved.items():
            object.__setattr__(layer, name, value)


class VariationalNoise(keras.layers.Layer):
    """The learned noise of one masked layer: a trainable `log_sigma2` per
    prunable weight, and the noisy forward pass.

    Made by `add_variational_dropout`, held by the masked layer as
    `variational_dropout`; not used alone.

    Args:
        targets: `{key: variable}`, the masked layer's prunable weights.
        examples: Training examples per epoch, `N`: the KL term is divided by
            it, as the expected log-likelihood is a mean over examples.
        initial_log_sigma2: Starting `log(sigma^2)` of every weight.
            Defaults to `-10.0` (`sigma` about 0.007: a trained network
            starts nearly noiseless).
        seed: Seed of the noise. Defaults to `None`.
        **kwargs: Base layer arguments.

    Attributes:
        log_sigma2: `{key: variable}`, each the shape of its weight.
    """

    def __init__(
        self,
        targets: dict[str, Any],
        examples: int,
        initial_log_sigma2: float = -10.0,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.examples = int(examples)
        self.initial_log_sigma2 = float(initial_log_sigma2)
        self.log_sigma2 = {
            key: self.add_weight(
                name=f"{key}_log_sigma2",
                shape=tuple(variable.shape),
                initializer=keras.initializers.Constant(self.initial_log_sigma2),
                dtype=variable.dtype,
                autocast=False,  # read in full precision under mixed precision
            )
            for key, variable in targets.items()
        }
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.built = True

    def settings(self) -> dict[str, Any]:
        """What `add_variational_dropout` was given (the layer config's
        `"variational_dropout"` entry)."""
        return {
            "examples": self.examples,
            "initial_log_sigma2": self.initial_log_sigma2,
            "seed": self.seed,
        }

    def noisy_call(
        self, layer: Any, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """The training output of `layer` (its stock `call` is `call`): mean
        and variance of the pre-activation from two calls of the stock code,
        one Gaussian draw, then the activation; adds the KL term. The
        variance is computed in float32 whatever the layer's compute dtype
        (`sigma^2` can be far below float16's smallest normal number)."""
        masks = layer.masks
        inputs, rest = args[0], args[1:]
        activation, bias = layer.activation, vars(layer).get("bias")
        # Both calls run without the bias and the activation, added after
        # the noise. (With the bias in the mean, oneDNN's graph rewrite of
        # MatMul + bias + Add + Relu fails and logs errors, in TF 2.21.)
        no_bias: dict[str, Any] = {"activation": None, "bias": None}
        if "use_bias" in vars(layer):
            no_bias["use_bias"] = False
        with _attributes(layer, **no_bias):
            with layer.masked_weights():
                mean = call(layer, inputs, *rest, **kwargs)
            variances = {
                key: ops.multiply(
                    ops.exp(ops.cast(self.log_sigma2[key].value, "float32")),
                    ops.cast(masks[key].value, "float32"),
                )
                for key in self.log_sigma2
            }
            with layer.masked_weights(variances):
                variance = call(
                    layer, ops.square(ops.cast(inputs, "float32")), *rest, **kwargs
                )
        deviation = ops.cast(ops.sqrt(ops.abs(variance) + _EPSILON), mean.dtype)
        noise = keras.random.normal(
            ops.shape(mean), dtype=mean.dtype, seed=self.seed_generator
        )
        outputs = ops.add(mean, ops.multiply(deviation, noise))
        if bias is not None and getattr(layer, "use_bias", True):
            if getattr(layer, "data_format", None) == "channels_first":
                bias = ops.reshape(bias, (1, -1) + (1,) * (len(mean.shape) - 2))
            outputs = ops.add(outputs, ops.cast(bias, outputs.dtype))
        self.add_loss(self.kl_loss(layer))
        return outputs if activation is None else activation(outputs)

    def kl_loss(self, layer: Any) -> Any:
        """Sum of the KL terms of `layer`'s live weights, divided by
        `examples`: this layer's share of the loss, per example."""
        total = 0.0
        for key, variable in layer.prunable_weights.items():
            # In float32: under float16, log(theta^2 + 1e-8) has an infinite
            # gradient at pruned (zero) weights.
            weight = ops.cast(variable.value, "float32")
            log_sigma2 = ops.cast(self.log_sigma2[key].value, "float32")
            terms = kl_divergence(log_alpha(weight, log_sigma2))
            mask = ops.cast(layer.masks[key].value, "float32")
            total = total + ops.sum(ops.multiply(terms, mask))
        return total / self.examples


def _noise_of(layer: Any) -> VariationalNoise | None:
    held = vars(layer).get("_variational_noise")
    return None if held is None else held.value


def attach(
    layer: MaskedLayer,
    examples: int,
    initial_log_sigma2: float = -10.0,
    seed: int | None = None,
) -> VariationalNoise:
    """Gives one built masked layer its `VariationalNoise` (see
    `add_variational_dropout`, which checks the arguments)."""
    noise = VariationalNoise(
        layer.prunable_weights,
        examples,
        initial_log_sigma2,
        seed,
        name="variational_dropout",
        dtype=layer.dtype_policy,
    )
    with _unlocked(layer):
        layer.variational_dropout = noise
    object.__setattr__(layer, "_variational_noise", _Hidden(noise))
    return noise


def detach(layer: MaskedLayer) -> bool:
    """Takes `layer`'s `VariationalNoise` away; `False` if it had none."""
    noise = _noise_of(layer)
    if noise is None:
        return False
    with _unlocked(layer):
        if noise in layer._layers:
            layer._layers.remove(noise)
        delattr(layer, "variational_dropout")
    object.__delattr__(layer, "_variational_noise")
    return True


def add_variational_dropout(
    model: keras.layers.Layer,
    examples: int,
    initial_log_sigma2: float = -10.0,
    seed: int | None = None,
) -> list[str]:
    """Gives the masked layers of `model` sparse variational dropout, in place.

    Each masked layer of a class in `LOCAL_REPARAMETERIZATION` (`Dense`,
    `EinsumDense`, convolutions, transposed and depthwise convolutions)
    gets a trainable `log_sigma2` per prunable weight (a `VariationalNoise`
    child layer). In training calls its output is then drawn with the local
    reparameterization trick and its live weights' KL term, over `examples`,
    joins the model's losses (`model.losses`, added by `fit` to the
    compiled loss); other calls compute exactly what they computed before.
    Masked layers of other classes (separable convolutions, embeddings,
    recurrent layers) are left without noise, with a warning that names
    them: their output is not linear in one kernel.

    Compile after this call (the optimizer must see the new variables), and
    use `IterativePruningCallback(ranking="signal_to_noise")` to prune by
    the learned noise. The model saves and loads with its noise. With a
    weight-decaying optimizer (AdamW), exclude the noise from the decay,
    which would pull every `log_sigma2` towards 0:
    `optimizer.exclude_from_weight_decay(var_names=["log_sigma2"])`.

    Args:
        model: A model or layer holding masked layers (`make_prunable`).
        examples: Training examples per epoch, `N` in the variational lower
            bound (the KL term is divided by it): for `fit` on arrays, their
            length. An int >= 1.
        initial_log_sigma2: Starting `log(sigma^2)` of every weight.
            Defaults to `-10.0`, nearly noiseless (right for a trained
            network).
        seed: Seed of the noise: the i-th layer given noise draws from
            `seed + i`. Defaults to `None` (unseeded).

    Returns:
        The names of the layers given noise.

    Raises:
        ValueError: If `examples` is not an int >= 1, `initial_log_sigma2`
            is not finite, `model` has no masked layer of a covered class,
            or a layer has noise already.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), MaskedDense(3, name="fc")])
    >>> add_variational_dropout(model, examples=100)
    ['fc']
    >>> sorted(model.layers[0].variational_dropout.log_sigma2)
    ['kernel']

    Reference:
        Molchanov et al. 2017, arXiv:1701.05369.
    """
    if isinstance(examples, bool) or not isinstance(examples, int | np.integer):
        raise ValueError(
            "Expected `examples` (training examples per epoch) to be an int "
            f">= 1. Received: examples={examples!r}"
        )
    if examples < 1:
        raise ValueError(
            "Expected `examples` (training examples per epoch) >= 1. "
            f"Received: examples={examples!r}"
        )
    if not math.isfinite(float(initial_log_sigma2)):
        raise ValueError(
            "Expected `initial_log_sigma2` to be finite. Received: "
            f"initial_log_sigma2={initial_log_sigma2!r}"
        )
    layers = masked_layers(model)
    covered = [
        layer
        for layer in layers
        if issubclass(stock_class(type(layer)), LOCAL_REPARAMETERIZATION)
    ]
    if not covered:
        raise ValueError(
            "Expected `model` to hold masked Dense, EinsumDense or convolution "
            f"layers (make_prunable). Received: {model.name!r} with masked layers "
            f"{[layer.name for layer in layers]}"
        )
    noisy = [layer.name for layer in covered if _noise_of(layer) is not None]
    if noisy:
        raise ValueError(
            f"Layers {noisy} have variational dropout already; call "
            "remove_variational_dropout first to start again."
        )
    left = [layer.name for layer in layers if layer not in covered]
    if left:
        import warnings

        warnings.warn(
            f"Variational dropout covers layers whose output is linear in one "
            f"kernel; these masked layers get no noise: {left}",
            stacklevel=2,
        )
    for index, layer in enumerate(covered):
        # Each layer its own seed: with one, same-shaped layers draw the same noise.
        own_seed = None if seed is None else seed + index
        attach(layer, int(examples), float(initial_log_sigma2), own_seed)
    return [layer.name for layer in covered]


def remove_variational_dropout(model: keras.layers.Layer) -> list[str]:
    """Takes the noise of `add_variational_dropout` away again, in place.

    The layers keep their weights (`theta`) and masks and compute as plain
    masked layers; their `log_sigma2` variables are dropped. Compile again
    before training (the optimizer tracked the dropped variables).

    Args:
        model: A model or layer holding masked layers.

    Returns:
        The names of the layers whose noise was removed (none: `[]`).

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), MaskedDense(3, name="fc")])
    >>> _ = add_variational_dropout(model, examples=100)
    >>> remove_variational_dropout(model)
    ['fc']
    >>> hasattr(model.layers[0], "variational_dropout")
    False
    """
    return [layer.name for layer in masked_layers(model) if detach(layer)]


def signal_to_noise(layer: Any) -> dict[str, np.ndarray]:
    """`|theta| / sigma` of each prunable weight of a layer with variational
    dropout: the ranking score of `IterativePruningCallback(ranking=
    "signal_to_noise")`, `exp(-log_alpha / 2)` without the clipping.

    Raises:
        ValueError: If `layer` has no variational dropout, or a ratio is NaN or
            infinite (a NaN weight, or a `log_sigma2` below about -177), naming
            the layer.

    Example:

    >>> layer = MaskedDense(1)
    >>> _ = layer(np.ones((1, 2)))
    >>> _ = add_variational_dropout(keras.Sequential([layer]), examples=10)
    >>> _ = layer.kernel.assign([[2.0], [-0.5]])
    >>> np.round(signal_to_noise(layer)["kernel"].ravel(), 1)
    array([296.8,  74.2], dtype=float32)
    """
    noise = _noise_of(layer)
    if noise is None:
        raise ValueError(
            f"Layer {getattr(layer, 'name', layer)!r} has no variational dropout "
            "to rank by signal-to-noise; give the model add_variational_dropout "
            "or rank by magnitude."
        )
    ratios = {}
    for key, variable in layer.prunable_weights.items():
        with np.errstate(over="ignore"):
            ratio = np.abs(ops.convert_to_numpy(variable)) * np.exp(
                -0.5 * ops.convert_to_numpy(noise.log_sigma2[key])
            )
        ratios[key] = check_finite(
            ratio, f"the signal-to-noise ratios of the {key} of layer {layer.name!r}"
        )
    return ratios
