"""MLproject entry point `demo`: the same as `kd demo`, attached to the run `mlflow run` created."""

import sys

from kd.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
