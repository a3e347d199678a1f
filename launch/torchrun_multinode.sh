#!/usr/bin/env bash
# Start recog on several machines with torchrun's c10d rendezvous. Run this same script on every node.
#
#   NNODES=4 NPROC_PER_NODE=8 RDZV_HOST=node0.example RUN_ID=fmnist-001 launch/torchrun_multinode.sh epochs=30
#
# RDZV_HOST: an address of the first node that every node can reach (the rendezvous endpoint).
# RUN_ID:    the same on every node, unique per job (nodes with the same id join the same job).
# Extra arguments go to train.py as Hydra overrides. The run directory must be the same path on every
# node (shared storage), or pass hydra.run.dir=... pointing at one: only rank 0 writes into it.
# Network: set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME to the interface the nodes share (e.g. eth0)
# when the machines have several.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${NNODES:?set NNODES, the number of machines}"
: "${NPROC_PER_NODE:=$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
: "${RDZV_HOST:?set RDZV_HOST, an address of the first node}"
: "${RDZV_PORT:=29500}"
: "${RUN_ID:?set RUN_ID, the same on every node}"

exec torchrun \
  --nnodes="$NNODES" \
  --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" \
  --rdzv-id="$RUN_ID" \
  train.py "$@"
