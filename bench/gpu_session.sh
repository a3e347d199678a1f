#!/usr/bin/env bash
# Everything a lent one-GPU machine should run, in one go (about 7 minutes, at most 9):
#   1. the default job on the GPU under torchrun (NCCL with gloo beside it for CPU tensors, pinned memory,
#      batches normalised on the GPU): its top-1 and images/s;
#   2. preemption on the GPU: SIGTERM to torchrun mid-epoch, exit code 75, the same command continues;
#   3. bench/gpu.sh: ResNet-50 training images/s (fp32, TF32, bf16 + channels_last, + compile) and the
#      shard loader's images/s;
#   4. train.py's GPU-only knobs for 2 epochs each: fp16 + gradient scaler + channels_last, bf16 + compile.
#
#   bash bench/gpu_session.sh OUT_DIR
#   PARTS=24 bash bench/gpu_session.sh OUT_DIR   # only parts 2 and 4
#
# A machine without recog's dependencies installed gets them from wheels in .whl/ (pure-Python wheels of
# hydra-core, omegaconf, antlr4-python3-runtime, webdataset, braceexpand, pytorch-metric-learning),
# installed into /tmp/site. Each part prints its result and goes on if another part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/recog-gpu-session}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
export PYTHONUNBUFFERED=1
nvidia-smi -L
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
torchrun=("$py" -m torch.distributed.run --standalone --nproc_per_node=1 train.py)

parts=${PARTS:-1234}
if [[ $parts == *1* ]]; then
echo "== 1. the default job (10 epochs of the bundled 10k images), one GPU"
start=$(date +%s)
timeout 240 "${torchrun[@]}" data.num_workers=4 hydra.run.dir="$out/job" > "$out/job.log" 2>&1
echo "rc=$? in $(( $(date +%s) - start )) s"
grep -E "world size|epoch (1|5|10)/|done:|error" "$out/job.log"
fi

if [[ $parts == *2* ]]; then
echo "== 2. SIGTERM mid-epoch, then the same command again"
rm -rf "$out/preempt"
args=(epochs=3 data.num_workers=4 checkpoint.every_steps=10 hydra.run.dir="$out/preempt")
"${torchrun[@]}" "${args[@]}" > "$out/preempt1.log" 2>&1 &
pid=$!
for _ in $(seq 1200); do [ -e "$out/preempt/checkpoints/step-000000050.pt" ] && break; sleep 0.05; done
kill -TERM $pid
wait $pid
grep -E "stopping on|preempted|exitcode" "$out/preempt1.log"
timeout 120 "${torchrun[@]}" "${args[@]}" > "$out/preempt2.log" 2>&1
echo "second run rc=$?"
grep -E "resumed from|epoch 3/3|done:|error" "$out/preempt2.log"
fi

if [[ $parts == *3* ]]; then
echo "== 3. bench/gpu.sh"
timeout 330 bash bench/gpu.sh --log-dir "$out/bench"
echo "bench rc=$?"
fi

if [[ $parts == *4* ]]; then
echo "== 4. GPU-only knobs through train.py"
for knobs in "perf.precision=fp16 perf.channels_last=true" "perf.precision=bf16 perf.channels_last=true perf.compile=true"; do
  name=$(echo "$knobs" | tr ' =.' '_--')
  timeout 150 "${torchrun[@]}" epochs=2 data.num_workers=4 $knobs hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1
  echo "$knobs: rc=$?"
  grep -E "epoch 2/2|error" "$out/$name.log"
done
fi
