#!/usr/bin/env bash
# Start recog on several machines with torchrun's c10d rendezvous. Run this same script on every node.
#
#   NNODES=4 NPROC_PER_NODE=8 RDZV_HOST=10.0.0.1 RUN_ID=fmnist-001 launch/torchrun_multinode.sh epochs=30
#
# RDZV_HOST:     an address of the first node that every node can reach (the rendezvous endpoint).
# RDZV_PORT:     29500 unless set; it must be open between the nodes.
# RUN_ID:        the same on every node, unique per job (nodes with the same id join the same job).
# RUN_DIR:       outputs/$RUN_ID unless set. It must be ONE folder every node sees (shared storage):
#                rank 0 writes into it, and a restarted or requeued job continues from its checkpoints.
# MAX_RESTARTS:  3 unless set: torchrun restarts every worker this many times when one fails.
# MIN_NNODES:    elastic: go on with as few as this many machines when others are lost (--nnodes=MIN:NNODES);
#                give global_batch= so that each step keeps its images on any number of them.
# LOCAL_ADDR:    this node's address as the others reach it, when its host name does not resolve to that
#                (containers, network namespaces); passed as --local-addr.
# RDZV_IS_HOST:  set to 1 on the first node when its host name does not resolve to RDZV_HOST (torchrun
#                decides who serves the rendezvous by comparing them); passed as --rdzv-conf=is_host=1.
# Extra arguments go to train.py as Hydra overrides.
# Network: with several interfaces per machine set NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME to the one
# the nodes share (e.g. eth0); recog's gloo traffic otherwise may pick an address the others cannot reach.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${NNODES:?set NNODES, the number of machines}"
: "${NPROC_PER_NODE:=$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
: "${RDZV_HOST:?set RDZV_HOST, an address of the first node}"
: "${RDZV_PORT:=29500}"
: "${RUN_ID:?set RUN_ID, the same on every node}"
: "${RUN_DIR:=outputs/$RUN_ID}"
: "${MAX_RESTARTS:=3}"
: "${TORCHRUN:=torchrun}"

exec $TORCHRUN \
  --nnodes="${MIN_NNODES:+$MIN_NNODES:}$NNODES" \
  --nproc_per_node="$NPROC_PER_NODE" \
  --max-restarts="$MAX_RESTARTS" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" \
  --rdzv-id="$RUN_ID" \
  ${LOCAL_ADDR:+--local-addr="$LOCAL_ADDR"} \
  ${RDZV_IS_HOST:+--rdzv-conf=is_host="$RDZV_IS_HOST"} \
  train.py hydra.run.dir="$RUN_DIR" "$@"
