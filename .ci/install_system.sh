#!/usr/bin/env bash
# Install the system packages CI needs: a single-node Slurm with the PBS/Torque wrappers
# (qsub/qstat/qdel), munge, PostgreSQL 15, the Fashion-MNIST idx files and Chromium (the MLflow UI
# browser test, tests/test_ui_browser.py, drives it through playwright; nothing is downloaded).
# Idempotent: does nothing (no apt-get update either) when everything is already installed.
#
# dataset-fashion-mnist installs gzipped idx files (the original Zalando names) under
# /usr/share/datasets/fashion-mnist/:
#   train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
#   t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
set -euo pipefail

PACKAGES=(slurm-wlm slurm-wlm-torque munge postgresql dataset-fashion-mnist chromium)

if [ "$(id -u)" -ne 0 ]; then
    echo "install_system.sh: must run as root" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_system.sh: all packages already installed"
    exit 0
fi

echo "install_system.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
