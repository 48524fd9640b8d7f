"""nano_sffn --impl triton (issue 12): each Triton kernel timed alone, for a grid of launch configs,
at the gpu preset's shapes (N 16384 tokens, d 512, c 2048, d_m 16384, bf16), uniform random
blocks. A layer's fwd+bwd calls each kind twice:
    gather   pair_mm(a, ..., n_tok=None)  (N*b, g) = a[tok] W_e^T, reduced over d  (pre; dh)
    scatter  pair_mm(a, ..., n_tok=N)     (N, d)  += a W_e, reduced over g         (y; dx)
    wgrad    weight_grad(a, src, ...)     (B*g, d) = a_e^T src[tok_e]               (dK; dV)
A config changes only the tiles (TILES: BM pairs, BN g columns, BK reduced, BD d columns; warps,
stages), so each config's output is checked against the defaults' (bf16, relative 2e-2) before
it is timed (triton.testing.do_bench, median ms, GPU-bound: each call is 0.1-0.3 ms of work).
Prints the best config per (g, kernel) with its TFLOP/s; writes $OUT/kernels.csv if OUT is set.

    python assets/profiles/prof_sffn_kernels.py                 # CUDA
    TRITON_INTERPRET=1 python assets/profiles/prof_sffn_kernels.py --smoke   # CPU dry run"""
import argparse, csv, itertools, os, sys, time
import torch
sys.path.insert(0, "."); sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
import nano_sffn as S  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--smoke", action="store_true")
a = p.parse_args()
dev = "cuda" if torch.cuda.is_available() else "cpu"
N, d, c, d_m, GS = (16384, 512, 2048, 16384, (256, 64)) if not a.smoke else (64, 32, 64, 256, (32,))
dt = torch.bfloat16 if dev == "cuda" else torch.float32
DEFAULT = dict(S.TILES)
KEYS = dict(gather=("BM", "BN", "BK"), scatter=("BM", "BD", "BK"), wgrad=("BM", "BN", "BD"))
VALUES = dict(BM=(64, 128), BN=(64, 128, 256), BK=(64,), BD=(128, 256)) if not a.smoke else dict(
    BM=(16, 32), BN=(16, 32), BK=(16,), BD=(16, 32))


def bench(fn):
    if dev == "cpu":  # (the interpreter: one timed call is enough for a dry run)
        fn(); t = time.perf_counter(); fn(); return 1000 * (time.perf_counter() - t)
    import triton.testing
    return triton.testing.do_bench(fn, return_mode="median")


def calls(g):
    """The three kernel kinds on fresh inputs of one layer at block size g -> {kind: fn}."""
    b, B = c // g, d_m // g
    torch.manual_seed(0)
    ids = torch.rand(N, B, device=dev).topk(b, -1).indices            # (N, b) distinct blocks
    blk, order, tok, offs = S.sort_pairs(ids, B)
    x, W = torch.randn(N, d, device=dev, dtype=dt), torch.randn(d_m, d, device=dev, dtype=dt) * 0.02
    h = torch.randn(N * b, g, device=dev, dtype=dt)
    return dict(gather=lambda: S.pair_mm(x, tok, blk, W, g, None),
                scatter=lambda: S.pair_mm(h, tok, blk, W, g, N),
                wgrad=lambda: S.weight_grad(h, x, tok, offs, g, torch.float32)), 2 * N * b * g * d


def effective(kind, g, t):  # the tiles a kernel really uses (_tile clamps BN to g, BD to d)
    n = dict(BN=g, BD=d, BK=d if kind == "gather" else g, BM=1 << 30)
    return tuple(min(t[k], max(16, 1 << (n[k] - 1).bit_length())) for k in KEYS[kind]) + (
        t["warps"], t["stages"])


rows, info = [], dict(device=S.device_name(dev), torch=torch.__version__)
for g in GS:
    fns, flop = calls(g)
    for kind, fn in fns.items():
        S.TILES.update(DEFAULT)
        ref = fn().float()
        seen = set()
        for vals in itertools.product(*(VALUES[k] for k in KEYS[kind]), (4, 8), (3, 4)):
            t = dict(DEFAULT, **dict(zip(KEYS[kind] + ("warps", "stages"), vals)))
            if effective(kind, g, t) in seen:
                continue
            seen.add(effective(kind, g, t))
            S.TILES.update(t)
            row = dict(g=g, kernel=kind, **{k: t[k] for k in KEYS[kind]}, warps=t["warps"],
                       stages=t["stages"], **info)
            try:  # (too much shared memory: fails to compile, recorded)
                e = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                ms = bench(fn) if e < 2e-2 else None
                row.update(err=f"{e:.1e}", ms=ms, tflops=ms and round(flop / ms / 1e9, 1))
            except Exception as ex:  # noqa: BLE001
                row.update(err=type(ex).__name__, ms=None, tflops=None)
            rows.append(row)
S.TILES.update(DEFAULT)
F = ["g", "kernel", "BM", "BN", "BK", "BD", "warps", "stages", "ms", "tflops", "err", "device",
     "torch"]
print(" | ".join(F[:11]))
for r in rows:
    print(" | ".join(str(round(r[k], 4) if isinstance(r.get(k), float) else r.get(k, ""))
                     for k in F[:11]))
for g in GS:
    for kind in KEYS:
        ok = [r for r in rows if r["g"] == g and r["kernel"] == kind and r["ms"]]
        first = next((r for r in ok if all(r.get(k) in (None, DEFAULT[k]) for k in F[2:8])), ok[0])
        best = min(ok, key=lambda r: r["ms"])
        print(f"g {g} {kind}: default {first['ms']:.4f} ms, best {best['ms']:.4f} ms "
              f"({first['ms'] / best['ms']:.2f}x) at", {k: best.get(k) for k in F[2:8]})
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "kernels.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=F, extrasaction="ignore"); w.writeheader(); w.writerows(rows)
