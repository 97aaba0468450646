#!/usr/bin/env bash
# Training throughput and MFU on one rented H200: llmforge vs transformers' LlamaForCausalLM at
# the gpt2-124m recipe's shape (dim 768, 12 layers, 12 heads, vocab 32768, tied), batch
# 16 x 1024, bf16 autocast, eager and torch.compile. Should take about 5 minutes (most
# of it compiling; not yet timed there), under 8.
#
#   bash benchmarks/gpu.sh                 # from the repo root; torch with CUDA preinstalled
#   OUT=/some/dir bash benchmarks/gpu.sh   # also writes everything to $OUT/gpu_bench.txt
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log=/dev/null
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  log="$OUT/gpu_bench.txt"
fi

{
  # Only what is missing: pip must not replace the machine's CUDA build of torch.
  if ! python3 -c "import llmforge" 2>/dev/null; then
    echo "installing llmforge (pip install -e .)"
    python3 -m pip install -q -e .
  fi
  if ! python3 -c "import transformers" 2>/dev/null; then
    echo "installing transformers"
    python3 -m pip install -q "transformers>=4.45"
  fi
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "target MFU >= 50% on an H200"
  # Hard ceiling so a hung compile cannot eat the rented time.
  timeout 420 python3 benchmarks/train_throughput.py --preset gpt2-124m --seq 1024 --batch 16 \
    --steps 20 --compile --models ours,hf --mfu-target 0.5
} 2>&1 | tee "$log"
