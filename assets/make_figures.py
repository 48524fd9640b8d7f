"""Build the README's GPU tables and figures from the raw runs in assets/*_gpu_runs.csv.

    python assets/make_figures.py          # prints the markdown tables, writes assets/*.png

Every README number about a GPU run comes from these CSVs (one row per run: device, torch, commit)."""
import csv
import math
import os
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


def read(name):
    path = os.path.join(HERE, name)
    return list(csv.DictReader(open(path))) if os.path.exists(path) else []


def mean_half_range(xs):
    return sum(xs) / len(xs), (max(xs) - min(xs)) / 2


def simple_block_sweep(rows, steps=1000):
    """Final val loss against peak LR per block (the LR sweep of issue 11), table and plot."""
    sweep = defaultdict(dict)  # block -> lr -> [val]; nan (diverged) counts as +inf when ranking
    for r in rows:
        if int(r["steps"]) == steps:
            sweep[r["block"]].setdefault(float(r["lr"]), []).append(float(r["val_loss"]))
    rank = lambda v: min(x if x == x else math.inf for x in v)  # noqa: E731
    order = [b for b in ("preln", "parallel", "vskip", "sas", "sasp", "sasp_nonorm") if b in sweep]
    lrs = sorted({lr for b in order for lr in sweep[b]})
    print(f"\nLR sweep, {steps} steps, val loss (best per block in bold):\n")
    print("| block | " + " | ".join(f"{lr:g}" for lr in lrs) + " | best LR |")
    print("|---" * (len(lrs) + 2) + "|")
    for b in order:
        best = min(sweep[b], key=lambda lr: rank(sweep[b][lr]))
        cells = []
        for lr in lrs:
            v = sweep[b].get(lr)
            s = "" if v is None else f"{sum(v) / len(v):.4f}".replace("nan", "NaN")
            cells.append(f"**{s}**" if lr == best else s)
        edge = " (grid edge)" if best in (min(sweep[b]), max(sweep[b])) else ""
        print(f"| {b} | " + " | ".join(cells) + f" | {best:g}{edge} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for b in order:
        xs = sorted(sweep[b])
        ys = [sum(sweep[b][x]) / len(sweep[b][x]) for x in xs]
        line, = ax.plot(xs, ys, "o-", label=b)
        bad = [x for x, y in zip(xs, ys) if not y == y]  # diverged (NaN): marked at the top
        ax.plot(bad, [5.0] * len(bad), "x", color=line.get_color(), ms=9)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], fontsize=8)
    ax.set_ylim(1.6, 5.1)
    ax.set_xlabel("peak learning rate (x at the top: NaN loss)")
    ax.set_ylabel(f"val loss after {steps} steps")
    ax.set_title("18 x 768, T 128, batch 128, pycode_all GPT-2 BPE (H200)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "simple_block_lr_sweep.png"), dpi=110)


def sffn_probe(rows):
    """The dead-block probe: variants of Avg-K at g=256, 3000 steps."""
    print("\nAvg-K dead-block probe (g=256, 3000 steps = 49M tokens, seed 1337):\n")
    print("| variant | K init std | selection scores | val loss | dead blocks (mean) | "
          "dead by layer (1/3/5/7) | max/mean load by layer |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if int(r["steps"]) == 3000 and r["selector"] == "avgk":
            print(f"| {r['variant']} | {r['key_init_std']} | "
                  f"{'float32' if r['select_fp32'] == 'True' else 'bf16'} | {r['val_loss']} | "
                  f"{float(r['dead_frac']):.1%} | {r['dead_by_layer']} | {r['maxload_by_layer']} |")


if __name__ == "__main__":
    simple_block_sweep(read("simple_block_gpu_runs.csv"))
    sffn_probe(read("sffn_gpu_runs.csv"))
