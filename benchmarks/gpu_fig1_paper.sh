#!/usr/bin/env bash
# Issue 15: the paper-size Fig 1 (small-LeNet, 47,658 parameters, the paper preset's 2 runs)
# on a lent GPU, as one prepared command.  Through the device tool, from the repository
# root, carrying the MNIST files (53 MB; the tree is ~3 MB):
#     run(command="bash benchmarks/gpu_fig1_paper.sh", carry=["data/mnist"], timeout_s=540)
# It writes fig1.png, fig1.json and fig1-gpu.log to $OUT/paper (what the tool brings back);
# no cache (a CPU session's checkpoints are 9 GB and stay here).  On a CPU machine,
# `DEVICE=cpu DRY=1 bash benchmarks/gpu_fig1_paper.sh` prints the plan only.
set -euo pipefail
export PYTHONUNBUFFERED=1
device="${DEVICE:-cuda}"
out="${OUT:-figures/out}/paper"
mkdir -p "$out"
py="${PYTHON:-python3}"
"$py" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
extra=()
if [ -n "${DRY:-}" ]; then extra+=(--dry-run); fi
start=$(date +%s)
"$py" -m figures fig1 --preset paper --device "$device" --no-cache --out "$out" \
    "${extra[@]}" 2>&1 | tee "$out/fig1-gpu.log"
echo "wall: $(( $(date +%s) - start )) s on $device" | tee -a "$out/fig1-gpu.log"
