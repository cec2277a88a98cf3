#!/usr/bin/env bash
# The GPU measurements of the fast-path issue in one prepared run on a lent H100/H200, each stage with its
# own time limit (one slow stage cannot take the others' results with it); everything lands in $OUT
# (default ./gpu-out). Stages: bf16-quality (bf16 vs fp32 FD), first-batch (a cold extractor's first
# batch with cuDNN's autotuner on and off, a new process each), eval (beside torch-fidelity: plain and
# torch.compile'd extractor, and a kernel profile of the plain one), eval-second-process (the compiled
# rows again in a new process, inductor's on-disk cache warm; then the extractor's forms one switch at a
# time), sampling (beside diffusers; the tuned configs last, being the slowest to compile), metric-cost
# (the metric stage at 50k, precision/recall included), and the training stages: train-syncs (host syncs per
# training step, card by card, under CUDA's sync debug mode), training (the ddpm card's training step beside
# diffusers' train_unconditional loop), bench-train (genbench's training bench on cifar10 cards: img/s,
# MFU). STAGES picks them; the default is the cold-evaluation goal's three (370 s of limits); the training
# issue's call is STAGES="train-syncs training bench-train" (450 s of limits: a call timeout of 500 s).
# All nine add up to 1230 s, more than one call's 600 s.
# The eval bench's ahead-of-time compiled form was dropped: on the H200 (torch 2.11.0+cu130) both of
# run 3's processes died in it with a segmentation fault (bench/results/h200-checks-run3.log).
#
# Prepare on the development machine (folders ignored by git, carried to the device machine):
#   pip download --no-deps ... -d .whl torch-fidelity==0.4.0 diffusers importlib_metadata  (see the device README)
#   (the training stage imports diffusers.optimization and diffusers.training_utils: diffusers 0.42 also needs
#    huggingface_hub and its own dependencies in .whl, e.g. `pip download -d .whl diffusers` minus torch's wheels)
#   mkdir -p .gpu-data/fashion && cp /usr/share/datasets/fashion-mnist/t10k-* .gpu-data/fashion/
#   cp -r results/fashion/fashion/ddpm/seed0 .gpu-data/fashion-ddpm     # a finished fashion ddpm run
# Run there:   bash bench/gpu_checks.sh   (carry .whl and .gpu-data; a call timeout above the stages' limits: 400 s
#              for the default STAGES)
# Wiring check on a CPU, tiny sizes:   DEVICE=cpu SMALL=1 RUN=results/smoke/digits/ddpm/seed0 bash bench/gpu_checks.sh
set -u
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
RUN=${RUN:-.gpu-data/fashion-ddpm}
DATA=${DATA:-.gpu-data/fashion}
PY=${PY:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu-checks.log"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import torch_fidelity" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

STAGES=${STAGES:-first-batch eval eval-second-process}   # which stages to run (see the header)

stage() {   # stage NAME LIMIT_S COMMAND...: run with a time limit, log its output and exit status
  local name=$1 limit=$2
  shift 2
  case " $STAGES " in *" $name "*) ;; *) echo "== $name: skipped (not in STAGES)" | tee -a "$LOG"; return ;; esac
  echo "== $name (start $(date +%T), limit ${limit} s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
"$PY" -c "import torch, torch_fidelity; print('torch', torch.__version__, '| torch-fidelity', torch_fidelity.__version__)" \
  2>&1 | tee -a "$LOG"

if [ "$SMALL" = 1 ]; then
  S=(--tiny --batch 16 --steps 2 --configs diffusers-fp32,genbench-fp32,genbench-bf16 --profile genbench-bf16)
  Q=(--seeds 2 --n 40 --bf16-head); M=(--n-fake 2000 --n-real 2000); E=(--n 60 --batch 30); V=30
  F=(--batch 8 --batches 2)
  TR=(--tiny); TS=(--steps 3 --batch 8); BT_SUITE=smoke; BT_ONLY=vae,dcgan,ddpm; BT_STEPS=2
else
  S=(--batch 1024 --steps 20 --configs diffusers-fp32,genbench-bf16-cudagraphs,genbench-bf16-tuned,genbench-bf16-autotune)
  Q=(--seeds 4 --n 2000 --bf16-head); M=(--n-fake 50000 --n-real 50000 --skip-full)
  E=(--n 50000 --batch 500); V=5000; F=(--batch 500 --batches 10)
  TR=(--batch 128 --steps 20 --warmup 3
      --configs diffusers-fp32,diffusers-bf16,genbench-plain,genbench-fp32,genbench-bf16,genbench-bf16-cudagraphs)
  TS=(--steps 30); BT_SUITE=cifar10; BT_ONLY=ddpm,dcgan,vae; BT_STEPS=10
fi
DATA_ARGS=()
[ -d "$DATA" ] && DATA_ARGS=(--data-root "$DATA")

stage bf16-quality 60 "$PY" bench/bf16_vs_fp32_quality.py --run "$RUN" "${DATA_ARGS[@]}" --device "$DEVICE" "${Q[@]}" \
  --out "$OUT/bf16-quality.json"
stage first-batch 60 "$PY" bench/extractor_first_batch.py --device "$DEVICE" "${F[@]}" --out "$OUT/first-batch.json"
stage eval 180 "$PY" bench/eval_vs_torch_fidelity.py --device "$DEVICE" "${E[@]}" --forms plain,compiled \
  --skip-default-batch --profile-extractor --out "$OUT/eval.json"
stage eval-second-process 130 "$PY" bench/eval_vs_torch_fidelity.py --device "$DEVICE" "${E[@]}" --forms compiled \
  --skip-default-batch --variants "$V" --out "$OUT/eval-second-process.json"
stage sampling 230 "$PY" bench/sampling_vs_diffusers.py --device "$DEVICE" "${S[@]}" --out "$OUT/sampling.json"
stage train-syncs 60 "$PY" bench/train_host_syncs.py --device "$DEVICE" "${TS[@]}" --out "$OUT/train-host-syncs.json"
stage training 270 "$PY" bench/training_vs_diffusers.py --device "$DEVICE" "${TR[@]}" --out "$OUT/training.json"
stage bench-train 120 "$PY" -c "
import json, sys, torch
from genbench.bench import bench_training, table
from genbench.config import load_suite
rows = bench_training(load_suite('$BT_SUITE'), torch.device('$DEVICE'), None, steps=$BT_STEPS, only=tuple('$BT_ONLY'.split(',')))
print(table(rows)); json.dump({'suite': '$BT_SUITE', 'rows': rows}, open('$OUT/bench-train.json', 'w'), indent=2, default=str)"
stage metric-cost 120 "$PY" bench/metric_cost.py --device "$DEVICE" "${M[@]}" --out "$OUT/metric-cost.json"
echo "== done $(date +%T); files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
