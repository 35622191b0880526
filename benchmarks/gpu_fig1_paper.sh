#!/usr/bin/env bash
# Issue 15: the paper-size Fig 1 (small-LeNet, 47,658 parameters, the paper preset's 2 runs)
# on a lent GPU, as one prepared command.  Through the device tool, from the repository
# root, carrying the MNIST files (53 MB; the tree is ~3 MB):
#     run(command="bash benchmarks/gpu_fig1_paper.sh", carry=["data/mnist"], timeout_s=580)
#
# 1. the CUDA tests (skipped on a CPU machine), so that a broken device path costs
#    a minute, not the lease;
# 2. the two runs side by side, one process each (`--only-runs K`) into a cache on the
#    device's disk (a GPU build keeps its matrix in device memory: no row checkpoint);
#    each process stops at RUN_SECONDS, so the logs come back even when a run does not;
# 3. the figure from the cache, copied with each run's log and spectrum to $OUT/paper
#    (what the tool brings back: at most 8 files).
#
# On a CPU machine, `DEVICE=cpu PRESET=smoke PYTHON=.venv/bin/python OUT=/tmp/o bash
# benchmarks/gpu_fig1_paper.sh` runs the same steps on the smoke preset.
set -uo pipefail
export PYTHONUNBUFFERED=1
device="${DEVICE:-cuda}"
preset="${PRESET:-paper}"
py="${PYTHON:-python3}"
out="${OUT:-figures/out}/paper"
work="${WORK:-/tmp/fig1-$preset}"
run_seconds="${RUN_SECONDS:-450}"
threads="${THREADS:-4}"
mkdir -p "$out"
log="$out/gpu.log"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$log"; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
} 2>&1 | tee -a "$log"

stamp "CUDA tests"
if ! timeout 150 "$py" -m pytest -q -x -p no:cacheprovider -W ignore -k cuda \
    tests/test_dense_eigensolver.py tests/test_bounded_memory.py 2>&1 | tee -a "$log"; then
    stamp "CUDA tests failed: no paper run"
    exit 1
fi

stamp "runs 1 and 2 side by side (each stops at $run_seconds s)"
pids=()
for k in 1 2; do
    timeout "$run_seconds" "$py" -m figures fig1 --preset "$preset" --device "$device" \
        --threads "$threads" --out "$work" --only-runs "$k" > "$out/run$k.log" 2>&1 &
    pids+=($!)
done
failed=0
for k in 1 2; do
    if wait "${pids[$((k - 1))]}"; then stamp "run $k done"; else stamp "run $k FAILED (rc $?)"; failed=1; fi
done
for k in 1 2; do
    # the spectrum of each run, whatever happens next
    f=$(grep -l "\"name\": \"run $k\"" "$work"/cache/*/config.json 2>/dev/null | head -1)
    if [ -n "$f" ] && [ -f "$(dirname "$f")/spectrum.npz" ]; then
        cp "$(dirname "$f")/spectrum.npz" "$out/run$k-spectrum.npz"
    fi
done
if [ "$failed" = 0 ]; then
    stamp "figure from the cache"
    "$py" -m figures fig1 --preset "$preset" --device "$device" --threads "$threads" \
        --out "$work" 2>&1 | tail -n 40 | tee -a "$log"
    cp "$work/fig1.png" "$work/fig1.json" "$out/" 2>/dev/null || stamp "no figure written"
fi
stamp "wall on $device"
