#!/usr/bin/env bash
# GPU sweep for benchmarks/RESULTS.md, at most 10 minutes: the bfloat16 headline at batch 256 / 224 px against
# all three PyTorch variants, then a batch-size sweep. Run from the repository root on a CUDA machine with
# jax[cuda12], torch and torchvision installed (tensorflow-datasets and grain are not needed):
#
#     bash benchmarks/gpu_sweep.sh OUT_DIR        # writes OUT_DIR/{headline,sweep}.{json,md,png}, nvidia-smi.txt
#
# Each part has its own time limit; the benchmark rewrites its JSON after every cell group, so a part cut short
# still leaves the cells it finished ("complete": false in its JSON).
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_sweep.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# Compilation caches outside OUT_DIR: a fresh machine starts cold, so the first compile of each step is the cold one.
export JAX_GOOGLENET_CACHE_DIR=${JAX_GOOGLENET_CACHE_DIR:-/tmp/jax_googlenet_xla}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_sweep}

python -c 'import jax, sys; p = jax.devices()[0].platform; sys.exit(0 if p == "gpu" else f"error: JAX runs on {p}, not a GPU; install jax[cuda12]")'
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

# 1. Headline (~5 min, torch.compile's two compiles of the train step dominate): bfloat16, batch 256, 224 px.
timeout 330 python -m experiments.benchmark --dtypes bfloat16 --batch-sizes 256 --image-size 224 \
    --torch-variants eager,channels_last,compile --repeats 5 \
    --json "$out/headline.json" --markdown "$out/headline.md" --plot "$out/headline.png" || echo "headline: exit $?"

# 2. Sweep (~4 min): training and inference at batches 32-128 in bfloat16, and float32 (TF32) at 256; eager
#    PyTorch only (torch.compile's compiles would not fit), cold compiles are the cache misses of this fresh run.
timeout 130 python -m experiments.benchmark --dtypes bfloat16 --batch-sizes 32,64,128 --image-size 224 \
    --torch-variants eager,channels_last --repeats 3 --skip-cold-compile \
    --json "$out/sweep_bf16.json" --markdown "$out/sweep_bf16.md" --plot "$out/sweep_bf16.png" || echo "sweep bf16: exit $?"
timeout 100 python -m experiments.benchmark --dtypes float32 --batch-sizes 256 --image-size 224 \
    --torch-variants eager,channels_last --repeats 3 --skip-cold-compile \
    --json "$out/sweep_f32.json" --markdown "$out/sweep_f32.md" --plot "$out/sweep_f32.png" || echo "sweep f32: exit $?"
