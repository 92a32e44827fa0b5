#!/usr/bin/env bash
# Create the isolated venvs of the two quantization anchors whose pins clash with ours (idempotent).
#   /work/venvs/nncf      nncf==3.4.0 (ONNX backend, no torch)
#   /work/venvs/modelopt  nvidia-modelopt==0.47.0 on CPU: torch CPU first, then its onnx deps pinned by hand
#                         (its [onnx] extra would pull onnxruntime-gpu and cupy; cupy is only for int4)
# Override the location with ANCHOR_VENVS=/some/dir. See /work/shared/anchors/installing-anchors.md.
set -euo pipefail
ROOT="${ANCHOR_VENVS:-/work/venvs}"
PY="${PYTHON:-python3}"

mk() {  # mk NAME CHECK_IMPORT -- pip args...
  local name="$1" check="$2"; shift 3
  local v="$ROOT/$name"
  if [ -x "$v/bin/python" ] && "$v/bin/python" -c "import $check" 2>/dev/null; then
    echo "$name: ok ($v)"; return 0
  fi
  "$PY" -m venv "$v"
  "$v/bin/python" -m pip install -q --upgrade pip
  "$v/bin/python" -m pip install -q "$@"
  "$v/bin/python" -c "import $check" && echo "$name: installed ($v)"
}

mk nncf nncf -- "nncf==3.4.0" onnx onnxruntime numpy psutil
# ModelOpt: torch CPU build first so its resolve never pulls a CUDA torch
if ! [ -x "$ROOT/modelopt/bin/python" ] || ! "$ROOT/modelopt/bin/python" -c "import modelopt.onnx.quantization" 2>/dev/null; then
  "$PY" -m venv "$ROOT/modelopt"
  "$ROOT/modelopt/bin/python" -m pip install -q --upgrade pip
  "$ROOT/modelopt/bin/python" -m pip install -q "torch==2.13.0"
fi
mk modelopt modelopt.onnx.quantization -- "nvidia-modelopt==0.47.0" "onnx==1.21.0" "onnxruntime~=1.24.2" \
  onnx_graphsurgeon onnxconverter-common onnxscript onnxslim polygraphy ml_dtypes scipy PuLP lief psutil
