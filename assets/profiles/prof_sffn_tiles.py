"""nano_sffn --impl triton (issue 12): its layer's fwd+bwd time for a few TILES (pairs BM, g columns
BN, reduced BK, d columns BD per Triton program; warps per program, pipeline stages), with the grouped path and the dense FFN beside
them in the same process; each tile's float32 error against compute_masked first (a wrong tile
must not win).

    python assets/profiles/prof_sffn_tiles.py                  # CUDA: N 16384, bf16, g 256 and 64
    TRITON_INTERPRET=1 python assets/profiles/prof_sffn_tiles.py --smoke   # CPU dry run, tiny

Prints a table (ms, eager, mean of --iters after 3 warm-up calls) and writes it as CSV to
$OUT/tiles.csv when OUT is set: g,BM,BN,BK,BD,warps,stages,ms,err,device,torch."""
import argparse, csv, dataclasses, os, sys, time
import torch
sys.path.insert(0, "."); sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
import nano_sffn as S

p = argparse.ArgumentParser()
p.add_argument("--smoke", action="store_true")
p.add_argument("--iters", type=int, default=30)
a = p.parse_args()
dev = "cuda" if torch.cuda.is_available() else "cpu"
N, d, c, d_m, GS = (16384, 512, 2048, 16384, (256, 64)) if not a.smoke else (64, 32, 32, 128, (16, 8))
dt = torch.bfloat16 if dev == "cuda" else torch.float32
T = lambda BM, BN, BK, BD, warps, stages: dict(BM=BM, BN=BN, BK=BK, BD=BD, warps=warps,  # noqa
                                                stages=stages)
GRID = [T(64, 64, 64, 128, 4, 3), T(128, 64, 64, 128, 4, 3),    # the defaults; session 20's best
        T(64, 64, 64, 128, 8, 3), T(128, 64, 64, 128, 8, 3),     # 8 warps
        T(128, 128, 64, 128, 8, 3), T(128, 128, 64, 128, 8, 4),  # larger tiles re-read fewer rows
        T(128, 64, 64, 256, 8, 3), T(64, 128, 64, 256, 8, 3), T(128, 128, 64, 256, 8, 3),
        T(64, 256, 64, 256, 8, 3)] if not a.smoke else [
        T(16, 16, 16, 16, 4, 3), T(32, 16, 16, 32, 8, 2)]
DEFAULT = dict(S.TILES)


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def ms(fn, iters):
    for i in range(3 + iters):
        if i == 3:
            sync(); t = time.perf_counter()
        fn()
    sync()
    return 1000 * (time.perf_counter() - t) / iters


def layer_for(g, dtype):
    cfg = S.validate(S.Config(selector="avgk", n_embd=d, n_head=1, n_layer=2, d_ff=c, d_m=d_m, g=g,
                              b=c // g, impl="triton"), dev)
    return S.SparseFFN(cfg, 1).to(dev, dtype)


def err(g):  # float32: triton vs masked, y and dx (the tile must not change the numbers)
    torch.manual_seed(0)
    layer = layer_for(g, torch.float32)
    x = torch.randn(min(N, 2048), d, device=dev, requires_grad=True)
    ids, w = layer.route(x)[0].detach(), None
    out = []
    for fn in (layer.compute_masked, lambda *z: S.compute_triton(layer, *z)):
        x.grad = None
        y = fn(x, ids, w)
        y.float().pow(2).sum().backward()
        out.append((y.detach().float(), x.grad.clone()))
    return max(((u - v).abs().max() / u.abs().max()).item() for u, v in zip(*out))


rows = []
info = dict(device=S.device_name(dev), torch=torch.__version__)
torch.manual_seed(0)
x = torch.randn(N, d, device=dev, dtype=dt, requires_grad=True)
gy = torch.randn(N, d, device=dev, dtype=dt)
dense = S.DenseFFN(d, c, "gelu", 2).to(dev, dt)
rows.append(dict(g="dense", path="dense", ms=ms(lambda: dense(x)[0].backward(gy), a.iters), **info))
for g in GS:
    layer = layer_for(g, dt)
    layer.impl = "grouped"
    if dev == "cpu" or S.native_grouped_ok(dev, dt, d, g, layer.B):
        rows.append(dict(g=g, path="grouped", ms=ms(lambda: layer(x)[0].backward(gy), a.iters), **info))
    layer.impl = "triton"
    for t in GRID:
        S.TILES.update(t)
        try:  # (a tile too big for shared memory fails to compile: recorded, not fatal)
            try:
                e = err(g)
            except Exception:  # noqa: BLE001  float32 tiles take twice the shared memory:
                S.TILES.update(stages=1)        # check at depth 1 (the same sums), time as given
                e = err(g)
                S.TILES.update(stages=t["stages"])
            rows.append(dict(g=g, path="triton", **t, err=f"{e:.1e}", **info, ms=ms(
                lambda: layer(x)[0].backward(gy), a.iters) if e < 1e-4 else None))
        except Exception as ex:  # noqa: BLE001
            rows.append(dict(g=g, path="triton", **t, err=type(ex).__name__, ms=None, **info))
    S.TILES.update(DEFAULT)
F = ["g", "path", "BM", "BN", "BK", "BD", "warps", "stages", "ms", "err", "device", "torch"]
print(" | ".join(F[:10]))
for r in rows:
    print(" | ".join(str(round(r[k], 3) if isinstance(r.get(k), float) else r.get(k, "")) for k in F[:10]))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "tiles.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=F, extrasaction="ignore"); w.writeheader(); w.writerows(rows)
