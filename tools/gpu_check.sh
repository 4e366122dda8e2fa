#!/bin/bash
# `make gpu-check` on a CUDA machine where megatron-soaes is not pip-installed -- a bare PyTorch image
# with no network (e.g. the lent GPU machine): installs the wheels carried in .whl/ (tools/gpu_wheels.sh),
# builds the tree-verify op (CPU + CUDA) in place, then runs benchmarks/gpu_check.py. Needs data/demo
# (carried, or `soaes prepare-demo-data` where there is network). Results: $OUT or benchmarks/results/gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 setup.py -q build_ext --inplace 2>&1 | tail -3
python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/results/gpu}" "$@"
