"""`python -m keras_prune ...` runs the `keras-prune` command line."""

import sys

from keras_prune.cli import main

sys.exit(main())
