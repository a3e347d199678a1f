#!/usr/bin/env bash
# GPU benchmark for one NVIDIA GPU (H100/H200): prints one table.
#
#   bash bench/gpu.sh                  # about 3.5 minutes, at most 5 (a global time guard skips what would not fit)
#   bash bench/gpu.sh --quick          # smoke test in ~1-2 minutes; runs on CPU when there is no GPU
#   bash bench/gpu.sh --log-dir DIR    # where each case's output and table.md go (default bench/results/gpu-<time>)
#
# Measures (details in bench/gpu.py's docstring):
#   - ResNet-50 training images/s, 224x224 synthetic data on the GPU, batch 128: fp32 (TF32 off, the
#     baseline), fp32 with TF32, bf16 autocast + channels_last, and the same under torch.compile;
#   - recog's shard loader (ShardStream + make_loader) images/s with 4, 8 and 12 workers.
# Each case runs in its own process with a time limit; a failing case prints "failed: <reason>" in its row.
# Without a GPU (and without --quick) it stops at once with a one-sentence error.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=.venv/bin/python
[ -x "$PYTHON" ] || PYTHON=python3

# The GPU cases need few CPU threads and data-loader workers use one each (DataLoader sets that);
# the --quick run on CPU computes with these threads. At most 8, unless the caller set it.
cores=$(nproc)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores < 8 ? cores : 8 ))}"
export PYTHONUNBUFFERED=1

exec "$PYTHON" bench/gpu.py "$@"
