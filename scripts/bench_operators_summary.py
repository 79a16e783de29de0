#!/usr/bin/env python3
"""Summarises one or more bench_operators runs (Google Benchmark JSON) as a Markdown table.

usage: bench_operators_summary.py RUN.json [RUN.json ...]
One row per storage / operator / thread count, one column per C: the target ratio of each cell,
vs_memcpy for PreMix and Update, vs_roofline for Coefficients, as the median over the runs with
the lowest and highest run in brackets. Above the table: each run's FMA peak (1 / 2 threads),
which says whether the run was disturbed (another guest on the vCPUs halves the 2-thread peak),
and the range of the peak measured next to the timed Coefficients calls (their vs_roofline uses it).
Below it, for the fused Coefficients + PreMix forward (runs from 2026-11-30 on): its vs_roofline,
and the time of the separate Coefficients and PreMix forwards over the fused call's.
"""
import json
import statistics
import sys


def cell(values):
    """The median of a cell's values, with the lowest and highest in brackets ("-" if none)."""
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.2f} ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else f"{med:.2f}"


def main():
    runs = []
    for path in sys.argv[1:]:
        data = json.load(open(path))
        runs.append({b["name"].replace("/real_time", ""): b for b in data["benchmarks"]})
    peaks = "; ".join(
        "%d / %d" % (round(r["fma_peak/1/iterations:1"]["GFLOPs"]),
                     round(r["fma_peak/2/iterations:1"]["GFLOPs"])) for r in runs)
    print(f"{len(runs)} run(s); FMA peak, GFLOP/s on 1 / 2 threads: {peaks}")
    # The peak measured next to every timed Coefficients call (runs from commit 99cb4ad on).
    for threads in (1, 2):
        now = [b["fma_peak_GFLOPs"] for r in runs for k, b in r.items()
               if "/Coefficients/" in k and k.endswith(f"threads:{threads}")
               and "fma_peak_GFLOPs" in b]
        if now:
            print(f"FMA peak next to the Coefficients calls, {threads} thread(s): "
                  f"{min(now):.0f}-{max(now):.0f} GFLOP/s")
    print()
    print("| storage | operator | threads | C = 1024 | C = 4096 | C = 7168 |")
    print("|---|---|---|---|---|---|")
    for storage in ("float", "bf16"):
        for op in ("PreMix/forward", "PreMix/backward", "Update/forward", "Update/backward",
                   "Coefficients/forward", "Coefficients/backward"):
            counter = "vs_roofline" if op.startswith("Coefficients") else "vs_memcpy"
            for threads in (1, 2):
                cells = []
                for C in (1024, 4096, 7168):
                    key = f"{storage}/{op}/C:{C}/threads:{threads}"
                    cells.append(cell([r[key][counter] for r in runs if key in r]))
                print(f"| {storage} | {op.replace('/', ' ')} ({counter}) | {threads} | "
                      + " | ".join(cells) + " |")
    # The fused forward (Coefficients::forward with u): its vs_roofline on (n+1)Cs, and the time
    # of the two separate calls (Coefficients forward + PreMix forward, same run) over its own.
    fused = [k for r in runs for k in r if "/CoefficientsPreMix/" in k]
    if not fused:
        return
    print()
    print("| storage | fused Coefficients + PreMix forward | threads "
          "| C = 1024 | C = 4096 | C = 7168 |")
    print("|---|---|---|---|---|---|")
    for storage in ("float", "bf16"):
        for threads in (1, 2):
            for what in ("vs_roofline", "separate / fused"):
                cells = []
                for C in (1024, 4096, 7168):
                    tail = f"/C:{C}/threads:{threads}"
                    key = f"{storage}/CoefficientsPreMix/forward{tail}"
                    parts = (f"{storage}/Coefficients/forward{tail}",
                             f"{storage}/PreMix/forward{tail}")
                    if what == "vs_roofline":
                        values = [r[key]["vs_roofline"] for r in runs if key in r]
                    else:
                        values = [(r[parts[0]]["real_time"] + r[parts[1]]["real_time"])
                                  / r[key]["real_time"]
                                  for r in runs if key in r and all(p in r for p in parts)]
                    cells.append(cell(values))
                print(f"| {storage} | {what} | {threads} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
