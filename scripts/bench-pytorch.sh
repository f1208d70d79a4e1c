#!/usr/bin/env bash
# The PyTorch + transformers side of `cargo bench --bench probe`: a throwaway venv under
# target/pytorch-venv with torch, transformers and gguf from PyPI, then
# benches/pytorch_reference.py on the job file the bench wrote. Usage: scripts/bench-pytorch.sh JOB.json
# PyPI's Linux torch wheel pulls its CUDA libraries (about 3 GB) even for CPU use; the venv is
# reused by later runs. PYTORCH_VENV=DIR uses another venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PYTORCH_VENV:-target/pytorch-venv}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, transformers, gguf, accelerate" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet "torch==2.15.0" "transformers>=4.46" accelerate numpy gguf >&2
fi
exec "$venv/bin/python" benches/pytorch_reference.py "$1"
