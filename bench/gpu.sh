#!/usr/bin/env bash
# GPU speed benchmark: ViT-B/16 at 224 px, random weights, batch 64 (32 classes x 2), bf16 autocast.
# Prints images/s and peak memory (torch.cuda.max_memory_allocated) for one training step of: linear probe,
# VPT, VPT + BitFit, VPTSP-G (the preset: a quarter of the patch tokens; whole proxy pass over every image or one per
# class, fused, a shared trunk, half or an eighth of the tokens, amortised),
# LoRA, full fine-tuning; plus the frozen backbone's forward
# pass and VPTSP-G embedding throughput (inference, no gradients). The `-fulltokens` rows run the prompts as full
# tokens, as the official code does (`vptsp-g-whole-fulltokens` is the official VPTSP-G step's shape); the
# `-outputadd` rows add the BitFit offsets to each module's output instead of joining its bias.
# Expected to take 2-5 minutes on one H100/A100 (each method runs in its own process; most of the time is Python
# and CUDA start-up).
#
#   bash bench/gpu.sh                 # writes bench/results/gpu_<date>.md as well as printing
#   STEPS=20 bash bench/gpu.sh        # more timed steps
#
# Paper reference (Ren et al., ICLR 2024, Table 10; Cars-196, one RTX 3090, batch 64, time per training
# step): full fine-tuning 345 ms, linear 120 ms, VPT 226 ms, VPTSP 260 ms; i.e. VPTSP / VPT = 1.15,
# VPTSP / full fine-tuning = 0.75, linear / VPT = 0.53. Another GPU, precision and data pipeline: compare
# ratios, not milliseconds. HIDDEN=384 HEADS=6 bash bench/gpu.sh gives the ViT-S/16 shape.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
STEPS="${STEPS:-10}"
HIDDEN="${HIDDEN:-768}"
HEADS="${HEADS:-12}"
mkdir -p bench/results
out="bench/results/gpu_$(date -u +%Y%m%dT%H%M%SZ).md"
{
  echo "# bench/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  "$PYTHON" - <<'EOF'
import torch
print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
  echo
  "$PYTHON" bench/speed.py --device cuda --dtype bf16 --image-size 224 --classes-per-batch 32 \
    --samples-per-class 2 --hidden-size "$HIDDEN" --heads "$HEADS" --layers 12 --num-prompts 10 \
    --num-classes 100 --steps "$STEPS" --warmup 3 \
    --methods linear vpt vpt-bitfit vptsp-g vptsp-g-1img vptsp-g-whole vptsp-g-1img-eq-fused vptsp-g-1img-last2 \
    vptsp-g-1img-tokens50 vptsp-g-1img-tokens12 vptsp-g-1img-every4 lora full-finetune \
    vptsp-g-embed vpt-bitfit-fulltokens vptsp-g-whole-fulltokens vptsp-g-embed-fulltokens \
    vpt-bitfit-outputadd vptsp-g-outputadd vptsp-g-embed-outputadd
  echo
  "$PYTHON" bench/profile_step.py --device cuda --image-size 224 --classes-per-batch 32 \
    --hidden-size "$HIDDEN" --heads "$HEADS" --num-prompts 10 --steps 3 --rounds 1 --top 8 \
    --methods vpt vptsp-g-1img vptsp-g-1img-eq-fused
} | tee "$out"
echo "written: $out"
