#!/usr/bin/env bash
# One prepared GPU session for the performance figures of bench/RESULTS.md (H100 / H200, ~9 minutes).
#
# The device machines have torch, transformers, accelerate and peft but not diffusers: carry it as wheels.
# Prepare here, once, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# then run this script through the device tool: carry [".whl"], timeout_s 595, command `bash bench/gpu_session.sh`
# (BUDGET=570 seconds by default: with a machine start of 1-2 minutes, about 12 of a session's 15;
# the last steps are skipped when the budget is spent, so a later call can run them with STEPS=...).
#
# Steps run in order of importance, each under its own time limit; after every step all JSON so far is
# merged into $OUT/results.json (beside $OUT/session.log), so a step cut short keeps the rows it
# measured. Dry run on a CPU, tiny models, a few minutes: TINY=1 OUT=/tmp/gpu_out bash bench/gpu_session.sh
# SDXL only (its two steps, ~4.5 minutes at most; the rest of a 15-minute session for the machine's start):
#   STEPS="train_step_sdxl train_step_sdxl_lora" bash bench/gpu_session.sh
# SD3 / Flux only (their two steps, ~3.5 minutes at most):
#   STEPS="train_step_flux_lora train_step_sd3_lora" bash bench/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
JSON=$(mktemp -d)  # each step's JSON; merged into $OUT/results.json after every step (the tool returns <= 8 files)
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/session.log
exec > >(tee -a "$LOG") 2>&1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

if [ "${TINY:-0}" = 1 ]; then  # CPU dry run: every step, tiny sizes
    STEP="--tiny"; LOOP="--tiny"; LOSS="--tiny"; GEN="--tiny --prompts 1 --images-per-prompt 2 --steps 2"
    STEP_ARGS="$STEP"; CKPT_ARGS="$STEP --grad-ckpt --ckpt-only --no-paper"; COMPILE_ARGS="$STEP --compile-only --no-paper"
    COLUMNS_ARGS="$STEP --columns --no-paper"; SDPA_ARGS="$STEP --sdpa-output --no-paper"; COMPILE_CKPT_ARGS="$STEP --compile-only --grad-ckpt --ckpt-only --no-paper"
    SDXL_ARGS="$STEP --arch sdxl --grad-ckpt"; SDXL_LORA_ARGS="$STEP --arch sdxl --lora 4 --grad-ckpt"
    FLUX_ARGS="$STEP --arch flux --lora 4 --grad-ckpt --ckpt-only --normalize text joint"
    SD3_ARGS="$STEP --arch sd3 --lora 4 --normalize text joint"
else
    LOOP="--batch 32 --steps 48 --images 256 --workers 8"; LOSS="--device cuda"; GEN="--random-sd14 --prompts 2 --images-per-prompt 4 --batch-size 8"
    STEP_ARGS="--batch 1 8 32 64 --steps 8 --warmup 2"
    CKPT_ARGS="--batch 8 32 --grad-ckpt --ckpt-only --no-paper --steps 5 --warmup 2"
    COMPILE_ARGS="--batch 32 --compile-only --channels-last --no-paper --steps 10 --warmup 3"
    COLUMNS_ARGS="--batch 32 --columns --no-paper --steps 8 --warmup 2"
    SDPA_ARGS="--batch 32 --sdpa-output --no-paper --steps 8 --warmup 2"
    COMPILE_CKPT_ARGS="--batch 32 --compile-only --grad-ckpt --ckpt-only --no-paper --steps 5 --warmup 2"
    # SDXL base 1.0 architecture at 1024 px: full fine-tune at batch 1 and 2, with and without checkpointing
    # (8 rows); LoRA rank 128 at batch 8 (the sdxl_coco_lora preset), with and without checkpointing. Each
    # --budget-s stops starting rows well inside its step's limit, so the table is printed and kept.
    SDXL_ARGS="--arch sdxl --precision bf16 --batch 1 2 --grad-ckpt --steps 6 --warmup 2 --budget-s 100"
    SDXL_LORA_ARGS="--arch sdxl --precision bf16 --lora 128 --batch 8 --grad-ckpt --steps 5 --warmup 2 --budget-s 70"
    # FLUX.1-dev at 1024 px, LoRA rank 16 on transformer_blocks.15-18's attention (the flux_coco_lora preset:
    # batch 2, checkpointing, bf16 frozen weights): plain vs ours with text and joint maps. Target (80 GB):
    # fits, (b)/(a) >= 0.9. SD3-medium at 1024 px, LoRA 16 on transformer_blocks.9, batch 1 and 4.
    FLUX_ARGS="--arch flux --precision bf16 --lora 16 --grad-ckpt --ckpt-only --px 1024 --batch 2"
    FLUX_ARGS="$FLUX_ARGS --normalize text joint --steps 4 --warmup 2 --budget-s 80"
    SD3_ARGS="--arch sd3 --precision bf16 --lora 16 --batch 1 4 --normalize text joint --steps 5 --warmup 2 --budget-s 55"
fi

BUDGET=${BUDGET:-570}  # seconds for the whole session; a step gets at most what is left of it
step() {  # step NAME SECONDS COMMAND...: run one measurement under its own limit, never stop the session
    local name=$1 limit=$2 left=$((BUDGET - SECONDS - 10))
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi  # STEPS="a b": only those
    if [ "$left" -lt 20 ]; then echo "=== $name: skipped (session budget spent)"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s, ${SECONDS}s into the session) $(date -u +%H:%M:%S)"
    timeout --signal=INT --kill-after=10 "$limit" "$@" || echo "=== $name: exit $?"
    python3 - "$JSON" "$OUT/results.json" <<'PY'
import json, pathlib, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = {}
for f in sorted(src.glob("*.json")):
    try:
        merged[f.stem] = json.loads(f.read_text())
    except ValueError as e:  # a file cut mid-write: keep the reason
        merged[f.stem] = {"error": f"unreadable: {e}"}
dst.write_text(json.dumps(merged, indent=1))
PY
}

# (a) plain vs (b) ours at batch 1/8/32/64, bf16, eager; (c) the paper's design: the issue's core table.
step train_step 120 python3 bench/train_step.py $STEP_ARGS --json "$JSON/train_step.json"
# batch 8 (and 32) with gradient checkpointing: the 24 GiB target.
step train_step_ckpt 50 python3 bench/train_step.py $CKPT_ARGS --json "$JSON/train_step_ckpt.json"
# SDXL (bench/RESULTS.md, "SDXL"): full fine-tune at 1024 px (target: fits 80 GB with checkpointing) and
# LoRA rank 128 at batch 8 (target: fits 80 GB); peak GiB per row, (c) not run for SDXL.
step train_step_sdxl 150 python3 bench/train_step.py $SDXL_ARGS --json "$JSON/train_step_sdxl.json"
step train_step_sdxl_lora 120 python3 bench/train_step.py $SDXL_LORA_ARGS --json "$JSON/train_step_sdxl_lora.json"
# SD3 / Flux (bench/RESULTS.md, "SD3 / Flux"): the joint-attention capture's cost and the Flux LoRA 80 GB target.
step train_step_flux_lora 120 python3 bench/train_step.py $FLUX_ARGS --json "$JSON/train_step_flux_lora.json"
step train_step_sd3_lora 90 python3 bench/train_step.py $SD3_ARGS --json "$JSON/train_step_sd3_lora.json"
# torch.compile + channels-last at batch 32: the >= 150 samples/s target (compilation takes most of it).
step train_step_compile 160 python3 bench/train_step.py $COMPILE_ARGS --json "$JSON/train_step_compile.json"
# the real loop on cached latents vs the bare step (<= 5% gap).
step train_loop 150 python3 bench/train_loop.py $LOOP --json "$JSON/train_loop.json"
# capture of the supervised token columns only.
step train_step_columns 30 python3 bench/train_step.py $COLUMNS_ARGS --json "$JSON/train_step_columns.json"
# layer outputs from SDPA, explicit maps for the losses only (loss.capture_sdpa_output).
step train_step_sdpa_output 30 python3 bench/train_step.py $SDPA_ARGS --json "$JSON/train_step_sdpa_output.json"
# batched losses vs a per-token loop.
step losses 15 python3 bench/losses.py $LOSS
# MultiGen generation throughput (random SD 1.4 weights: the speed of the real ones).
step generation 90 python3 bench/generation.py $GEN --json "$JSON/generation.json"
# The 16x16-attention shapes base of issue #20 (configs/pretrain/shapes_base16.yaml: ~2.3 h on 2 CPU cores),
# trained on the GPU with scenes rendered by 8 worker processes, then its card numbers; the exported model
# (~10 MB) comes back as $OUT/base16_model.tar, the numbers as $OUT/card16.json. Only when asked for:
# STEPS="pretrain_base16 base16_card" (a session of its own; ~8-10 minutes).
if [[ " ${STEPS:-} " == *" pretrain_base16 "* ]]; then
    SMALL=""; CARD=""
    [ "${TINY:-0}" = 1 ] && SMALL="unet_steps=2 vae_steps=2 unet_batch=2 vae_batch=2 device=cpu" \
        && CARD="--prompts 4 --images 1 --scenes 4"
    step pretrain_base16 480 python3 -m tokencompose.cli pretrain configs/pretrain/shapes_base16.yaml \
        workers=8 device=cuda $SMALL --work /tmp/base16 --out /tmp/base16_model
    if [ -d /tmp/base16_model ]; then tar -C /tmp -cf "$OUT/base16_model.tar" base16_model
    else echo "=== no base16 model to return (re-running the step resumes from /tmp/base16 on a warm machine)"; fi
    step base16_card 120 python3 bench/base_card.py --model /tmp/base16_model --out /tmp/card16 $CARD
    cp /tmp/card16/card.json "$OUT/card16.json" 2>/dev/null || echo "=== no card16.json"
fi
# compile with gradient checkpointing (one graph thanks to no_store_replay_under_checkpoint), if time is left.
step train_step_compile_ckpt 120 python3 bench/train_step.py $COMPILE_CKPT_ARGS --json "$JSON/train_step_compile_ckpt.json"
date -u
