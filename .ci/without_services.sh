#!/usr/bin/env bash
# Run a command as on a fresh machine: the scheduler, database and browser commands hidden from
# PATH and CI's service variables unset. The README's test command must pass like this, so a test
# that needs Slurm, PostgreSQL or Chromium without checking for it fails in CI.
# Usage: bash .ci/without_services.sh COMMAND [ARGS...]   (give COMMAND as an absolute path if it
# lives in a venv: a venv's python found through a symlink elsewhere does not know its venv)
set -euo pipefail

HIDDEN=" sbatch squeue sinfo scancel scontrol srun salloc qsub qstat qdel psql pg_ctl pg_ctlcluster \
postgres initdb chromium chromium-browser google-chrome "

bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
IFS=: read -ra dirs <<< "$PATH"
for dir in "${dirs[@]}"; do
    for cmd in "$dir"/*; do
        name=${cmd##*/}
        # the first hit on PATH wins, as in a lookup; hidden names and non-executables are left out
        if [[ -f $cmd && -x $cmd && ! -e $bin/$name && $HIDDEN != *" $name "* ]]; then
            ln -s "$cmd" "$bin/$name"
        fi
    done
done
PATH=$bin env -u KD_TEST_POSTGRES_URI -u KD_TEST_SLURM -u KD_FASHION_MNIST_DIR "$@"
