"""A candidate for nano_sffn's weight-gradient kernel (issue 12, session 21): split every block's
pairs into chunks of CH, one program per chunk, partial sums added into a float32 output.

Why: nano_sffn.weight_grad runs one program per (block, g tile, d tile) and loops over all of the
block's pairs. Avg-K's routing grows skewed in training (a block can take every token: max/mean
load B/b = 8), so one program does up to 8x the mean work while the others idle. In session 21 the
triton path's training speed fell as the routing skewed (g 64: 678k -> 625k tok/s between steps
250 and 500) and the step profile put its weight gradient at 2.1 ms per step at g 256, twice what
the kernel takes alone on uniform routing (0.125 ms a call, 8 calls a step). Not yet timed on a GPU.

    out[e*G + i] = sum over block e's pairs m of a[m, i] src[tok[m]]     (nano_sffn.weight_grad)
    chunk c = (block e, pairs [lo_e + j*CH, min(lo_e + (j+1)*CH, hi_e)))   one program each

The chunk list is built on the device (no host sync): n_e = ceil(count_e / CH) chunks for block e,
first[e] = their first index, and chunk c's block by a searchsorted over the cumulative counts. The
grid has the fixed bound ceil(M/CH) + B; programs past the last chunk add nothing.

    python assets/profiles/sffn_wgrad_split.py --bench [--smoke]   # kernels alone, uniform and
                                         # skewed routing: both weight gradients, pair_mm's two
    python assets/profiles/sffn_wgrad_split.py CH=512 -- <nano_sffn args>   # training with it
Run from the repository root; tests/test_sffn_wgrad_split.py checks it against nano_sffn's."""
from __future__ import annotations  # (the kernel's tl.constexpr annotations stay unevaluated)

import os
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import nano_sffn as S  # noqa: E402

CH = 512          # pairs per chunk (a multiple of TILES["BM"])
_K, tl = {}, None  # the compiled kernel; triton.language (weight_grad_split())


def _wgrad_split(a, tok, offs, first, cblk, src, out, D, G, B, CH, PREC: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    c = tl.program_id(0)
    e = tl.load(cblk + c)                                  # this chunk's block; B: no chunk
    ec = tl.minimum(e, B - 1)
    lo_e = tl.where(ec > 0, tl.load(offs + tl.maximum(ec - 1, 0)), 0)
    hi_e = tl.load(offs + ec)
    lo = lo_e + (c - tl.load(first + ec)) * CH
    hi = tl.where(e < B, tl.minimum(lo + CH, hi_e), lo)
    rg, rd = tl.program_id(1) * BN + tl.arange(0, BN), tl.program_id(2) * BK + tl.arange(0, BK)
    mg, md = rg < G, rd < D
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(lo, hi, BM):
        rm = m0 + tl.arange(0, BM)
        mm = rm < hi
        t = tl.load(tok + rm, mask=mm, other=0).to(tl.int64)
        at = tl.load(a + rm.to(tl.int64)[None, :] * G + rg[:, None],
                     mask=mg[:, None] & mm[None, :], other=0)      # (BN, BM) a^T
        s = tl.load(src + t[:, None] * D + rd[None, :], mask=mm[:, None] & md[None, :],
                    other=0)                                       # (BM, BK) src[tok]
        acc += tl.dot(at, s, input_precision=PREC)
    tl.atomic_add(out + (ec * G + rg).to(tl.int64)[:, None] * D + rd[None, :], acc,
                  mask=(mg & (rg * 0 + e < B))[:, None] & md[None, :], sem="relaxed")


def chunks(offs, M, ch):
    """offs (B,) cumulative pair ends -> first (B,) int32, the first chunk of each block, and
    cblk (ceil(M/ch) + B,) int32, each chunk's block (B past the last chunk). On device."""
    B = offs.numel()
    cnt = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())          # pairs per block
    n = (cnt + ch - 1) // ch                                                  # chunks per block
    end = n.cumsum(0)
    cid = torch.arange(-(-M // ch) + B, device=offs.device)
    return (end - n).to(torch.int32), torch.searchsorted(end, cid, right=True).to(torch.int32)


def weight_grad_split(a, src, tok, offs, g, dtype):
    """nano_sffn.weight_grad's result, (B*g, d) in dtype, by chunks of CH pairs."""
    global tl
    if "k" not in _K:
        import triton
        import triton.language as tl
        _K["k"] = triton.jit(_wgrad_split)
    B, D, M, T = offs.numel(), src.shape[1], tok.numel(), S.TILES
    first, cblk = chunks(offs, M, CH)
    out = torch.zeros(B * g, D, device=src.device, dtype=torch.float32)
    BN, BK = S._tile("BN", g), S._tile("BD", D)
    _K["k"][(cblk.numel(), -(-g // BN), -(-D // BK))](
        a.contiguous(), tok, offs, first, cblk, src.contiguous(), out, D, g, B, CH,
        "ieee" if a.dtype == torch.float32 else None, T["BM"], BN, BK,
        num_warps=T["warps"], num_stages=T["stages"])
    return out.to(dtype)


def routing(N, B, b, hot, dev):
    """(N, b) distinct blocks per token: a share `hot` of the tokens take blocks 0..b-1 (each of
    those then carries about hot*N + (1-hot)*N*b/B pairs), the rest a uniform random set."""
    ids = torch.rand(N, B, device=dev).topk(b, -1).indices
    take = torch.rand(N, device=dev) < hot
    ids[take] = torch.arange(b, device=dev)
    return ids


def bench(smoke):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    N, d, c, d_m, GS = (16384, 512, 2048, 16384, (256, 64)) if not smoke else (
        64, 32, 64, 256, (32,))
    if dev == "cuda":
        import triton.testing
        timer = lambda fn: triton.testing.do_bench(fn, return_mode="median")  # noqa: E731
    else:
        timer = lambda fn: (fn(), 0.0)[1]  # noqa: E731  (the interpreter: a dry run)
    print("g | hot | max/mean load | weight_grad ms | split ms | speedup | rel err | gather ms | "
          "scatter ms")
    for g in GS:
        b, B = c // g, d_m // g
        for hot in (0.0, 0.5, 1.0):
            torch.manual_seed(0)
            blk, _, tok, offs = S.sort_pairs(routing(N, B, b, hot, dev), B)
            cnt = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())
            h = torch.randn(N * b, g, device=dev, dtype=dt)
            x = torch.randn(N, d, device=dev, dtype=dt)
            ref = S.weight_grad(h, x, tok, offs, g, torch.float32)
            new = weight_grad_split(h, x, tok, offs, g, torch.float32)
            err = ((new - ref).abs().max() / ref.abs().max()).item()
            t0 = timer(lambda: S.weight_grad(h, x, tok, offs, g, torch.float32))
            t1 = timer(lambda: weight_grad_split(h, x, tok, offs, g, torch.float32))
            Wt = torch.randn(d_m, d, device=dev, dtype=dt) * 0.02   # the skew's cost to pair_mm
            tg = timer(lambda: S.pair_mm(x, tok, blk, Wt, g, None))
            ts = timer(lambda: S.pair_mm(h, tok, blk, Wt, g, N))
            print(f"{g} | {hot} | {(cnt.max() / cnt.float().mean()).item():.1f} | {t0:.4f} | "
                  f"{t1:.4f} | {t0 / t1 if t1 else float('nan'):.2f} | {err:.1e} | {tg:.4f} | "
                  f"{ts:.4f}", flush=True)


if __name__ == "__main__":
    if "--bench" in sys.argv:
        bench("--smoke" in sys.argv)
    else:
        cut = sys.argv.index("--")
        for kv in sys.argv[1:cut]:
            CH = int(kv.split("=")[1])
        S.weight_grad = weight_grad_split       # the custom op calls nano_sffn.weight_grad
        print("weight_grad: split, CH", CH, flush=True)
        S.main(sys.argv[cut + 1:])
