"""MLproject entry point `tune`: the same as `kd tune`; the run `mlflow run` created becomes the study's run."""

import sys

from kd.cli import main

sys.exit(main(["tune", *sys.argv[1:]]))
