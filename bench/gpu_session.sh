#!/usr/bin/env bash
# Everything a lent one-GPU machine should run, in one go, within 10 minutes (SESSION_S=570 seconds by default:
# each part runs only if the time it may take is still left, else it prints "skipped"), most important first:
#   1. the default job on the GPU under torchrun (NCCL with gloo beside it for CPU tensors, pinned memory,
#      batches normalised on the GPU): its top-1 and images/s;
#   2. preemption on the GPU: SIGTERM to torchrun mid-epoch, exit code 75, the same command continues;
#   5. data.decode=gpu against cpu on 500x375 JPEGs with 16 loader workers: the loader's images/s
#      (bench/gpu_decode.py), then one epoch of ResNet-50 bf16 + channels_last training with each: its images/s
#      and data wait (the share of step time spent waiting for batches);
#   8. a timm backbone (issue 31) on part 5's JPEGs, one epoch each: timm:convnext_tiny bf16 + channels_last with
#      the defaults, then with the photo recipe (augment=photo, layer decay, EMA, mixup + cutmix, clipping): images/s;
#   7. model.classifier=sharded on one GPU for 2 epochs each (NCCL, world size 1): exact, and Partial FC 0.5 + bf16;
#   9. serving on the GPU (issue 32): part 1's model exported, its gallery indexed, recog.serve --device cuda
#      against LitServe on the same GPU at 1, 8 and 32 clients (bench/serve_peers.py): requests/s, p50/p99;
#   6. hostile input on the GPU paths (issue 27): JPEGs in each of the 8 EXIF orientations decode upright with
#      data.decode=gpu (tests/test_decode.py, the device's decoder handing them to the CPU path);
#   4. train.py's GPU-only knobs for 2 epochs each: fp16 + gradient scaler + channels_last, bf16 + compile;
#   3. bench/gpu.sh with the time left: ResNet-50 training images/s (fp32, TF32, bf16 + channels_last,
#      + compile) and the shard loader's images/s.
#
#   bash bench/gpu_session.sh OUT_DIR
#   PARTS=24 bash bench/gpu_session.sh OUT_DIR   # only parts 2 and 4 (in that order)
#   PARTS=58 bash bench/gpu_session.sh OUT_DIR   # data.decode=gpu against cpu, then timm on its JPEGs
#   SESSION_S=900 bash bench/gpu_session.sh OUT_DIR  # a longer session: nothing skipped for time
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

parts=${PARTS:-125879643}
session_start=$(date +%s)
left() { echo $(( ${SESSION_S:-570} - ($(date +%s) - session_start) )); }
# due N SECONDS: part N was asked for, and the SECONDS it may take are still left (else one line says it is skipped)
due() {
  [[ $parts == *$1* ]] || return 1
  if (( $(left) < $2 )); then echo "== $1. skipped: it needs about $2 s, $(left) s of SESSION_S are left"; return 1; fi
}
# cap SECONDS: a command's time limit, SECONDS or what is left of the session (less 5 s), whichever is less
cap() { local l=$(( $(left) - 5 )); (( l < 1 )) && l=1; echo $(( l < $1 ? l : $1 )); }

part1() {
echo "== 1. the default job (10 epochs of the bundled 10k images), one GPU"
start=$(date +%s)
timeout $(cap 240) "${torchrun[@]}" data.num_workers=4 hydra.run.dir="$out/job" > "$out/job.log" 2>&1
echo "rc=$? in $(( $(date +%s) - start )) s"
grep -E "world size|epoch (1|5|10)/|done:|error" "$out/job.log"
}

part2() {
echo "== 2. SIGTERM mid-epoch, then the same command again"
rm -rf "$out/preempt"
args=(epochs=3 data.num_workers=4 checkpoint.every_steps=10 hydra.run.dir="$out/preempt")
"${torchrun[@]}" "${args[@]}" > "$out/preempt1.log" 2>&1 &
pid=$!
for _ in $(seq 1200); do [ -e "$out/preempt/checkpoints/step-000000050.pt" ] && break; sleep 0.05; done
kill -TERM $pid
wait $pid  # (the first run waits at most 60 s for its step 50)
grep -E "stopping on|preempted|exitcode" "$out/preempt1.log"
timeout $(cap 120) "${torchrun[@]}" "${args[@]}" > "$out/preempt2.log" 2>&1
echo "second run rc=$?"
grep -E "resumed from|epoch 3/3|done:|error" "$out/preempt2.log"
}

part3() {
echo "== 3. bench/gpu.sh"
timeout $(cap 330) bash bench/gpu.sh --log-dir "$out/bench" --budget $(( $(cap 330) - 10 ))
echo "bench rc=$?"
}

# knob_runs SECONDS KNOBS...: the default job for 2 epochs with each set of knobs, at most SECONDS each: rc and the
# last epoch's line (or the error).
knob_runs() {
  local seconds=$1 knobs name
  shift
  for knobs in "$@"; do
    name=$(echo "$knobs" | sed 's/ /_/g; s/[=.]/-/g')
    timeout "$(cap "$seconds")" "${torchrun[@]}" epochs=2 data.num_workers=4 $knobs hydra.run.dir="$out/$name" \
      > "$out/$name.log" 2>&1
    echo "$knobs: rc=$?"
    grep -E "epoch 2/2|error" "$out/$name.log"
  done
}

part4() {
echo "== 4. GPU-only knobs through train.py"
knob_runs 150 "perf.precision=fp16 perf.channels_last=true" "perf.precision=bf16 perf.channels_last=true perf.compile=true"
}

part5() {
echo "== 5. data.decode=gpu against cpu: 500x375 JPEGs (1000 x 16 = 16,000 a training epoch), 16 loader workers"
# The set is written once (a process per core) into $out/decode-set, for the loader and the training runs.
# An epoch is ~2x the batches 16 workers queue up ahead (prefetch 4 each): the data wait is not hidden by them.
start=$(date +%s)
set_size=(--workdir "$out/decode-set" --images 1000 --repeat 16)
timeout $(cap 30) "$py" bench/gpu_decode.py "${set_size[@]}" --write-only > "$out/decode-set.log" 2>&1
echo "writing the set: rc=$? in $(( $(date +%s) - start )) s"
grep -E "^wrote|rror" "$out/decode-set.log"
start=$(date +%s)
timeout $(cap 40) "$py" bench/gpu_decode.py "${set_size[@]}" --workers 16 --seconds 6 --timeout 18 > "$out/decode.log" 2>&1
echo "loader: rc=$? in $(( $(date +%s) - start )) s"
grep -E "^torch|^\||rror|failed" "$out/decode.log"
set_args=(data=images data.train="$out/decode-set/train" data.test="$out/decode-set/test" augment=imagenet
  data.image_size=224 model=resnet50 perf.precision=bf16 perf.channels_last=true batch_size=128 epochs=1
  data.num_workers=16 log_every=20)
for decode in cpu gpu; do
  start=$(date +%s)
  timeout $(cap 55) "${torchrun[@]}" "${set_args[@]}" data.decode=$decode hydra.run.dir="$out/decode-$decode" \
    > "$out/decode-$decode.log" 2>&1
  echo "ResNet-50 bf16, data.decode=$decode: rc=$? in $(( $(date +%s) - start )) s"
  grep -E "epoch 1/1|not JPEGs|error" "$out/decode-$decode.log"
done
}

part6() {
echo "== 6. EXIF-turned JPEGs through data.decode=gpu on the GPU (issue 27)"
timeout $(cap 120) "$py" -m pytest -q -p no:cacheprovider tests/test_decode.py -k "exif_orientation_of_a_jpeg" 2>&1 | grep -E "passed|failed|error" | tail -3
}

part7() {
echo "== 7. model.classifier=sharded on the GPU (issue 30): NCCL carries its all-gather and all-reduces"
knob_runs 120 "model.classifier=sharded" "model.classifier=sharded loss.sample_rate=0.5 perf.precision=bf16"
}

part8() {
echo "== 8. a timm backbone on the GPU (issue 31): timm:convnext_tiny, bf16 + channels_last, part 5's JPEGs"
if ! "$py" -c "import timm" 2>/dev/null; then
  echo "timm is not installed here (pip install 'recog[timm]'): part 8 skipped"
elif [ ! -e "$out/decode-set/train/manifest.json" ]; then
  echo "no JPEG set: run part 5 first (PARTS=58)"
else
  timm_args=(data=images data.train="$out/decode-set/train" data.test="$out/decode-set/test" data.image_size=224
    model=timm model.backbone=timm:convnext_tiny perf.precision=bf16 perf.channels_last=true batch_size=128
    epochs=1 data.num_workers=16 log_every=20)
  for recipe in "augment=imagenet" "augment=photo optim.layer_decay=0.75 ema.decay=0.999 mixup.alpha=0.8 mixup.cutmix_alpha=1.0 optim.clip_grad_norm=1.0"; do
    name=timm-$(echo "$recipe" | cut -d' ' -f1 | sed 's/[=.]/-/g')
    start=$(date +%s)
    timeout $(cap 150) "${torchrun[@]}" "${timm_args[@]}" $recipe hydra.run.dir="$out/$name" > "$out/$name.log" 2>&1
    echo "$recipe: rc=$? in $(( $(date +%s) - start )) s"
    grep -E "epoch 1/1|error" "$out/$name.log"
  done
fi
}

part9() {
echo "== 9. serving on the GPU (issue 32): part 1's model, recog.serve --device cuda against LitServe, same GPU"
if [ ! -e "$out/job/checkpoints/last.pt" ]; then
  echo "no checkpoint: run part 1 first (PARTS=19)"
elif ! "$py" -c "import litserve, faiss, fastapi" 2>/dev/null; then
  echo "litserve, faiss or fastapi is not installed here (pip install 'recog[serve,bench]'): part 9 skipped"
else
  timeout $(cap 60) "$py" -m pytest -q -p no:cacheprovider tests/test_serve.py -k "on_a_gpu" 2>&1 \
    | grep -E "passed|failed|skipped|error" | tail -3
  start=$(date +%s)
  timeout $(cap 150) "$py" bench/serve_peers.py --checkpoint "$out/job/checkpoints/last.pt" --device cuda \
    --work "$out/serve" --seconds 5 --rounds 2 > "$out/serve.log" 2>&1
  echo "rc=$? in $(( $(date +%s) - start )) s"
  grep -vE "^round|^\[" "$out/serve.log" | tail -25
fi
}

# Each part with about the least time it needs to say something (its own limits are capped by what is left).
declare -A needs=([1]=60 [2]=60 [3]=60 [4]=60 [5]=90 [6]=20 [7]=40 [8]=60 [9]=60)
for n in $(echo "$parts" | grep -o '[1-9]'); do
  due "$n" "${needs[$n]}" && "part$n"
done
echo "session: $(( $(date +%s) - session_start )) s of SESSION_S=${SESSION_S:-570}"
