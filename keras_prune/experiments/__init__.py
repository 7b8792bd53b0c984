"""Experiments built on keras_prune: the MNIST reproduction of the seed report."""
