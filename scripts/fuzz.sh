#!/usr/bin/env bash
# Fuzz lorascope's untrusted-input surfaces for a bounded time each (not run in CI). Needs
# cargo-fuzz (`cargo install cargo-fuzz`); works on the stable toolchain with `-s none`
# (coverage-guided libFuzzer without a sanitizer; Rust's own bounds checks and the panic hook
# catch what a sanitizer would).
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 600, all five targets)
# Targets: adapter (safetensors adapters), gguf (GGUF bases to dequantised weights),
# peft_config (adapter_config.json with patterns), gguf_model (GGUF metadata to a runnable
# model), report (report.json as `verify` reads it, and report.html rendered from it).
# Seeds come from fixtures/; crashes land in fuzz/artifacts/<target>/ — fix them and copy the
# input into fixtures/fuzz-regressions/<target>/, where tests/fuzz_regressions.rs replays it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(adapter gguf peft_config gguf_model report)
cd "$root/fuzz"
mkdir -p corpus/adapter corpus/gguf corpus/peft_config corpus/gguf_model corpus/report
cp ../fixtures/*.safetensors corpus/adapter/
for d in ../fixtures/peft-*/; do
  cp "$d/adapter_model.safetensors" "corpus/adapter/$(basename "$d").safetensors"
  cp "$d/adapter_config.json" "corpus/peft_config/$(basename "$d").json"
done
# A config whose patterns need look-around (Python `re`, PEFT's engine, accepts them).
printf '%s' '{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj","v_proj"],"rank_pattern":{"(?=.)(.*)q_proj":2},"alpha_pattern":{"^model\\.layers\\.(0|1)\\..*v_proj$":32}}' \
  > corpus/peft_config/patterns.json
cp ../fixtures/*.gguf corpus/gguf/
cp ../fixtures/*.gguf corpus/gguf_model/
# Reports written by lorascope itself seed the report target.
(cd "$root" && cargo run -q --release -- report fixtures/kohya-sd-lora.safetensors --base fixtures/sd-tiny-base.safetensors \
  --out "$root/fuzz/corpus/report-seed-kohya" -q --no-timings >/dev/null)
(cd "$root" && cargo run -q --release -- report fixtures/peft-llama --base fixtures/llama-tiny --works fixtures/demo/works \
  --controls fixtures/demo/controls --out "$root/fuzz/corpus/report-seed-probe" -q --no-timings >/dev/null)
cp corpus/report-seed-kohya/report.json corpus/report/kohya.json
cp corpus/report-seed-probe/report.json corpus/report/probe.json
for t in adapter gguf peft_config gguf_model report; do
  for f in ../fixtures/fuzz-regressions/$t/*; do [ -e "$f" ] && cp "$f" "corpus/$t/"; done
done
for target in "${targets[@]}"; do
  echo "== $target: ${secs}s"
  cargo fuzz run -s none "$target" "corpus/$target" -- -max_total_time="$secs" -max_len=65536 -print_final_stats=1 2>&1 \
    | grep -E "^(stat::|#[0-9]+.*(DONE|pulse)|==[0-9]+== ERROR|SUMMARY|Done)" || true
done
