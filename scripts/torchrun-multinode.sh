#!/usr/bin/env bash
# Stage 2 on NNODES machines x GPUS GPUs: run this same line on every machine.
#
#   HEAD=node01 NNODES=2 GPUS=8 scripts/torchrun-multinode.sh CONFIG [key=value ...]
#
# torchrun's c10d rendezvous runs on HEAD (any reachable host of the job; port 29500). Each
# rank is one GPU; FSDP2 shards over all NNODES x GPUS ranks (NCCL). Rerun the same command after
# an interruption: stage 2 resumes from out_dir/checkpoints/latest.
set -euo pipefail
: "${HEAD:?set HEAD to the rendezvous host}" "${NNODES:=1}" "${GPUS:=8}" "${PORT:=29500}"
exec torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" --rdzv_id="${RDZV_ID:-multipromot}" \
  -m multipromot stage2 "$@"
