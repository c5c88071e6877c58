#!/usr/bin/env bash
# TPU pod slice: run the same command on every host (jax finds the pod topology itself).
#   launch/tpu_pod.sh my-tpu us-central2-b configs/qwen2vl_coco.py gs://bucket/runs/qwen2vl
# The workdir must be reachable from every host (gs:// path, which needs `pip install gcsfs
# google-cloud-storage` on the hosts, or a shared filesystem).
# Preemption: a maintenance event or `kill -TERM` makes every host save at the same step and exit
# 75; a lost ssh connection (the host restarted) exits 255; a host whose process died outright
# (137) ends the others with 75 (their next collective fails) or 134 (jax's coordination service,
# after config.mesh.heartbeat_timeout_s). All of these re-run the same command, which resumes from
# the newest checkpoint, up to MAX_RESTARTS times; any other failure (1: a diverged loss, a bad
# config value; every host prints one `error:` line) ends the loop.
set -uo pipefail
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
PREEMPTED=75  # sae_jax.preemption.PREEMPTED_EXIT_CODE
max_restarts=${MAX_RESTARTS:-20}
for attempt in $(seq 0 "$max_restarts"); do
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
    cd ~/sae-jax && python -m experiments.train --config=$config --workdir=$workdir \
    --config.mesh.multihost=True $*"
  rc=$?
  case "$rc" in
    "$PREEMPTED" | 255 | 134 | 137) ;;
    *) exit "$rc" ;;
  esac
  echo "sae-jax: exit $rc (preempted or a process lost), restart $((attempt + 1))/$max_restarts in 60 s" >&2
  sleep 60
done
exit "$rc"
