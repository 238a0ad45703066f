#!/usr/bin/env bash
# A wheel that works: build kd's wheel, install it (not editable) into a fresh venv and render PBS,
# Slurm and local job scripts from it in a folder outside the checkout, so the templates can only
# come from the installed package. The dependencies (torch, mlflow, ...) come from the active
# environment's site-packages through a .pth file, added after the install so pip never sees its kd;
# a .pth line is a plain sys.path entry, so that environment's editable kd finder is not loaded.
set -euo pipefail
unset PYTHONPATH

cd "$(dirname "$0")/.."
repo=$PWD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python -m pip wheel -q --no-deps -w "$tmp/dist" .
cd "$tmp"  # from here on the checkout (and its kd.egg-info) is not on sys.path
python -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --no-deps "$tmp"/dist/kd-*.whl
deps=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
wheel_site=$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" >"$wheel_site/zz-kd-deps.pth"

KD_REPO="$repo" "$tmp/venv/bin/python" - <<'PY'
import os
import subprocess
import sys
import sysconfig

import kd
import kd.cluster.templates as templates
from kd.cluster.schedulers import get_scheduler
from kd.cluster.templates import JobSettings

site, repo = sysconfig.get_paths()["purelib"], os.environ["KD_REPO"]
assert list(kd.__path__) == [os.path.join(site, "kd")], f"kd comes from {kd.__path__}, not the wheel in {site}"
assert templates.__file__.startswith(site + os.sep), templates.__file__
assert repo not in {os.path.abspath(p) for p in sys.path if p}, sys.path  # the checkout's sources are not importable
print(f"kd from the wheel: {templates.__file__}")
s = JobSettings(venv="/opt/kd-venv", workdir="/scratch/kd", data_root="/data", jobs_dir="/scratch/jobs",
                queue="gpu", partition="gpu").resolved()
for kind, header in (("pbs", "#PBS -l walltime=02:00:00"), ("slurm", "#SBATCH --time=02:00:00"), ("local", "")):
    argv = ["kd", "job", "--run-id", "ab" * 16]
    script = get_scheduler(kind).script(s, "kd-wheel", argv, {"OMP_NUM_THREADS": "8"})
    assert header in script and script.rstrip().endswith("exec kd job --run-id " + "ab" * 16), script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    print(f"{kind}: {len(script.splitlines())} lines rendered from the wheel's templates")
PY
