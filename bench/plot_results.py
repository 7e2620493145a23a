"""Plot the end-to-end and backward-by-depth results from the JSON lines the benchmarks append.

    python bench/plot_results.py bench/results/*.jsonl --out bench/results/h100.png

Left: mean time per training step split into forward / backward / optimizer (switch steps
included), ours vs the reference, per model. Right: backward time by active block depth with HF's
default gradient checkpointing and with our pruning.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEPTHS = ["first_layer", "middle_layer", "last_layer", "lm_head+last_layer", "all"]
LABELS = {"ours": "badam_ext", "ref": "badam 1.4"}


def load(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        with open(path) as fh:
            records += [json.loads(line) for line in fh if line.strip()]
    return records


def plot_e2e(ax, records: list[dict]) -> None:
    latest = {}  # the last record of each (model, variant) wins: files list older runs first
    for r in records:
        if r.get("kind") == "e2e" and r.get("status") == "ok" and r["variant"] in LABELS:
            latest[(r["model"], r["variant"])] = r
    rows = list(latest.values())
    labels, fwd, bwd, opt = [], [], [], []
    for r in sorted(rows, key=lambda r: (r["model"], r["variant"] != "ref")):
        labels.append(f"{r['model']}\n{LABELS[r['variant']]}")
        fwd.append(r["fwd_ms"])
        bwd.append(r["bwd_ms"])
        opt.append(r["mean_step_ms"] - r["fwd_ms"] - r["bwd_ms"])  # optimizer incl. switches, and gaps
    x = range(len(labels))
    ax.bar(x, fwd, label="forward")
    ax.bar(x, bwd, bottom=fwd, label="backward")
    ax.bar(x, opt, bottom=[f + b for f, b in zip(fwd, bwd)], label="optimizer + switch")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("ms per training step (mean over a block epoch)")
    ax.set_title("End to end, bf16, batch 2 x 1024, K = 2")
    ax.legend()


def plot_backward(ax, records: list[dict]) -> None:
    rows = {r["variant"]: r for r in records if r.get("kind") == "backward_by_depth" and r.get("model") == "8b"}
    width = 0.4
    for i, (variant, label) in enumerate((("gc_default", "HF defaults"), ("gc_pruned", "badam_ext pruning"))):
        if variant in rows:
            values = [rows[variant]["rows"][d]["bwd_ms"] for d in DEPTHS]
            ax.bar([j + (i - 0.5) * width for j in range(len(DEPTHS))], values, width, label=label)
    ax.set_xticks(range(len(DEPTHS)), [d.replace("_", " ") for d in DEPTHS], rotation=20)
    ax.set_ylabel("backward ms")
    ax.set_title("Llama-3-8B shape: backward by trainable block")
    ax.legend()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jsonl", nargs="+")
    parser.add_argument("--out", default="bench/results/h100.png")
    args = parser.parse_args(argv)
    records = load(args.jsonl)
    device = next((r.get("env", r).get("device") for r in records if r.get("env", r).get("device")), "?")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    plot_e2e(left, records)
    plot_backward(right, records)
    fig.suptitle(f"badam_ext vs reference BAdam on {device}")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
