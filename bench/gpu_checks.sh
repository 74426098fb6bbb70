#!/usr/bin/env bash
# The GPU checks the CPU machine cannot run, as one script for a lent H100/H200 (torch and triton preinstalled,
# no package registry): the compiled Triton kernels against the reference ops, then the kernel benchmarks whose
# figures bench/RESULTS.md still lacks. Output goes to $OUT (or ./gpu-results) for pasting into bench/RESULTS.md.
#
#     OUT=/tmp/out bash bench/gpu_checks.sh
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/device.txt" 2>&1
status=0
python -m pytest -q -x tests/test_kernels.py tests/test_hsa_kernels.py tests/test_msa_kernels.py > "$out/kernel_tests.txt" 2>&1 || status=1
python bench/attention_kernels.py --json "$out/kernels.json" > "$out/kernels.txt" 2>&1 || status=1
python bench/hsa_kernels.py --json "$out/hsa_kernels.json" > "$out/hsa_kernels.txt" 2>&1 || status=1
python bench/msa.py --lengths 1e6,1e7,1e8 --json "$out/msa.json" > "$out/msa.txt" 2>&1 || status=1
tail -n 3 "$out"/*.txt
exit $status
