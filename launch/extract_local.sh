#!/usr/bin/env bash
# Extract on one host with one process per GPU (each sees only its GPU), then the last to finish merges:
#   launch/extract_local.sh CONFIG WORKDIR [--config.x=y ...]
#   NPROC=4 launch/extract_local.sh configs/qwen2vl_coco.py runs/qwen2vl
# NPROC defaults to the number of GPUs (nvidia-smi -L), 1 without one. Process i writes
# WORKDIR/activations/process-<i>-of-<NPROC>/ and resumes on its own; re-running the same command
# re-runs only unfinished parts. Exit status: the first non-zero one (75 = preempted, re-run).
set -uo pipefail
config=${1:?usage: launch/extract_local.sh CONFIG WORKDIR [overrides]}; workdir=${2:?workdir}; shift 2
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC:-0}" -ge 1 ] || NPROC=1
fi
pids=()
for ((i = 0; i < NPROC; i++)); do
  CUDA_VISIBLE_DEVICES=$i python -m experiments.extract --config="$config" --workdir="$workdir" \
    --config.extract.process_index="$i" --config.extract.process_count="$NPROC" "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
rc=0
for pid in "${pids[@]}"; do
  wait "$pid"; status=$?
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; status=$?; done  # wait returns early on a trap
  if [ "$rc" -eq 0 ] && [ "$status" -ne 0 ]; then rc=$status; fi
done
exit "$rc"
