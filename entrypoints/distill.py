"""MLproject entry point `distill`: the same as `kd distill`, attached to the run `mlflow run` created."""

import sys

from kd.cli import main

sys.exit(main(["distill", *sys.argv[1:]]))
