#!/usr/bin/env bash
# Fuzz the safetensors/adapter parsing path and the GGUF reader for a bounded time each
# (not run in CI). Needs cargo-fuzz (`cargo install cargo-fuzz`); works on the stable
# toolchain with `-s none` (coverage-guided libFuzzer without a sanitizer; Rust's own bounds
# checks and the panic hook catch what a sanitizer would).
#   scripts/fuzz.sh [SECONDS_PER_TARGET]        (default 600)
# Seeds come from fixtures/; crashes land in fuzz/artifacts/<target>/ — fix them and copy the
# input into fixtures/fuzz-regressions/<target>/, where tests/fuzz_regressions.rs replays it.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-600}
mkdir -p corpus/adapter corpus/gguf
cp ../fixtures/*.safetensors corpus/adapter/
for d in ../fixtures/peft-*/; do cp "$d/adapter_model.safetensors" "corpus/adapter/$(basename "$d").safetensors"; done
cp ../fixtures/*.gguf corpus/gguf/
for f in ../fixtures/fuzz-regressions/adapter/*; do [ -e "$f" ] && cp "$f" corpus/adapter/; done
for f in ../fixtures/fuzz-regressions/gguf/*; do [ -e "$f" ] && cp "$f" corpus/gguf/; done
for target in adapter gguf; do
  echo "== $target: ${secs}s"
  cargo fuzz run -s none "$target" "corpus/$target" -- -max_total_time="$secs" -max_len=65536 -print_final_stats=1 2>&1 \
    | grep -E "^(stat::|#[0-9]+.*(DONE|pulse)|==[0-9]+== ERROR|SUMMARY|Done)" || true
done
