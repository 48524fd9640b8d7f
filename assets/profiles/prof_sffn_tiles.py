"""nano_sffn --impl triton (issue 12): its layer's fwd+bwd time for a few TILES (pairs BM, g columns
BN, reduced BK, d columns BD per Triton program), with the grouped path and the dense FFN beside
them in the same process; each tile's float32 error against compute_masked first (a wrong tile
must not win).

    python assets/profiles/prof_sffn_tiles.py                  # CUDA: N 16384, bf16, g 256 and 64
    TRITON_INTERPRET=1 python assets/profiles/prof_sffn_tiles.py --smoke   # CPU dry run, tiny

Prints a table (ms, eager, mean of --iters after 3 warm-up calls) and writes it as CSV to
$OUT/tiles.csv when OUT is set: g,BM,BN,BK,BD,ms,err,device,torch."""
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
GRID = [dict(BM=64, BN=64, BK=64, BD=128), dict(BM=128, BN=64, BK=64, BD=128),
        dict(BM=64, BN=128, BK=64, BD=128), dict(BM=64, BN=64, BK=32, BD=128),
        dict(BM=64, BN=64, BK=64, BD=64), dict(BM=128, BN=128, BK=32, BD=128),
        dict(BM=32, BN=64, BK=64, BD=256)] if not a.smoke else [
        dict(BM=16, BN=16, BK=16, BD=16), dict(BM=32, BN=16, BK=16, BD=32)]
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
        e = err(g)
        rows.append(dict(g=g, path="triton", **t, err=f"{e:.1e}",
                         ms=ms(lambda: layer(x)[0].backward(gy), a.iters) if e < 1e-4 else None, **info))
    S.TILES.update(DEFAULT)
F = ["g", "path", "BM", "BN", "BK", "BD", "ms", "err", "device", "torch"]
print(" | ".join(F[:8]))
for r in rows:
    print(" | ".join(str(round(r[k], 3) if isinstance(r.get(k), float) else r.get(k, "")) for k in F[:8]))
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "tiles.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=F, extrasaction="ignore"); w.writeheader(); w.writerows(rows)
