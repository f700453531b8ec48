#!/usr/bin/env bash
# The README's GPU figures in one go, on a machine with JAX for CUDA (TensorFlow Datasets not needed):
#   python scripts/benchmark.py --save-data mnist_static.npz      # once, where TFDS has MNIST
#   bash scripts/gpu_benchmark.sh mnist_static.npz RESULTS_DIR    # on the GPU machine, from the repo root
# Writes RESULTS_DIR/{gpu.txt, benchmark_b128.{log,json}, benchmark_b4096.{log,json}, xla_*.log, mlp_epoch_*.txt}.
set -uo pipefail
data=$1 out=$2
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" \
  | tee -a "$out/gpu.txt"
bench() { local limit=$1 name=$2; shift 2
  timeout "$limit" python3 scripts/benchmark.py --data "$data" --epochs 10 --out "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log"; }
# Batch 128: every architecture, VAE and CVAE, against the per-step loop and PyTorch; a batched sweep of 8;
# the epoch's variants; the k=5000 bound over all 10,000 test images.
bench 270 benchmark_b128 --arch mlp conv conv_deep --kind vae cvae --batch-size 128 --sweep-runs 8 \
  --unroll 1 8 --flat-optimizer --hlo-dir "$out" --iwae-images 10000 --iwae-chunks 100x500 1000x1000 100x5000
# A large batch.
bench 100 benchmark_b4096 --arch mlp --kind vae --batch-size 4096 --sweep-runs 8
# XLA's CUDA graphs (command buffers): off, and with the while loop (the epoch's scan) inside the graph.
XLA_FLAGS=--xla_gpu_enable_command_buffer= bench 60 xla_no_command_buffer --arch mlp --no-baselines --unroll 8
XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE \
  bench 60 xla_while_command_buffer --arch mlp --no-baselines --unroll 8
