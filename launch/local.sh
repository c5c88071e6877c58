#!/usr/bin/env bash
# Train on this machine's devices. Usage: launch/local.sh CONFIG WORKDIR [--config.x=y ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides]}; workdir=${2:?workdir}; shift 2
exec python -m experiments.train --config="$config" --workdir="$workdir" "$@"
