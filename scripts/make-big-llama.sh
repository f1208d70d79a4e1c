#!/usr/bin/env bash
# Write a 7B-shaped llama base with random weights (not committed: 3.8 GB in Q4_0, 13.5 GB in
# bf16), a rank-16 all-linear PEFT adapter and two works of 300 tokens, for the probe's memory
# check (docs/benchmarks.md, "The text probe at 7B"). Usage:
#   scripts/make-big-llama.sh OUT [q4_0|q8_0|q4k|q6k|bf16|f16] [7b|1b|tiny]
# then: /usr/bin/time -v target/release/lorascope probe OUT/adapter --base OUT/base-q4_0.gguf --works OUT/works
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release --example make-big-llama -- "$@"
