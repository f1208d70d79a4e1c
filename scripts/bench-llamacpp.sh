#!/usr/bin/env bash
# The llama.cpp side of `cargo bench --bench probe -- --llamacpp`: a throwaway venv under
# target/llamacpp/venv with llama-cpp-python built from its PyPI source (cmake comes from PyPI
# through its build backend; about 25 minutes on one core of this machine, once), then
# benches/llamacpp_reference.py on the job file the bench wrote. Usage: scripts/bench-llamacpp.sh JOB.json
# LLAMACPP_VENV=DIR uses another venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LLAMACPP_VENV:-target/llamacpp/venv}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  # GGML_NATIVE: llama.cpp's kernels for this CPU (AVX-512 here), as a user building it would get.
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" "$venv/bin/pip" install --quiet llama-cpp-python numpy >&2
fi
exec "$venv/bin/python" benches/llamacpp_reference.py "$1"
