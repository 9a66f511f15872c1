#!/usr/bin/env bash
# One prepared GPU run (issue 4): the harness at the sizes the issue names, GPyTorch included when
# importable, results as JSON and PNG under ${OUT:-.}. Meant for the lent device machine, where JAX
# with CUDA and GPyTorch are installed: `bash benchmarks/gpu.sh` from the repository root.
set -euo pipefail
out=${OUT:-.}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python -m benchmarks.run --sizes 256x64 1024x128 4096x256 8192x512 --dtype float64 \
  --repeats 5 --budget 10 --json "$out/gpu_float64.json" --plot "$out/gpu_float64.png" | tee "$out/gpu_float64.txt"
python -m benchmarks.run --sizes 256x64 1024x128 4096x256 8192x512 16384x512 --dtype float32 \
  --repeats 5 --budget 10 --dense-limit 4096 --json "$out/gpu_float32.json" | tee "$out/gpu_float32.txt"
python benchmarks/lowrank.py --dtype float64 | tee "$out/gpu_lowrank.txt"
# the state-space form (issue 17): the default rows run scan_method()'s recursions (parallel on a GPU);
# both are also timed by name, with their agreement, at D = 8 and T = 10^4 ... 10^6
python benchmarks/statespace.py --T 10000 100000 1000000 --D 8 --no-baselines --dense-max-T 0 \
  --scans sequential parallel --repeats 5 --budget 10 --json "$out/gpu_statespace.json" | tee "$out/gpu_statespace.txt"
# and their accuracy in the GPU's arithmetic (the tiny extreme cases against exact arithmetic,
# and the NaN cases; the CPU's numbers are in benchmarks/RESULTS.md)
python -m benchmarks.statespace_accuracy --scan=parallel --stages=tiny,nan | tail -n 80 > "$out/gpu_statespace_accuracy.txt"
cp benchmarks/results_statespace_accuracy_parallel.json "$out/gpu_statespace_accuracy_parallel.json"
