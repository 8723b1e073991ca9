#!/usr/bin/env python3
"""Flow-control matrix for BENCHMARKS.md: overload and noisy-neighbour runs of the simulator.

Runs `epp-sim compare` (release build) over generated noisy-neighbour workloads and prints
Markdown tables:

1. Overload: steady traffic (no flood) at 1.5x, 2x and 3x the pool's capacity, with and
   without flow control: TTFT p50/p90/p99 of admitted requests, goodput (requests/s with a
   first token within 2 s), refusals by reason.
2. Noisy neighbour: the same tenants with and without `team-0` flooding at F times its share
   for the middle half of the run, the steady load chosen so that the flood brings the pool to
   2x its capacity; for each configuration, the worst quiet tenant's TTFT p90 without and with
   the flood, their ratio (target <= 1.5), the flooder's p90 and Jain's index. Varied over
   tenants, shared-prefix length, flood factor and seed, so no one workload decides.

Usage: scripts/flow-control-matrix.py [--bin target/release/epp-sim] [--quick]
Capacity: 200 requests/s for 4 pods of the `h100` profile on this workload shape (round robin
at 1,000 requests/s completes 198/s); the script measures it again and prints it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

CONFIGS = ["upstream-default", "flow-control", "recommended", "flow-control-rr", "flow-control-fair"]
PODS = 4


def compare(binary, args, configs):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [binary, "compare", "--format", "noisy-neighbour", "--pods", str(PODS), "--json", out]
        cmd += args
        for c in configs:
            cmd += ["--config", c]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


def capacity(binary):
    """Requests/s round robin completes when arrivals far exceed what the pool serves."""
    j = compare(binary, ["--requests", "8000", "--rate", "1000", "--flood-factor", "1"], ["round-robin"])
    r = j["reports"][0]
    return r["completed"] / r["simulated_s"]


def secs(s):
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def overload(binary, cap):
    print("### Overload: steady traffic above capacity\n")
    print(f"{PODS} pods (h100 profile), 4 tenants, 2,048-token system prompts, 128-token questions "
          f"and answers, 30 s of arrivals, seed 1; capacity {cap:.0f} requests/s.\n")
    print("| load | config | done | TTFT p50 | TTFT p90 | TTFT p99 | TPOT p50 | goodput TTFT<=2s | goodput +TPOT<=100ms | refused |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for factor in (1.5, 2.0, 3.0):
        rate = cap * factor
        j = compare(binary, ["--requests", str(int(rate * 30)), "--rate", f"{rate:.1f}",
                             "--flood-factor", "1", "--seed", "1"], CONFIGS)
        for s in j["results"]:
            refused = ", ".join(f"{k} {v}" for k, v in sorted(s["refused"].items())) or "-"
            print(f"| {factor}x | {s['name']} | {s['completed']} | {secs(s['ttft_p50_s'])} | "
                  f"{secs(s['ttft_p90_s'])} | {secs(s['ttft_p99_s'])} | {secs(s['tpot_p50_s'])} | "
                  f"{s['goodput_rps']:.1f} | {s['goodput_slo_rps']:.1f} | {refused} |")
    print()


def tenants_p90(report):
    rows = report["tenants"]["rows"]
    quiet = [r["ttft"]["p90_s"] for r in rows if r["tenant"] != "team-0"]
    flooder = [r["ttft"]["p90_s"] for r in rows if r["tenant"] == "team-0"]
    return max(quiet), flooder[0] if flooder else 0.0, report["tenants"]["jain_index"]


def noisy(binary, cap, quick):
    print("### Noisy neighbour: one tenant floods, the pool at 2x capacity during the flood\n")
    print("Steady load 0.6x capacity shared by the tenants; `team-0` floods for the middle half of "
          "the run at the factor that brings the pool to 2x capacity. Cells: the worst quiet "
          "tenant's TTFT p90 without the flood -> with it (ratio; target <= 1.5), the flooder's "
          "p90 with the flood, and Jain's index of served over max-min fair tokens.\n")
    cases = []
    for tenants in (4, 8):
        for prefix in (2048, 512):
            for seed in ((1,) if quick else (1, 2)):
                # Flood load = rate * (1 + (flood - 1) / tenants) = 2 x capacity at rate 0.6 x.
                flood = round(1 + (2 / 0.6 - 1) * tenants, 1)
                cases.append((tenants, prefix, flood, seed))
    names = [c.split("=")[0] for c in CONFIGS]
    header = "| tenants | prefix | flood | seed | " + " | ".join(names) + " |"
    print(header)
    print("|---:|---:|---:|---:|" + "---|" * len(CONFIGS))
    worst = {c: 0.0 for c in names}
    for tenants, prefix, flood, seed in cases:
        rate = 0.6 * cap
        common = ["--tenants", str(tenants), "--prefix-tokens", str(prefix), "--rate", f"{rate:.1f}",
                  "--requests", str(int(rate * 40)), "--seed", str(seed)]
        calm = compare(binary, common + ["--flood-factor", "1"], CONFIGS)
        storm = compare(binary, common + ["--flood-factor", str(flood)], CONFIGS)
        cells = []
        for c, r in zip(calm["reports"], storm["reports"]):
            q0, _, _ = tenants_p90(c)
            q1, f1, jain = tenants_p90(r)
            ratio = q1 / q0 if q0 > 0 else float("inf")
            worst[r["name"]] = max(worst[r["name"]], ratio)
            cells.append(f"{secs(q0)} -> {secs(q1)} ({ratio:.1f}x); flooder {secs(f1)}; J {jain:.2f}")
        print(f"| {tenants} | {prefix} | {flood}x | {seed} | " + " | ".join(cells) + " |")
    print()
    print("Worst ratio over the matrix: " + ", ".join(f"{c} {worst[c]:.1f}x" for c in names) + "\n")


def sheddable(binary, cap):
    print("### Sheddable traffic under a flood\n")
    print("`flow-control-fair` with `team-0`'s objective at priority -1 (sheddable) and a 10 s TTL; "
          "4 tenants, 2,048-token prompts, steady 0.6x capacity, `team-0` floods to 2x. Target: "
          "sheddable requests are shed before any other request waits past its TTL.\n")
    here = os.path.dirname(os.path.abspath(__file__))
    text = open(os.path.join(here, "..", "simulator", "configs", "flow-control-fair.yaml")).read()
    text = text.replace("- type: token-weighted-fairness-policy\n",
                        "- type: token-weighted-fairness-policy\n- type: inference-objectives\n"
                        "  parameters:\n    objectives: [{name: team-0, priority: -1}]\n")
    text = text.replace("flowControl:\n", "flowControl:\n  defaultRequestTTL: 10s\n")
    print("| seed | tenant | priority | requests | done | refused | TTFT p50 | TTFT p90 | TTFT p99 |")
    print("|---:|---|---:|---:|---:|---|---:|---:|---:|")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        for seed in (1, 2):
            rate = 0.6 * cap
            j = compare(binary, ["--tenants", "4", "--rate", f"{rate:.1f}", "--requests", str(int(rate * 40)),
                                 "--flood-factor", "10.3", "--seed", str(seed)], [f"sheddable={f.name}"])
            for r in j["reports"][0]["tenants"]["rows"]:
                refused = ", ".join(f"{k} {v}" for k, v in sorted(r["refused"].items())) or "-"
                prio = -1 if r["tenant"] == "team-0" else 0
                print(f"| {seed} | {r['tenant']} | {prio} | {r['requests']} | {r['completed']} | {refused} | "
                      f"{secs(r['ttft']['p50_s'])} | {secs(r['ttft']['p90_s'])} | {secs(r['ttft']['p99_s'])} |")
    print()


def long_prompts(binary, cap):
    print("### A flood of long prompts: token-weighted vs round-robin fairness\n")
    print("4 tenants, steady 0.6x capacity; `team-0` sends 3x its share in the middle half, its "
          "flood's questions 4,096 tokens long instead of 128 (a flood in tokens more than in "
          "requests). Worst quiet tenant's TTFT p90 without the flood -> with it, and the "
          "flooder's p90.\n")
    configs = ["upstream-default", "flow-control", "recommended", "flow-control-rr", "flow-control-fair"]
    print("| seed | " + " | ".join(configs) + " |")
    print("|---:|" + "---|" * len(configs))
    for seed in (1, 2):
        rate = 0.6 * cap
        common = ["--tenants", "4", "--rate", f"{rate:.1f}", "--requests", str(int(rate * 40)),
                  "--seed", str(seed), "--flood-question-tokens", "4096"]
        calm = compare(binary, common + ["--flood-factor", "1"], configs)
        storm = compare(binary, common + ["--flood-factor", "3"], configs)
        cells = []
        for c, r in zip(calm["reports"], storm["reports"]):
            q0, _, _ = tenants_p90(c)
            q1, f1, _ = tenants_p90(r)
            cells.append(f"{secs(q0)} -> {secs(q1)}; flooder {secs(f1)}")
        print(f"| {seed} | " + " | ".join(cells) + " |")
    print()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", default="target/release/epp-sim")
    p.add_argument("--quick", action="store_true", help="one seed per noisy-neighbour case")
    p.add_argument("--config", action="append", default=[], help="another configuration, NAME=FILE")
    a = p.parse_args()
    CONFIGS.extend(a.config)
    if not os.path.exists(a.bin):
        sys.exit(f"{a.bin} not found: cargo build --release -p epp-sim")
    cap = capacity(a.bin)
    overload(a.bin, cap)
    noisy(a.bin, cap, a.quick)
    sheddable(a.bin, cap)
    long_prompts(a.bin, cap)


if __name__ == "__main__":
    main()
