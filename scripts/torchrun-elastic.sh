#!/usr/bin/env bash
# Elastic stage 2: between MIN and MAX machines; run on every machine that should take part.
#
#   HEAD=node01 MIN=2 MAX=4 GPUS=8 scripts/torchrun-elastic.sh CONFIG [key=value ...]
#
# When a machine joins or leaves, torchrun stops the workers with SIGTERM: each rank finishes
# its step and the checkpoint is written (stage 2 exits 143), then torchrun restarts them with
# the new world size (up to --max-restarts times) and they resume from that checkpoint,
# resharded. torchrun gives workers 30 s after SIGTERM before it kills them: keep a step plus a
# checkpoint save under that (multipromot plan, benchmarks/gpu.py), or lose the running step
# and fall back to the last periodic checkpoint (stage2.save_every).
#
# stage2.batch_size is the global batch: it must divide over every world size in MIN..MAX
# (x grad_accum): with 8 GPUs and MIN=2 MAX=4 that is 16, 24 and 32 ranks; 96 divides all three,
# 64 does not divide 24.
set -euo pipefail
: "${HEAD:?set HEAD to the rendezvous host}" "${MIN:=1}" "${MAX:=4}" "${GPUS:=8}" "${PORT:=29500}"
exec torchrun --nnodes="$MIN:$MAX" --nproc_per_node="$GPUS" --max-restarts="${RESTARTS:-10}" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" --rdzv_id="${RDZV_ID:-multipromot}" \
  -m multipromot stage2 "$@"
