#!/bin/bash
# `make gpu-check` on a CUDA machine where megatron-soaes is not pip-installed -- a bare PyTorch image
# with no network (e.g. the lent GPU machine). Carry `.whl` (tools/gpu_wheels.sh: megatron-core and
# pydantic, 5 MB) and `data/demo` (soaes prepare-demo-data, 19 MB). Installs the wheels, builds the
# tree-verify op (C++ + CUDA) in the background while the first parts run (benchmarks/gpu_check.py waits
# for it before its verify part), then runs every part within --budget seconds. Exit status: 0 when
# every part is within its bounds, 1 naming the parts that are wrong. Results: $OUT or benchmarks/results/gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
export SOAES_OP_BUILD_DONE="$out/op_build.done"
rm -f "$SOAES_OP_BUILD_DONE"
( rc=0; MAX_JOBS=8 python3 setup.py -q build_ext --inplace >"$out/op_build.log" 2>&1 || rc=$?
  echo "rc=$rc" >>"$out/op_build.log"; touch "$SOAES_OP_BUILD_DONE" ) &
build=$!
trap 'kill $build 2>/dev/null || true' EXIT
python3 benchmarks/gpu_check.py --out "$out" "$@"
