#!/usr/bin/env python3
"""Turns Google Benchmark JSON (--benchmark_out_format=json) into a Markdown table.

usage: bench_table.py RESULT.json [COUNTER ...]
Prints one row per benchmark: name, real time, and the requested counters (all user counters when
none are named). Context (CPU, caches, date) goes in a header line.
"""
import json
import sys


def fmt(value):
    if isinstance(value, (int, float)):
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 1e9:
            return f"{value / 1e9:.3g} G"
        if a >= 1e6:
            return f"{value / 1e6:.3g} M"
        if a >= 1e3:
            return f"{value / 1e3:.3g} k"
        return f"{value:.3g}"
    return str(value)


def main():
    data = json.load(open(sys.argv[1]))
    wanted = sys.argv[2:]
    ctx = data["context"]
    caches = ", ".join(f"L{c['level']} {c['size'] // 1024} KiB" for c in ctx.get("caches", [])
                       if c["type"] in ("Data", "Unified"))
    print(f"_{ctx.get('date', '')}, {ctx.get('num_cpus', '?')} CPUs at "
          f"{ctx.get('mhz_per_cpu', '?')} MHz, {caches}, library build "
          f"{ctx.get('library_build_type', '?')}_\n")
    rows = [b for b in data["benchmarks"] if b.get("run_type", "iteration") == "iteration"]
    skip = {"name", "run_name", "run_type", "repetitions", "repetition_index", "threads",
            "iterations", "real_time", "cpu_time", "time_unit", "family_index",
            "per_family_instance_index", "aggregate_name", "aggregate_unit", "label"}
    if not wanted:
        wanted = []
        for b in rows:
            for k in b:
                if k not in skip and k not in wanted:
                    wanted.append(k)
    print("| benchmark | time | " + " | ".join(wanted) + " |")
    print("|---|---|" + "---|" * len(wanted))
    for b in rows:
        t = f"{b['real_time']:.4g} {b['time_unit']}"
        cells = [fmt(b.get(k, "")) for k in wanted]
        print(f"| {b['name']} | {t} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
