#!/usr/bin/env bash
# Renders every kustomization under manifests/ and validates the output offline against the
# Kubernetes 1.32 schemas (strict: unknown fields fail). Custom resources (InferencePool,
# InferenceObjective, Gateway, HTTPRoute, ServiceMonitor) have no schema there: the pool and
# objective examples are parsed into the EPP's own types by `cargo test` (tests/manifests.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  python3 -m pip install --quiet kubernetes-validate==1.32.0
  hash -r
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for dir in manifests/base manifests/examples manifests/overlays/*/ manifests/envoy; do
  dir=${dir%/}
  file="$out/$(echo "$dir" | tr / -).yaml"
  if ! kubectl kustomize "$dir" > "$file"; then
    echo "FAIL render $dir"; status=1; continue
  fi
  if kubernetes-validate --strict --quiet --no-warn "$file"; then
    echo "ok   $dir ($(grep -c '^kind:' "$file") objects)"
  else
    echo "FAIL validate $dir"; status=1
  fi
done
exit $status
