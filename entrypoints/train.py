"""MLproject entry point `train`: the same as `kd train`, attached to the run `mlflow run` created."""

import sys

from kd.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
