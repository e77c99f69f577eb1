#!/usr/bin/env python3
"""Sums Nsight Compute's `gpu__time_duration.sum` per kernel name from `ncu --csv` output (see
benches/gpu-check.sh): `kernel_times.py ncu.csv PARAMS` prints each kernel's launches and total time,
largest first, and the totals per training step, counting steps as Adam launches / PARAMS (one Adam
kernel per parameter per step)."""
import collections, csv, sys

rows = [r for r in csv.reader(open(sys.argv[1], errors="replace")) if len(r) > 10]
head = rows[0]
name_col, metric_col, value_col = head.index("Kernel Name"), head.index("Metric Name"), head.index("Metric Value")
unit_col = head.index("Metric Unit")
total, count = collections.Counter(), collections.Counter()
for r in rows[1:]:
    if r[metric_col] != "gpu__time_duration.sum":
        continue
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(r[unit_col], 1.0)
    name = r[name_col].split("(")[0][:60]
    total[name] += float(r[value_col].replace(",", "")) * scale
    count[name] += 1
params = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
steps = max(count["adam"] / params, 1e-9)
print(f"{'kernel':60} {'launches':>8} {'us total':>10}")
for name, us in total.most_common():
    print(f"{name:60} {count[name]:8d} {us:10.1f}")
print(f"all kernels: {sum(count.values())} launches, {sum(total.values()):.1f} us; {steps:.2f} steps:"
      f" {sum(count.values()) / steps:.0f} launches and {sum(total.values()) / steps:.1f} us of kernels per step")
