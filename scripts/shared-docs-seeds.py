#!/usr/bin/env python3
"""The shared-documents pool in the simulator over many seeds (BENCHMARKS.md, "Simulator against
real servers").

One seed of `epp-bench shared-docs` is one draw of the warm-up: which server is busy prefilling
what when each document's first question arrives decides where the documents land, and a server
left with more documents than its cache keeps recomputes them for the rest of the run. A
comparison on one seed is therefore partly a lottery. This runs `--simulate ... --sim-only` once
per seed (llama-server only tokenizes the prompts; seconds per seed) and reports, per
configuration, the mean and median over the seeds of the mean TTFT, the worst seed, the mean
TTFT p90, the mean cached share and the seeds where fewer than 85 % of prompt tokens were cached
(a document placed where it does not fit).

    scripts/shared-docs-seeds.py --configs round-robin,upstream-default,recommended --seeds 1-20
    scripts/shared-docs-seeds.py --seeds 1-10 -- --docs 6     # arguments after -- go to shared-docs
"""

import argparse
import statistics
import subprocess
import sys

BASE = ["--servers", "2", "--doc-tokens", "1000", "--ctx", "2048", "--cache-ram-mib", "24",
        "--requests", "100", "--sim-only"]
HERDED_BELOW = 85.0


def seeds(text):
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def run(binary, profile, configs, seed, extra):
    rate = [] if "--rate" in extra else ["--rate", "0.5"]
    cmd = [binary, "shared-docs", *BASE, "--simulate", profile, *rate, "--seed", str(seed),
           "--configs", configs, *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        if not line.startswith("| ") or line.startswith("| Config"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        # Config, mean real, mean sim, ratio, p50 real, p50 sim, p90 real, p90 sim, cached real, cached sim.
        rows[cells[0]] = (float(cells[2].split()[0]), float(cells[7].split()[0]),
                          float(cells[9].split()[0]))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", default="target/release/epp-bench")
    p.add_argument("--profile", default="simulator/profiles/llamacpp-gemma3-270m-cpu.yaml",
                   help="engine profile (calibrate it on the machine: scripts/calibrate-llamacpp.py)")
    p.add_argument("--configs", default="round-robin,upstream-default,recommended")
    p.add_argument("--seeds", default="1-20", help="FIRST-LAST")
    p.add_argument("extra", nargs="*", help="more shared-docs arguments (after --)")
    a = p.parse_args()
    runs = {}
    for s in seeds(a.seeds):
        for name, values in run(a.bin, a.profile, a.configs, s, a.extra).items():
            runs.setdefault(name, []).append((s, *values))
        print(f"seed {s} done", file=sys.stderr)
    print("| Config | Mean TTFT, mean over seeds | median | worst seed | TTFT p90, mean | Cached | "
          f"Seeds under {HERDED_BELOW:.0f} % cached |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        means = [x[1] for x in r]
        herded = [str(x[0]) for x in r if x[3] < HERDED_BELOW]
        print(f"| {name} | {statistics.mean(means):.2f} s | {statistics.median(means):.2f} s | "
              f"{max(means):.2f} s | {statistics.mean(x[2] for x in r):.2f} s | "
              f"{statistics.mean(x[3] for x in r):.1f} % | {len(herded)} of {len(r)}"
              f"{' (' + ', '.join(herded) + ')' if herded else ''} |")


if __name__ == "__main__":
    main()
