#!/usr/bin/env bash
# TPU pod slice: run the same command on every host (jax finds the pod topology itself).
#   launch/tpu_pod.sh my-tpu us-central2-b configs/qwen2vl_coco.py gs://bucket/runs/qwen2vl
# The workdir must be reachable from every host (GCS path or shared filesystem).
set -euo pipefail
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/sae-jax && python -m experiments.train --config=$config --workdir=$workdir \
  --config.mesh.multihost=True $*"
