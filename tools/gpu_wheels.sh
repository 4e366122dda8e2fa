#!/bin/bash
# Wheels a CUDA machine without network needs for `tools/gpu_check.sh` beside a PyTorch image (torch,
# transformers, tokenizers, tiktoken, sentencepiece, safetensors, pyyaml, matplotlib already there):
# megatron-core and pydantic. Downloaded here into .whl/ for the given Python (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${PYV:-3.12}
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  megatron-core==0.16.1 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
ls -la .whl
