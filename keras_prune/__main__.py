"""`python -m keras_prune ...` runs the `keras-prune` command line."""

from keras_prune.cli import entry

entry()
