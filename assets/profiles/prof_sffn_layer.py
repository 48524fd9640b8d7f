"""nano_sffn layer: profile the grouped path, and time candidate fast paths side by side (fwd+bwd)."""
import os, sys, time, dataclasses, torch, torch.nn.functional as F
sys.path.insert(0, "."); sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nano_sffn as S
from profutil import prof

d, c, dm, N = 512, 2048, 16384, 8192
cfg = S.parse_config(["--device", "cuda", "--n_embd", str(d), "--d_ff", str(c), "--d_m", str(dm)])
dev = "cuda"; dt = torch.bfloat16

class Expand(torch.autograd.Function):
    """x (N, d) -> x[tok] (N*b, d); backward: gather grads back by inv and sum over the b copies."""
    @staticmethod
    def forward(ctx, x, tok, inv, b):
        ctx.save_for_backward(inv); ctx.b = b
        return x[tok]
    @staticmethod
    def backward(ctx, g):
        inv, = ctx.saved_tensors
        N = inv.numel() // ctx.b
        return g[inv].view(N, ctx.b, -1).sum(1), None, None, None

class Collapse(torch.autograd.Function):
    """ys (N*b, d) sorted pairs -> y (N, d) = sum over each token's b pairs; backward: gather by tok."""
    @staticmethod
    def forward(ctx, ys, tok, inv, b):
        ctx.save_for_backward(tok); ctx.b = b
        N = inv.numel() // b
        return ys[inv].view(N, b, -1).sum(1)
    @staticmethod
    def backward(ctx, g):
        tok, = ctx.saved_tensors
        return g[tok], None, None, None

def prep(layer, x, ids):
    N, b, B = x.shape[0], layer.b, layer.B
    blk, order = ids.reshape(-1).sort(stable=True)
    tok = order // b
    offs = torch.searchsorted(blk, torch.arange(B, device=x.device), right=True).to(torch.int32)
    inv = torch.empty_like(order); inv[order] = torch.arange(order.numel(), device=x.device)
    return blk, order, tok, offs, inv

def v_plainidx(layer, x, ids, w=None, wscale_h=True):
    """index gather + y = ys[inv].view(N,b,d).sum(1) (autograd's own backward)."""
    N, b, B, g = x.shape[0], layer.b, layer.B, layer.g
    dtp = S.compute_dtype(x)
    blk, order, tok, offs, inv = prep(layer, x, ids)
    xs = x.to(dtp)[tok]
    K3t = layer.K.view(B, g, -1).to(dtp).transpose(-2, -1)
    h = layer.act(S.grouped_mm(xs, K3t, offs))
    ys = S.grouped_mm(h, layer.V.view(B, g, -1).to(dtp), offs)
    return ys[inv].view(N, b, -1).sum(1)

def v_custom(layer, x, ids, w=None):
    """Expand/Collapse custom Functions: every data movement is a gather."""
    N, b, B, g = x.shape[0], layer.b, layer.B, layer.g
    dtp = S.compute_dtype(x)
    blk, order, tok, offs, inv = prep(layer, x, ids)
    xs = Expand.apply(x.to(dtp), tok, inv, b)
    K3t = layer.K.view(B, g, -1).to(dtp).transpose(-2, -1)
    h = layer.act(S.grouped_mm(xs, K3t, offs))
    ys = S.grouped_mm(h, layer.V.view(B, g, -1).to(dtp), offs)
    return Collapse.apply(ys, tok, inv, b)

def v_custom_Kcontig(layer, x, ids, w=None):
    """as v_custom, but K used as (B, g, d) with grouped_mm on x (N*b,d) @ K^T via contiguous transposed copy."""
    N, b, B, g = x.shape[0], layer.b, layer.B, layer.g
    dtp = S.compute_dtype(x)
    blk, order, tok, offs, inv = prep(layer, x, ids)
    xs = Expand.apply(x.to(dtp), tok, inv, b)
    K3t = layer.K.view(B, g, -1).to(dtp).transpose(-2, -1).contiguous()
    h = layer.act(S.grouped_mm(xs, K3t, offs))
    ys = S.grouped_mm(h, layer.V.view(B, g, -1).to(dtp), offs)
    return Collapse.apply(ys, tok, inv, b)

def ms(fn, iters=50, warm=5):
    for i in range(warm + iters):
        if i == warm:
            torch.cuda.synchronize(); t = time.perf_counter()
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t) / iters

torch.manual_seed(0)
x = torch.randn(N, d, device=dev, dtype=dt, requires_grad=True)
gy = torch.randn(N, d, device=dev, dtype=dt)
dense = S.DenseFFN(d, c, cfg.activation, cfg.n_layer).to(dev, dt)
res = {"dense": ms(lambda: dense(x)[0].backward(gy))}
print(f"torch {torch.__version__} {torch.cuda.get_device_name()} N={N} d={d} c={c} d_m={dm}")
print(f"dense {res['dense']:.3f} ms")
prof(lambda: dense(x)[0].backward(gy), 10, "dense FFN fwd+bwd", top=8)
for g in (2048, 256, 64):
    bc = S.validate(dataclasses.replace(cfg, selector="avgk", g=g, b=0, impl="grouped"), dev)
    for pdt, label in ((dt, "bf16 params"), (torch.float32, "fp32 params + autocast")):
        layer = S.SparseFFN(bc, 1).to(dev, pdt)
        xx = x if pdt == dt else x
        with torch.no_grad(), torch.autocast("cuda", dt):
            ids = layer.route(x.detach())[0]
        with torch.autocast("cuda", dt, enabled=(pdt != dt)):
            ref = layer.compute_masked(x.detach().float().to(pdt) if pdt != dt else x.detach(), ids, None).float()
        row = {}
        fns = {"masked": lambda: layer.compute_masked(x, ids, None),
               "grouped": lambda: S.compute_grouped(layer, x, ids, None),
               "plainidx": lambda: v_plainidx(layer, x, ids),
               "custom": lambda: v_custom(layer, x, ids),
               "custom_Kc": lambda: v_custom_Kcontig(layer, x, ids)}
        for name, f in fns.items():
            with torch.autocast("cuda", dt, enabled=(pdt != dt)):
                out = f().float()
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                row[name] = ms(lambda: f().backward(gy))
            print(f"g={g} b={bc.b} B={layer.B} [{label}] {name:10s} {row[name]:7.3f} ms  {row[name] / res['dense']:5.2f}x dense  relerr {err:.1e}")
        # compiled versions of the best candidates
        for name in ("grouped", "custom"):
            f = torch.compile(fns[name])
            try:
                with torch.autocast("cuda", dt, enabled=(pdt != dt)):
                    t = ms(lambda: f().backward(gy))
                print(f"g={g} [{label}] compiled {name:10s} {t:7.3f} ms  {t / res['dense']:5.2f}x dense")
            except Exception as e:
                print(f"g={g} [{label}] compiled {name} FAILED {type(e).__name__}: {str(e)[:200]}")
        if pdt == dt and g in (256, 64):
            prof(lambda: S.compute_grouped(layer, x, ids, None).backward(gy), 10, f"grouped g={g} fwd+bwd (bf16 params)")
            prof(lambda: v_custom(layer, x, ids).backward(gy), 10, f"custom g={g} fwd+bwd (bf16 params)", top=15)
