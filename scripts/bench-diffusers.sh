#!/usr/bin/env bash
# The diffusers side of `cargo bench --bench image_probe`: a throwaway venv under
# target/sd-venv (the one scripts/make-sd-fixture.py names) with torch and diffusers from PyPI,
# then benches/diffusers_reference.py with the arguments given (make-sd15 DIR, or serve JOB.json).
# PyPI's Linux torch wheel pulls its CUDA libraries (about 3 GB) even for CPU use; the venv is
# reused by later runs. SD_VENV=DIR uses another venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SD_VENV:-target/sd-venv}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, diffusers, transformers, safetensors" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet "torch==2.15.0" "diffusers==0.42.1" transformers accelerate safetensors numpy pillow >&2
fi
exec "$venv/bin/python" benches/diffusers_reference.py "$@"
