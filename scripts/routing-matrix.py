#!/usr/bin/env python3
"""Routing-quality matrix for BENCHMARKS.md: every policy on a suite of workloads and loads.

For each workload of the suite (generated kinds with two or three parameter settings each, and
the traces in the repo), the script measures the pool's capacity, then runs `epp-sim compare`
at three loads defined from it, over several seeds, for round robin, the upstream default, the
recommended default, the exact-cache oracle and any `--config NAME=FILE` given. It prints
Markdown tables (TTFT mean/p90/p99, prefix-hit rate, share of the oracle), checks the
recommended default against the upstream default in every cell, writes the raw numbers as JSON
and a heat map as SVG.

Capacity: the highest arrival rate (found by bisection on --rate-scale) at which the oracle
keeps its TTFT p90 within max(1 s, 3x its p90 at a light load). Loads: light 0.3x, near 0.85x,
over 1.3x that rate. Round robin and the EPP policies do not reach the oracle's capacity, so
"near" is already past theirs on some workloads: that is where routing matters.

"Beyond noise": the recommended default loses a cell on a metric when its value, averaged over
the seeds, exceeds the upstream default's by more than 5 % and by more than two standard errors
of the per-seed ratio.

Usage: scripts/routing-matrix.py [--bin target/release/epp-sim] [--quick] [--seeds N]
       [--config NAME=FILE ...] [--out DIR] [--svg FILE]
Needs a release build: cargo build --release -p epp-sim
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

PODS = 8
REQUESTS = 3000
POLICIES = ["round-robin", "upstream-default", "recommended", "oracle"]
LOADS = [("light", 0.3), ("near", 0.85), ("over", 1.3)]
TRACES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "simulator", "traces")

# (kind, variant label, arguments). The first variant of each kind is the one --quick runs.
SUITE = [
    ("doc-qa", "200 docs x 8k, zipf 1.0",
     ["--format", "doc-qa", "--documents", "200", "--document-tokens", "8192", "--zipf", "1.0",
      "--prefix-tokens", "256", "--question-tokens", "64", "--output-tokens", "256"]),
    ("doc-qa", "400 docs x 4k, zipf 0.8",
     ["--format", "doc-qa", "--documents", "400", "--document-tokens", "4096", "--zipf", "0.8",
      "--prefix-tokens", "256", "--question-tokens", "64", "--output-tokens", "256"]),
    ("doc-qa", "100 docs x 16k, zipf 1.2",
     ["--format", "doc-qa", "--documents", "100", "--document-tokens", "16384", "--zipf", "1.2",
      "--prefix-tokens", "256", "--question-tokens", "64", "--output-tokens", "256"]),
    ("chat", "6 turns, 10 s think",
     ["--format", "sessions", "--groups", "4", "--prefix-tokens", "1024", "--question-tokens", "256",
      "--output-tokens", "256", "--turns", "6", "--think-time", "10"]),
    ("chat", "12 turns, 30 s think, 512-token answers",
     ["--format", "sessions", "--groups", "4", "--prefix-tokens", "512", "--question-tokens", "128",
      "--output-tokens", "512", "--turns", "12", "--think-time", "30"]),
    ("system-prompts", "8 prompts x 2k, 32 users",
     ["--format", "shared-prefix", "--groups", "8", "--prefix-tokens", "2048", "--users", "32",
      "--question-tokens", "128", "--output-tokens", "128"]),
    ("system-prompts", "32 prompts x 6k, 16 users",
     ["--format", "shared-prefix", "--groups", "32", "--prefix-tokens", "6144", "--users", "16",
      "--question-tokens", "256", "--output-tokens", "128"]),
    ("agentic", "6k tools, 10 steps, 1k results",
     ["--format", "sessions", "--groups", "2", "--prefix-tokens", "6144", "--question-tokens", "1024",
      "--output-tokens", "96", "--turns", "10", "--think-time", "1"]),
    ("agentic", "12k tools, 20 steps, 512 results",
     ["--format", "sessions", "--groups", "4", "--prefix-tokens", "12288", "--question-tokens", "512",
      "--output-tokens", "64", "--turns", "20", "--think-time", "2"]),
    ("multi-lora", "8 adapters, zipf 1.0",
     ["--format", "multi-lora", "--adapters", "8", "--zipf", "1.0", "--prefix-tokens", "1024",
      "--question-tokens", "256", "--output-tokens", "128"]),
    ("multi-lora", "16 adapters, zipf 1.5",
     ["--format", "multi-lora", "--adapters", "16", "--zipf", "1.5", "--prefix-tokens", "512",
      "--question-tokens", "512", "--output-tokens", "128"]),
    ("mixed", "20 % of 8k among 256",
     ["--format", "mixed", "--groups", "4", "--prefix-tokens", "256", "--question-tokens", "256",
      "--long-fraction", "0.2", "--long-tokens", "8192", "--output-tokens", "128"]),
    ("mixed", "5 % of 32k among 512",
     ["--format", "mixed", "--groups", "4", "--prefix-tokens", "256", "--question-tokens", "512",
      "--long-fraction", "0.05", "--long-tokens", "32768", "--output-tokens", "256"]),
    ("mooncake", "conversation trace",
     ["--format", "mooncake", "--trace", os.path.join(TRACES, "mooncake_conversation_trace.jsonl")]),
    ("azure-conv", "2023 conversation trace",
     ["--format", "azure", "--trace", os.path.join(TRACES, "azure_llm_2023_conv.csv")]),
    ("azure-code", "2023 code trace",
     ["--format", "azure", "--trace", os.path.join(TRACES, "azure_llm_2023_code.csv")]),
]


def compare(binary, args, configs, scale, seed):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [binary, "compare", "--pods", str(PODS), "--json", out, "--seed", str(seed),
               "--rate-scale", f"{scale:.6g}"] + args
        if "--trace" in args:
            cmd += ["--limit", str(REQUESTS)]
        else:
            cmd += ["--requests", str(REQUESTS)]
        for c in configs:
            cmd += ["--config", c]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)["reports"]


def capacity(binary, args):
    """The rate scale at which the oracle stops meeting max(1 s, 3x its light-load p90)."""
    lo, hi = 0.125, 64.0
    light = compare(binary, args, ["oracle"], lo, 1)[0]["ttft"]["p90_s"]
    slo = max(1.0, 3 * light)
    for _ in range(8):
        mid = math.sqrt(lo * hi)
        if compare(binary, args, ["oracle"], mid, 1)[0]["ttft"]["p90_s"] <= slo:
            lo = mid
        else:
            hi = mid
    return lo, slo


def secs(s):
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def mean(xs):
    return sum(xs) / len(xs)


def loses(cand, base):
    """Whether per-seed values `cand` are worse than `base` beyond noise (see the docstring)."""
    ratios = [c / b for c, b in zip(cand, base) if b > 0]
    if not ratios:
        return False
    m = mean(ratios)
    se = (math.sqrt(sum((r - m) ** 2 for r in ratios) / (len(ratios) - 1) / len(ratios))
          if len(ratios) > 1 else 0.0)
    return mean(cand) > 1.05 * mean(base) and m > 1 + 2 * se


def heatmap(path, rows, policies):
    """An SVG grid: one row per (workload, load), one column per policy, mean TTFT / oracle's."""
    cell_w, cell_h, label_w, top = 118, 20, 330, 60
    width = label_w + cell_w * len(policies) + 20
    height = top + cell_h * len(rows) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="15">Mean TTFT as a multiple of the exact-cache oracle\'s '
           f'({PODS} simulated h100 pods; green = at the oracle, red = 4x or worse)</text>']
    for j, p in enumerate(policies):
        out.append(f'<text x="{label_w + j * cell_w + cell_w / 2}" y="{top - 8}" text-anchor="middle">{p}</text>')
    for i, (label, values) in enumerate(rows):
        y = top + i * cell_h
        out.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{label}</text>')
        for j, v in enumerate(values):
            x = label_w + j * cell_w
            t = 0.0 if v is None else min(1.0, max(0.0, math.log(max(v, 1.0)) / math.log(4.0)))
            r, g = int(60 + 195 * t), int(190 - 130 * t)
            fill = "#ddd" if v is None else f"rgb({r},{g},80)"
            text = "-" if v is None else f"{v:.2f}x"
            out.append(f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="{fill}"/>')
            out.append(f'<text x="{x + cell_w / 2}" y="{y + 14}" text-anchor="middle" fill="white">{text}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default="target/release/epp-sim")
    ap.add_argument("--quick", action="store_true", help="first variant of each kind, one seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--config", action="append", default=[], help="NAME=FILE, compared too")
    ap.add_argument("--only", action="append", default=[], help="run only these kinds")
    ap.add_argument("--out", default="target/routing-matrix")
    ap.add_argument("--svg", help="write the heat map here (default: OUT/matrix.svg)")
    a = ap.parse_args()
    if not os.access(a.bin, os.X_OK):
        sys.exit(f"{a.bin}: not found; build it with cargo build --release -p epp-sim")
    policies = POLICIES + [c.split("=", 1)[0] for c in a.config]
    specs = POLICIES + a.config
    seeds = [1] if a.quick else list(range(1, a.seeds + 1))
    seen, suite = set(), []
    for kind, label, args in SUITE:
        if a.only and kind not in a.only:
            continue
        if a.quick and kind in seen:
            continue
        seen.add(kind)
        suite.append((kind, label, args))
    os.makedirs(a.out, exist_ok=True)
    cells, losses, rows = [], [], []
    print(f"{PODS} pods (h100 profile), {REQUESTS} requests per run, seeds {seeds}; "
          "values are means over the seeds.\n")
    for kind, label, args in suite:
        cap, slo = capacity(a.bin, args)
        print(f"### {kind}: {label}\n")
        print(f"Capacity: rate scale {cap:.3g} (oracle TTFT p90 <= {secs(slo)}).\n")
        print("| load | policy | TTFT mean | TTFT p90 | TTFT p99 | prefix hits | x oracle mean | x oracle p90 | hits / oracle's |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for load, factor in LOADS:
            runs = {p: [] for p in policies}
            for seed in seeds:
                for r in compare(a.bin, args, specs, cap * factor, seed):
                    runs[r["name"]].append(r)
            agg = {}
            for p in policies:
                rs = runs[p]
                agg[p] = {
                    "mean": [r["ttft"]["mean_s"] for r in rs],
                    "p90": [r["ttft"]["p90_s"] for r in rs],
                    "p99": [r["ttft"]["p99_s"] for r in rs],
                    "hits": [r["prefix_hit_rate"] for r in rs],
                    "completed": [r["completed"] for r in rs],
                }
            o = agg["oracle"]
            for p in policies:
                x = agg[p]
                share_mean = mean(x["mean"]) / max(mean(o["mean"]), 1e-9)
                share_p90 = mean(x["p90"]) / max(mean(o["p90"]), 1e-9)
                hits = mean(x["hits"]) / max(mean(o["hits"]), 1e-9) if mean(o["hits"]) > 0 else None
                hits_text = "-" if hits is None else f"{hits:.2f}"
                print(f"| {load} | {p} | {secs(mean(x['mean']))} | {secs(mean(x['p90']))} | "
                      f"{secs(mean(x['p99']))} | {mean(x['hits']) * 100:.1f} % | {share_mean:.2f} | "
                      f"{share_p90:.2f} | {hits_text} |")
                cells.append({"kind": kind, "variant": label, "load": load, "rate_scale": cap * factor,
                              "policy": p, **{k: v for k, v in x.items()}})
            rows.append((f"{kind}: {label}, {load}",
                         [mean(agg[p]["mean"]) / max(mean(o["mean"]), 1e-9) for p in policies]))
            for cand in [p for p in policies if p not in ("round-robin", "upstream-default", "oracle")]:
                for metric in ("mean", "p90"):
                    if loses(agg[cand][metric], agg["upstream-default"][metric]):
                        losses.append(f"{cand} loses to upstream-default on TTFT {metric}: {kind} "
                                      f"({label}), {load}: {secs(mean(agg[cand][metric]))} vs "
                                      f"{secs(mean(agg['upstream-default'][metric]))}")
        print()
        sys.stdout.flush()
    print("### Against the upstream default\n")
    if losses:
        for line in losses:
            print(f"- {line}")
    else:
        print("- no cell where a candidate is worse than upstream-default beyond noise")
    with open(os.path.join(a.out, "matrix.json"), "w") as f:
        json.dump({"pods": PODS, "requests": REQUESTS, "seeds": seeds, "cells": cells}, f, indent=1)
    svg = a.svg or os.path.join(a.out, "matrix.svg")
    heatmap(svg, rows, policies)
    print(f"\nraw numbers: {os.path.join(a.out, 'matrix.json')}; heat map: {svg}", file=sys.stderr)


if __name__ == "__main__":
    main()
