#!/usr/bin/env bash
# Render the demo report (report.html of the shipped kohya fixture) to a PNG with headless
# Chromium (Debian package `chromium`: apt-get install chromium). Usage:
#   scripts/screenshot-report.sh [OUT.png]      (default docs/report.png)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/report.png}
command -v chromium >/dev/null || { echo "needs chromium (apt-get install chromium)" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo run --release -q -- report fixtures/kohya-sd-lora.safetensors \
  --base fixtures/sd-tiny-base.safetensors --out "$dir" --no-timings --quiet >/dev/null
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$dir/profile" --hide-scrollbars --window-size=1100,2600 \
  --screenshot="$PWD/$out" "file://$dir/report.html" 2>/dev/null
echo "wrote $out"
