"""nano_sffn's sparse FFN (issue 12): candidate fast paths of the grouped computation, each checked
against the exact reference SparseFFN.compute_masked and timed side by side with the dense FFN.

    TRITON_INTERPRET=1 python assets/profiles/prof_sffn_variants.py --check   # CPU, small shapes
    python assets/profiles/prof_sffn_variants.py --smoke --budget 0 --iters 1  # CPU dry run
    python assets/profiles/prof_sffn_variants.py                               # CUDA: table + prof

The CUDA run (one H200, ~3.5 min): at N 16384, d 512, c 2048, d_m 16384 and g 256, 64, each
candidate's bf16 error against compute_masked, its fwd+bwd ms eager and compiled (compiles that
would start after --budget s are skipped, in CANDIDATES' order), the dense FFN as the unit, the
forward-only rows, eager, no autograd: the key side (d), the value side (e), and the whole forward
fwd:grouped (compute_grouped's) vs fwd:triton_fused ((d) -> f -> (e): no (N*b, d) pair tensor
written), each with its bf16 error against compute_masked; then prof() of the fastest candidate
per g; the table goes to stdout and, with OUT set, to $OUT/variants.md and $OUT/variants.csv.

Every candidate has nano_sffn.compute_grouped's signature (layer, x, ids, w, pre=None) -> y (N, d).
They differ only in how the (N*b, d) pair rows move: the expand x[tok] and the pair sum
y[n] = sum_j ys[inv[n, j]] (SumPairs forward, ExpandPairs backward); triton_fused_all, (f), moves
none: its forward and backward write no (N*b, d) tensor at all. Triton is imported lazily,
only for the Triton candidates; without it (or without CUDA and TRITON_INTERPRET=1) they are
skipped.
"""
import argparse
import csv
import dataclasses
import functools
import importlib.util
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if importlib.util.find_spec("nano_sffn") is None:     # run as a script from anywhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import nano_sffn as S  # noqa: E402

TOL = 1e-5  # --check: max |candidate - masked| / max |masked| of y, dx, dK, dV in float32


# ---- the sorted (token, block) pairs, exactly as compute_grouped builds them
def pairs(ids, B):
    """ids (N, b) -> tok (N*b,) token of each sorted pair, inv (N, b) sorted position of pair
    (n, j), order (N*b,) the sort permutation, offs (B,) int32 cumulative group ends."""
    N, b = ids.shape
    blk, order = ids.reshape(-1).sort(stable=True)
    tok = order // b
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * b, device=ids.device))
    offs = torch.searchsorted(blk, torch.arange(B, device=ids.device), right=True)
    return tok, inv.view(N, b), order, offs.to(torch.int32)


def grouped_with(expand, collapse):
    """compute_grouped with its two row movements replaced: xs = expand(x, tok, inv) (N*b, d)
    and y = collapse(ys, tok, inv) (N, d). Everything else is nano_sffn's code path."""
    def fn(layer, x, ids, w=None, pre=None):
        assert pre is None, "VanillaM's pre is not a candidate here"
        B, g, dt = layer.B, layer.g, S.compute_dtype(x)
        tok, inv, order, offs = pairs(ids, B)
        xs = expand(x.to(dt), tok, inv)                                   # (N*b, d)
        K3t = layer.K.view(B, g, -1).to(dt).transpose(-2, -1)             # (B, d, g)
        h = layer.act(S.grouped_mm(xs, K3t, offs))                        # (N*b, g)
        ys = S.grouped_mm(h, layer.V.view(B, g, -1).to(dt), offs)         # (N*b, d)
        if w is not None:
            ys = ys * w.reshape(-1)[order].to(ys.dtype).unsqueeze(-1)
        return collapse(ys, tok, inv)
    return fn


def index_rows(t, idx):       # the row gather as nano_sffn writes it
    return t[idx]


def with_pair_sum(gsum, rows=index_rows):
    """The candidate whose pair sum gsum(src, tok, inv) -> (N, d), sum_j src[inv[n, j]], runs in
    both SumPairs forward and ExpandPairs backward; rows(t, tok) the gathers x[tok], dy[tok]."""
    class Expand(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, tok, inv):
            ctx.save_for_backward(tok, inv)
            return rows(x, tok)

        @staticmethod
        def backward(ctx, dxs):
            return gsum(dxs.contiguous(), *ctx.saved_tensors), None, None

    class Sum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, ys, tok, inv):
            ctx.save_for_backward(tok, inv)
            return gsum(ys.contiguous(), tok, inv)

        @staticmethod
        def backward(ctx, dy):
            return rows(dy, ctx.saved_tensors[0]), None, None

    return grouped_with(Expand.apply, Sum.apply)


# ---- (b) plain-PyTorch pair sums: src (N*b, d) sorted pairs, tok (N*b,), inv (N, b) -> (N, d)
def sum_isel(src, tok, inv):    # one contiguous gather, then a contiguous sum over b
    return src.index_select(0, inv.view(-1)).view(*inv.shape, -1).sum(1)


def sum_isel_f32(src, tok, inv):  # the same, the sum asked for in float32, cast back
    pairs3 = src.index_select(0, inv.view(-1)).view(*inv.shape, -1)
    return pairs3.sum(1, dtype=torch.float32).to(src.dtype)


def sum_index_add(src, tok, inv):  # scatter-add into a float32 (N, d) (atomics on CUDA)
    out = src.new_zeros(inv.shape[0], src.shape[1], dtype=torch.float32)
    return out.index_add_(0, tok, src.float()).to(src.dtype)


# ---- (c) Triton gather-reduce: y[n, :] = sum_j src[inv[n, j], :], float32 accumulation
_KERNEL = {}


def triton_ok(device_type):
    """Triton importable, and a device it can run on (CUDA, or the CPU interpreter)."""
    return importlib.util.find_spec("triton") is not None and (
        device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def gather_sum_kernel():
    if "k" not in _KERNEL:
        global triton, tl
        import triton
        import triton.language as tl

        @triton.jit
        def _gather_sum(src, inv, out, N, D, b, BN: tl.constexpr, BD: tl.constexpr):
            rn = tl.program_id(0) * BN + tl.arange(0, BN)           # tokens of this program
            rd = tl.program_id(1) * BD + tl.arange(0, BD)           # columns of this program
            mn, md = rn < N, rd < D
            m2 = mn[:, None] & md[None, :]
            acc = tl.zeros((BN, BD), dtype=tl.float32)
            for j in range(b):                                      # the token's b pairs
                row = tl.load(inv + rn.to(tl.int64) * b + j, mask=mn, other=0)
                v = tl.load(src + row.to(tl.int64)[:, None] * D + rd[None, :], mask=m2, other=0)
                acc += v.to(tl.float32)
            dst = out + rn.to(tl.int64)[:, None] * D + rd[None, :]
            tl.store(dst, acc.to(out.dtype.element_ty), mask=m2)
        _KERNEL["k"] = _gather_sum
    return _KERNEL["k"]


def sum_triton(src, tok, inv, BN=16, BD=256, warps=4):
    N, b = inv.shape
    D = src.shape[1]
    out = src.new_empty(N, D)
    k = gather_sum_kernel()                                         # imports triton
    BD = min(BD, triton.next_power_of_2(D))
    grid = (triton.cdiv(N, BN), triton.cdiv(D, BD))
    k[grid](src, inv.contiguous(), out, N, D, b, BN=BN, BD=BD, num_warps=warps)
    return out


# ---- (d) FORWARD ONLY, a measurement: Triton gather-GEMM of the key side (ScatterMoE's idea),
# h[m] = x[tok[m]] K_e^T for sorted pair m of block e, read straight from x: xs is never written
def gather_mm_kernel():
    if "mm" not in _KERNEL:
        gather_sum_kernel()                                         # imports triton, tl

        @triton.jit
        def _gather_mm(x, tok, blk, K, h, M, D, G, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr):
            m0 = tl.program_id(0) * BM
            rm = m0 + tl.arange(0, BM)                              # sorted pairs
            rn = tl.program_id(1) * BN + tl.arange(0, BN)           # cells of the block
            mm, mn = rm < M, rn < G
            t = tl.load(tok + rm, mask=mm, other=0).to(tl.int64)    # their tokens
            e_row = tl.load(blk + rm, mask=mm, other=-1)            # their blocks (sorted)
            e_lo, e_hi = tl.load(blk + m0), tl.load(blk + tl.minimum(m0 + BM, M) - 1)
            out = tl.zeros((BM, BN), dtype=tl.float32)
            for e in range(e_lo, e_hi + 1):                         # blocks met by this tile
                acc = tl.zeros((BM, BN), dtype=tl.float32)
                for k0 in range(0, D, BK):
                    rk = k0 + tl.arange(0, BK)
                    mk = rk < D
                    a = tl.load(x + t[:, None] * D + rk[None, :], mask=mm[:, None] & mk[None, :],
                                other=0)                            # (BM, BK) gathered rows
                    kr = (e * G + rn[None, :]).to(tl.int64)         # key rows of block e
                    b = tl.load(K + kr * D + rk[:, None], mask=mn[None, :] & mk[:, None],
                                other=0)                            # (BK, BN) = K_e^T chunk
                    acc += tl.dot(a, b)
                out = tl.where((e_row == e)[:, None], acc, out)
            dst = h + rm.to(tl.int64)[:, None] * G + rn[None, :]
            tl.store(dst, out.to(h.dtype.element_ty), mask=mm[:, None] & mn[None, :])
        _KERNEL["mm"] = _gather_mm
    return _KERNEL["mm"]


def key_side_triton(layer, x, ids, BM=64, BN=64, BK=64, srt=None):
    """h (N*b, g) = f(x[tok] K_e^T) in sorted-pair order, no autograd; x in the compute dtype.
    srt: (blk, order) = ids.reshape(-1).sort(stable=True) if the caller sorted already.
    Under TRITON_INTERPRET=1 a bfloat16 tl.dot is garbage (the interpreter multiplies the bit
    patterns, triton-lang/triton#11584): --smoke's bf16 error of this row is meaningless; the
    float32 --check and the CUDA run's bf16 check are the ones to read."""
    k = gather_mm_kernel()
    blk, order = ids.reshape(-1).sort(stable=True) if srt is None else srt
    tok, M, D, g = order // ids.shape[1], ids.numel(), x.shape[1], layer.g
    BN = min(BN, max(16, triton.next_power_of_2(g)))
    h = x.new_empty(M, g)
    K = layer.K.to(x.dtype)
    k[(triton.cdiv(M, BM), triton.cdiv(g, BN))](x.contiguous(), tok, blk, K, h, M, D, g,
                                                 BM=BM, BN=BN, BK=BK)
    return layer.act(h)


def key_side_grouped(layer, x, ids):
    """The same as nano_sffn computes it: xs = x[tok] written, then torch's grouped GEMM."""
    B, g = layer.B, layer.g
    tok, inv, order, offs = pairs(ids, B)
    K3t = layer.K.view(B, g, -1).to(x.dtype).transpose(-2, -1)
    return layer.act(S.grouped_mm(x[tok], K3t, offs))


KEY_SIDE = {"key_fwd:grouped": (key_side_grouped, False),
            "key_fwd:triton_gather_mm": (key_side_triton, True)}


# ---- (e) FORWARD ONLY, a measurement: Triton scatter-GEMM of the value side. y (N, d) float32
# += h[m] V_e for every sorted pair m of block e, added straight into row tok[m] (tl.atomic_add):
# ys (N*b, d) is never written, nor read back by a pair sum. At N 16384, d 512 y is 33.5 MB, in
# the H200's 50 MB L2. With (d) before it, the whole forward writes no (N*b, d) tensor.
def scatter_mm_kernel():
    if "smm" not in _KERNEL:
        gather_sum_kernel()                                         # imports triton, tl

        # One program per (BM sorted pairs, BD columns of d). A tile may meet several blocks
        # (sorted, so a contiguous range e_lo..e_hi, the empty ones in between cost a masked
        # load each): it loops over them as _gather_mm does, each block's rows read under a
        # mask, all into one accumulator, then ONE atomic add per tile. Splitting tiles at
        # block boundaries instead would need a data-dependent tile schedule (an extra kernel
        # and a grid sized on the host: a sync, or an over-sized grid); at the timed shapes a
        # block holds ~N*b/B = 2048 pairs, so a 64-pair tile meets 1 block, rarely 2.
        # Two pairs of one token in one tile (blocks e and e+1) are two atomic adds: correct.
        @triton.jit
        def _scatter_mm(h, tok, blk, V, y, M, D, G, BM: tl.constexpr, BD: tl.constexpr,
                        BK: tl.constexpr):
            m0 = tl.program_id(0) * BM
            rm = m0 + tl.arange(0, BM)                              # sorted pairs
            rd = tl.program_id(1) * BD + tl.arange(0, BD)           # columns of d
            mm, md = rm < M, rd < D
            t = tl.load(tok + rm, mask=mm, other=0).to(tl.int64)    # their tokens
            e_row = tl.load(blk + rm, mask=mm, other=-1)            # their blocks (sorted)
            e_lo, e_hi = tl.load(blk + m0), tl.load(blk + tl.minimum(m0 + BM, M) - 1)
            acc = tl.zeros((BM, BD), dtype=tl.float32)
            for e in range(e_lo, e_hi + 1):                         # blocks met by this tile
                me = mm & (e_row == e)                              # this block's rows only
                for k0 in range(0, G, BK):
                    rk = k0 + tl.arange(0, BK)                      # cells of the block
                    mk = rk < G
                    a = tl.load(h + rm.to(tl.int64)[:, None] * G + rk[None, :],
                                mask=me[:, None] & mk[None, :], other=0)     # (BM, BK)
                    vr = (e * G + rk).to(tl.int64)                  # value rows of block e
                    v = tl.load(V + vr[:, None] * D + rd[None, :],
                                mask=mk[:, None] & md[None, :], other=0)     # (BK, BD)
                    acc += tl.dot(a, v)
            tl.atomic_add(y + t[:, None] * D + rd[None, :], acc,
                          mask=mm[:, None] & md[None, :], sem="relaxed")
        _KERNEL["smm"] = _scatter_mm
    return _KERNEL["smm"]


def value_side_triton(layer, h, ids, w=None, BM=64, BD=128, BK=64, warps=4, srt=None):
    """y (N, d) float32 = sum over sorted pairs m of w[m] h[m] V_e, scattered by atomic add to
    row tok[m]; h (N*b, g) in sorted-pair order (and in the compute dtype: V is cast to it, as
    compute_grouped does); no autograd. srt: (blk, order) if the caller sorted already.
    As for (d): under TRITON_INTERPRET=1 only float32 is right (bf16 tl.dot, triton#11584).
    The float32 atomic adds make y's summation order (so its last bits) vary run to run."""
    k = scatter_mm_kernel()
    blk, order = ids.reshape(-1).sort(stable=True) if srt is None else srt
    tok, M, g = order // ids.shape[1], ids.numel(), layer.g
    D = layer.V.shape[1]
    if w is not None:                                # h is small (N*b*g = N*c): scale it
        h = h * w.reshape(-1)[order].to(h.dtype).unsqueeze(-1)
    BK = min(BK, max(16, triton.next_power_of_2(g)))
    BD = min(BD, max(16, triton.next_power_of_2(D)))
    y = torch.zeros(ids.shape[0], D, device=h.device, dtype=torch.float32)
    k[(triton.cdiv(M, BM), triton.cdiv(D, BD))](h.contiguous(), tok, blk, layer.V.to(h.dtype), y,
                                                M, D, g, BM=BM, BD=BD, BK=BK, num_warps=warps)
    return y


def value_side_grouped(layer, h, ids, w=None):
    """The same as nano_sffn computes it: ys = grouped_mm(h, V_e) written, then the pair sum."""
    B, g = layer.B, layer.g
    tok, inv, order, offs = pairs(ids, B)
    ys = S.grouped_mm(h, layer.V.view(B, g, -1).to(h.dtype), offs)
    if w is not None:
        ys = ys * w.reshape(-1)[order].to(ys.dtype).unsqueeze(-1)
    return ys[inv].sum(1, dtype=torch.float32)


VALUE_SIDE = {"value_fwd:grouped": (value_side_grouped, False),
              "value_fwd:triton_scatter_mm": (value_side_triton, True),
              # small tiles: --check's d 80 then spans 3 column tiles, N*b several row tiles
              "value_fwd:triton_scatter_mm_32x32": (functools.partial(value_side_triton, BM=32,
                                                                      BD=32, BK=16), True)}


# ---- the whole forward, no autograd: (layer, x, ids, w=None) -> y (N, d) in compute_dtype(x)
def fwd_grouped(layer, x, ids, w=None):
    """nano_sffn.compute_grouped's forward (called under no_grad): xs, ys written."""
    return S.compute_grouped(layer, x, ids, w)


def fwd_triton_fused(layer, x, ids, w=None, value_kw=None):
    """(d) -> f -> (e): h read straight from x, y added straight into its rows; no (N*b, d)
    tensor is written, only h (N*b, g) and y (N, d) float32. K, V cast to the compute dtype
    inside (as compute_grouped does), y cast to it at the end."""
    dt = S.compute_dtype(x)
    srt = ids.reshape(-1).sort(stable=True)                        # one sort for both sides
    h = key_side_triton(layer, x.to(dt), ids, srt=srt)            # f(x[tok] K_e^T), (N*b, g)
    y = value_side_triton(layer, h, ids, w, srt=srt, **(value_kw or {}))
    return y.to(dt)


# What a full fused fwd+bwd would save (an estimate; (f) below builds it). One (N*b, d) bf16
# pair tensor is N*b*d*2 bytes = 537 MB at g 64 (b 32), 134 MB at g 256 (b 8), N 16384, d 512;
# h (N*b, g) = N*c is 67 MB at both, y float32 33.5 MB. compute_grouped moves 10 of them per
# layer call: forward xs written + read by the K GEMM, ys written + read by the pair sum (4; xs
# also stays saved until the backward); backward dys = dy[tok] written + read by the dh and the
# dV GEMMs, dxs written + read by the pair sum of dx, the saved xs read by the dK GEMM (6). A
# fused backward would read dy and x rows straight by tok (dh_m = dy[tok[m]] V_e^T as (d);
# dV_e = h_e^T dy[tok] and dK_e = dpre_e^T x[tok] as gather grouped GEMMs, no dys, no saved
# xs) and scatter dx += dpre_m K_e by atomic adds as (e): 10 x 537 MB = 5.4 GB of HBM traffic
# less at g 64 (1.3 GB at g 256), ~1.3 ms (0.3 ms) at ~4 TB/s, and 537 MB (134 MB) less
# activation memory per layer. From the CUDA run's rows: the forward removes 4 of the 10, so
# fused fwd+bwd saving ~ 2.5 x (fwd:grouped - fwd:triton_fused) if the backward's kernels keep
# the forward's GEMM efficiency, with a second atomic scatter (dx) to pay; if fwd:triton_fused
# is not faster than fwd:grouped, the atomics or the gather-GEMMs cost more than the bytes
# saved and the fused backward is not worth building.
FWD = {"fwd:grouped": (fwd_grouped, False),
       "fwd:triton_fused": (fwd_triton_fused, True),
       "fwd:triton_fused_128x64": (functools.partial(fwd_triton_fused,
                                                     value_kw=dict(BM=128, BD=64)), True)}


# ---- (f) the full fused fwd+bwd candidate: no (N*b, d) pair tensor written, forward or backward.
# Forward (d) -> f -> (e) as fwd_triton_fused; backward dh = dy[tok] V_e^T by (d) with V (reads dy
# by index), dx += dpre_m K_e by (e) with K (float32 atomics), dV_e = (w h)_e^T dy[tok_e] and
# dK_e = dpre_e^T x[tok_e] by the weight-gradient kernel below. Saved: x, pre (N*b, g), the pairs.
def weight_grad_kernel():
    if "wg" not in _KERNEL:
        gather_sum_kernel()                                         # imports triton, tl

        # One program per (block e, BG cells, BD columns of d): out rows e*G + rg = sum over the
        # block's sorted pairs m in [offs[e-1], offs[e]) (read here: no host sync) of
        # a[m, rg]^T src[tok[m], rd], BM pairs a step, float32. Each output element is written
        # by exactly one program (an empty block writes zeros): no atomics, no zero fill.
        @triton.jit
        def _weight_grad(a, tok, offs, src, out, D, G, BM: tl.constexpr, BG: tl.constexpr,
                         BD: tl.constexpr):
            e = tl.program_id(0)
            rg = tl.program_id(1) * BG + tl.arange(0, BG)           # cells of block e
            rd = tl.program_id(2) * BD + tl.arange(0, BD)           # columns of d
            mg, md = rg < G, rd < D
            lo = tl.where(e > 0, tl.load(offs + tl.maximum(e - 1, 0)), 0)
            hi = tl.load(offs + e)                                  # the block's pairs [lo, hi)
            acc = tl.zeros((BG, BD), dtype=tl.float32)
            for m0 in range(lo, hi, BM):
                rm = m0 + tl.arange(0, BM)
                mm = rm < hi
                t = tl.load(tok + rm, mask=mm, other=0).to(tl.int64)
                at = tl.load(a + rm.to(tl.int64)[None, :] * G + rg[:, None],
                             mask=mg[:, None] & mm[None, :], other=0)       # (BG, BM) a^T
                s = tl.load(src + t[:, None] * D + rd[None, :],
                            mask=mm[:, None] & md[None, :], other=0)        # (BM, BD) src[tok]
                acc += tl.dot(at, s)
            dst = out + (e * G + rg).to(tl.int64)[:, None] * D + rd[None, :]
            tl.store(dst, acc.to(out.dtype.element_ty), mask=mg[:, None] & md[None, :])
        _KERNEL["wg"] = _weight_grad
    return _KERNEL["wg"]


def gather_mm(src, tok, blk, W, G, BM=64, BN=64, BK=64):
    """(M, G) in src's dtype: row m = src[tok[m]] W_e^T, W (B*G, D) cast to src's dtype."""
    k, M, D = gather_mm_kernel(), tok.numel(), src.shape[1]        # imports triton
    BN = min(BN, max(16, triton.next_power_of_2(G)))
    out = src.new_empty(M, G)
    k[(triton.cdiv(M, BM), triton.cdiv(G, BN))](
        src.contiguous(), tok, blk, W.to(src.dtype).contiguous(), out, M, D, G,
        BM=BM, BN=BN, BK=BK)
    return out


def scatter_mm(a, tok, blk, W, N, BM=64, BD=128, BK=64):
    """(N, D) float32: row n = sum over pairs m with tok[m] = n of a[m] W_e (atomic adds)."""
    k, M, G, D = scatter_mm_kernel(), tok.numel(), a.shape[1], W.shape[1]
    BK = min(BK, max(16, triton.next_power_of_2(G)))
    BD = min(BD, max(16, triton.next_power_of_2(D)))
    out = torch.zeros(N, D, device=a.device, dtype=torch.float32)
    k[(triton.cdiv(M, BM), triton.cdiv(D, BD))](
        a.contiguous(), tok, blk, W.to(a.dtype).contiguous(), out, M, D, G, BM=BM, BD=BD, BK=BK)
    return out


def weight_grad(a, src, tok, offs, G, dtype, BM=64, BG=64, BD=128):
    """(B*G, D) in dtype: block e's rows = a_e^T src[tok_e], a (M, G) in sorted-pair order."""
    k, B, D = weight_grad_kernel(), offs.numel(), src.shape[1]
    BG = min(BG, max(16, triton.next_power_of_2(G)))
    BD = min(BD, max(16, triton.next_power_of_2(D)))
    out = torch.empty(B * G, D, device=src.device, dtype=dtype)
    k[(B, triton.cdiv(G, BG), triton.cdiv(D, BD))](
        a.contiguous(), tok, offs, src.contiguous(), out, D, G, BM=BM, BG=BG, BD=BD)
    return out


class FusedAll(torch.autograd.Function):
    """y = sum over the token's pairs of w f(x K_e^T) V_e; x in the compute dtype, K, V the
    parameters (cast to it inside, grads returned in theirs), w (N, b) or None; tok, blk, order
    (N*b,) the sorted pairs, offs (B,) int32 their cumulative block ends; T: every tile size T
    (the tests: several tiles per block and along d), None: the wrappers' defaults."""
    @staticmethod
    def forward(ctx, x, K, V, w, tok, blk, order, offs, G, act, T=None):
        ctx.kw = lambda *ks: {k: T for k in ks} if T else {}        # tile sizes, if T
        pre = gather_mm(x, tok, blk, K, G, **ctx.kw("BM", "BN", "BK"))  # x[tok] K_e^T, (N*b, g)
        h = act(pre)
        if w is not None:                                           # weights in pair order
            h = h * w.reshape(-1)[order].to(h.dtype).unsqueeze(-1)
        ctx.G, ctx.act = G, act
        ctx.save_for_backward(x, K, V, w, pre, tok, blk, order, offs)
        return scatter_mm(h, tok, blk, V, x.shape[0], **ctx.kw("BM", "BD", "BK")).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, K, V, w, pre, tok, blk, order, offs = ctx.saved_tensors
        G, dt, kw = ctx.G, x.dtype, ctx.kw
        dy = dy.to(dt).contiguous()
        with torch.enable_grad():                                   # h = f(pre) again, for f'
            p = pre.detach().requires_grad_()
            h = ctx.act(p)
        dhw = gather_mm(dy, tok, blk, V, G, **kw("BM", "BN", "BK"))  # dy[tok] V_e^T = d(w h)
        hw, dh, dw = h.detach(), dhw, None
        if w is not None:
            ws = w.reshape(-1)[order].to(dt).unsqueeze(-1)
            dws = (dhw.float() * hw.float()).sum(1)                 # dw of each sorted pair
            dw = dws.new_empty(dws.shape).index_copy_(0, order, dws).view_as(w).to(w.dtype)
            hw, dh = hw * ws, dhw * ws
        dpre = torch.autograd.grad(h, p, dh)[0]                     # dh * f'(pre)
        dx = scatter_mm(dpre, tok, blk, K, x.shape[0], **kw("BM", "BD", "BK")).to(dt)  # dpre_m K_e
        dV = weight_grad(hw, dy, tok, offs, G, V.dtype, **kw("BM", "BG", "BD"))  # (w h)_e^T dy[tok]
        dK = weight_grad(dpre, x, tok, offs, G, K.dtype, **kw("BM", "BG", "BD"))  # dpre_e^T x[tok]
        return dx, dK, dV, dw, None, None, None, None, None, None, None


def triton_fused_all(layer, x, ids, w=None, pre=None, apply=FusedAll.apply, tiles=None):
    """The candidate: the pair sort here, everything else in FusedAll (no (N*b, d) tensor)."""
    assert pre is None, "VanillaM's pre is not a candidate here"
    blk, order = ids.reshape(-1).sort(stable=True)
    offs = torch.searchsorted(blk, torch.arange(layer.B, device=ids.device), right=True)
    return apply(x.to(S.compute_dtype(x)), layer.K, layer.V, w, order // ids.shape[1], blk,
                 order, offs.to(torch.int32), layer.g, layer.act, tiles)


# ---- the candidates: name -> (fn, needs triton)
def plain_expand(x, tok, inv):      # autograd's own backward of x[tok]: index_put accumulate
    return x[tok]


def plain_collapse(ys, tok, inv):   # ys[inv].sum(1) with autograd's backward (a scatter)
    return ys[inv].sum(1)


def isel_rows(t, idx):        # the row gathers x[tok], dy[tok] as index_select
    return t.index_select(0, idx)


TRITON_SUMS = {"triton": sum_triton,                        # (c) 16 tokens x 256 columns
               "triton_64x64": functools.partial(sum_triton, BN=64, BD=64),
               "triton_8x512": functools.partial(sum_triton, BN=8, BD=512)}
# where torch.compile cannot trace the kernel: the same candidate, the kernel left out of the graph
KERNEL_OUTSIDE = {k: with_pair_sum(torch.compiler.disable(f)) for k, f in TRITON_SUMS.items()}
KERNEL_OUTSIDE["triton_fused_all"] = functools.partial(   # the sort compiled, FusedAll eager
    triton_fused_all, apply=torch.compiler.disable(FusedAll.apply))

CANDIDATES = {  # in priority order: compiles past --budget are skipped
    "grouped": (S.compute_grouped, False),                    # (a) the baseline, as it is
    "triton": (with_pair_sum(TRITON_SUMS["triton"]), True),
    "triton_fused_all": (triton_fused_all, True),             # (f): fused fwd+bwd, no pair rows
    "isel": (with_pair_sum(sum_isel), False),                 # (b) ...
    "isel_all": (with_pair_sum(sum_isel, isel_rows), False),
    "index_add": (with_pair_sum(sum_index_add), False),
    "isel_f32": (with_pair_sum(sum_isel_f32), False),
    "autograd": (grouped_with(plain_expand, plain_collapse), False),
    "triton_64x64": (with_pair_sum(TRITON_SUMS["triton_64x64"]), True),
    "triton_8x512": (with_pair_sum(TRITON_SUMS["triton_8x512"]), True),
}


# ---- correctness
def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def compare(fn, layer, x, ids, w, gy):
    """max relative error of y, dx, dK, dV of fn against compute_masked (same autocast state)."""
    outs = []
    for f in (layer.compute_masked, functools.partial(fn, layer)):
        xx = x.detach().clone().requires_grad_(True)
        ww = None if w is None else w.detach().clone().requires_grad_(True)
        y = f(xx, ids, ww)
        wrt = (xx, layer.K, layer.V) + (() if w is None else (ww,))
        outs.append((y,) + torch.autograd.grad(y, wrt, gy, materialize_grads=True))
    return max(rel_err(c, r) for r, c in zip(*outs))


def small_layer(g, b, d=32, d_m=256, dtype=torch.float32, seed=0):
    cfg = S.validate(S.Config(selector="avgk", n_embd=d, n_head=2, n_layer=2, d_ff=g * b,
                              d_m=d_m, g=g, b=b, impl="grouped"))
    torch.manual_seed(seed)
    layer = S.SparseFFN(cfg, 1).to(dtype)
    with torch.no_grad():                  # keys large enough that GeLU is not near-linear
        layer.K.normal_(0, 0.3)
        layer.V.normal_(0, 0.3)
    return layer


CHECK_SHAPES = [(g, b) for g in (8, 32) for b in (1, 4, 8)]
CHECK_CASES = [(g, b, 32) for g, b in CHECK_SHAPES] + [(8, 4, 40)]  # (g, b, d); 40: not a tile


def check(fn, N=61, cases=CHECK_CASES, weighted=(False, True)):
    """CPU float32: [(g, b, d, weighted, max rel err)] of fn against compute_masked."""
    rows = []
    for g, b, d in cases:
        layer = small_layer(g, b, d=d)
        x, gy = torch.randn(N, d), torch.randn(N, d)
        ids = torch.rand(N, layer.B).argsort(1)[:, :b]   # random distinct blocks (some unused)
        for wtd in weighted:
            w = torch.rand(N, b) if wtd else None
            rows.append((g, b, d, wtd, compare(fn, layer, x, ids, w, gy)))
    return rows


def key_side_ref(layer, x, ids):
    """f(x K^T) at the chosen blocks (all d_m cells, then gathered), in sorted-pair order."""
    N, b, B, g = *ids.shape, layer.B, layer.g
    h = layer.act(x @ layer.K.to(x.dtype).t()).view(N, B, g)
    h = h.gather(1, ids.unsqueeze(-1).expand(N, b, g)).reshape(N * b, g)
    return h[ids.reshape(-1).sort(stable=True)[1]]


def check_key_side(fn, N=61, shapes=CHECK_SHAPES, d=80):
    """(d), forward only: [(g, b, rel err of h)] against key_side_ref; d 80 is not a tile."""
    rows = []
    for g, b in shapes:
        layer = small_layer(g, b, d=d)
        x, ids = torch.randn(N, d), torch.rand(N, layer.B).argsort(1)[:, :b]
        with torch.no_grad():
            rows.append((g, b, rel_err(fn(layer, x, ids), key_side_ref(layer, x, ids))))
    return rows


def check_value_side(fn, N=61, shapes=CHECK_SHAPES, d=80, weighted=(False, True)):
    """(e), forward only: [(g, b, weighted, rel err of y)], y = fn(layer, h, ids, w) from the
    exact h (key_side_ref) against compute_masked; d 80 is not a tile (N 61 neither)."""
    rows = []
    for g, b in shapes:
        layer = small_layer(g, b, d=d)
        x, ids = torch.randn(N, d), torch.rand(N, layer.B).argsort(1)[:, :b]
        for wtd in weighted:
            w = torch.rand(N, b) if wtd else None
            with torch.no_grad():
                y = fn(layer, key_side_ref(layer, x, ids), ids, w)
                rows.append((g, b, wtd, rel_err(y, layer.compute_masked(x, ids, w))))
    return rows


def check_forward(fn, N=61, shapes=CHECK_SHAPES, d=80, weighted=(False, True)):
    """The whole forward, no autograd: [(g, b, weighted, rel err of y)] against compute_masked."""
    rows = []
    for g, b in shapes:
        layer = small_layer(g, b, d=d)
        x, ids = torch.randn(N, d), torch.rand(N, layer.B).argsort(1)[:, :b]
        for wtd in weighted:
            w = torch.rand(N, b) if wtd else None
            with torch.no_grad():
                rows.append((g, b, wtd, rel_err(fn(layer, x, ids, w),
                                                layer.compute_masked(x, ids, w))))
    return rows


FWD_CHECKS = ((VALUE_SIDE, check_value_side, "y = sum w h V_e from the exact h"),
              (FWD, check_forward, "y, forward only"))


def run_check(names):
    ok = True
    for table, chk, what in FWD_CHECKS:
        for name, (fn, needs_triton) in table.items():
            if needs_triton and not triton_ok("cpu"):
                print(f"{name:14s} SKIPPED: triton missing or TRITON_INTERPRET != 1")
                continue
            rows = chk(fn)
            worst = max(r[-1] for r in rows)
            ok &= worst <= TOL
            print(f"{name:14s} {'ok  ' if worst <= TOL else 'FAIL'} max rel err {worst:.1e} "
                  f"over {len(rows)} cases ({what} vs compute_masked, d 80)")
    for name, (fn, needs_triton) in KEY_SIDE.items():
        if needs_triton and not triton_ok("cpu"):
            print(f"{name:14s} SKIPPED: triton missing or TRITON_INTERPRET != 1")
            continue
        worst = max(r[-1] for r in check_key_side(fn))
        ok &= worst <= TOL
        print(f"{name:14s} {'ok  ' if worst <= TOL else 'FAIL'} max rel err {worst:.1e} "
              f"(forward only: h = f(x[tok] K_e^T) vs all cells, d 80)")
    for name in names:
        fn, needs_triton = CANDIDATES[name]
        if needs_triton and not triton_ok("cpu"):
            print(f"{name:14s} SKIPPED: triton missing or TRITON_INTERPRET != 1")
            continue
        rows = check(fn)
        worst = max(r[-1] for r in rows)
        ok &= worst <= TOL
        print(f"{name:14s} {'ok  ' if worst <= TOL else 'FAIL'} max rel err {worst:.1e} "
              f"over {len(rows)} cases")
    print(f"cases: (g, b) in {CHECK_SHAPES} at d 32, (8, 4) at d 40; w None and random; N 61, "
          f"d_m 256, float32; errors of y, dx, dK, dV (dw) against compute_masked; tol {TOL:g}")
    return ok


# ---- timing (CUDA)
def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def ms(fn, iters=20, warm=5, dev="cuda"):
    for i in range(warm + iters):
        if i == warm:
            sync(dev)
            t = time.perf_counter()
        fn()
    sync(dev)
    return 1000 * (time.perf_counter() - t) / iters


def one_line(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


TRAIN_SHAPE = dict(N=16384, d=512, c=2048, dm=16384, G=(256, 64))   # gpu preset, one layer call
SMOKE_SHAPE = dict(N=256, d=64, c=256, dm=1024, G=(64, 16))          # --smoke: CPU dry run


def run_timing(names, budget_s, iters, out_dir, dev="cuda", shape=TRAIN_SHAPE):
    t0, dt = time.perf_counter(), torch.bfloat16
    d, c, dm, N, G = (shape[k] for k in ("d", "c", "dm", "N", "G"))
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    # every candidate built by grouped_with shares one code object: without these, dynamo would
    # stop recompiling it after 8 variants (silently eager) or turn the shapes dynamic
    for k in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
              "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, k):
            setattr(torch._dynamo.config, k, 256)
    compile = functools.partial(torch.compile, dynamic=False)
    timed = functools.partial(ms, iters=iters, dev=dev)
    print(f"torch {torch.__version__}, {name}, N={N} d={d} c={c} d_m={dm}, fp32 params, bf16 "
          f"autocast, fwd+bwd ms (mean of {iters} after 5 warm-up), budget {budget_s} s")
    torch.manual_seed(0)
    x = torch.randn(N, d, device=dev, requires_grad=True)
    gy = torch.randn(N, d, device=dev, dtype=dt)
    base = S.validate(S.Config(selector="avgk", n_embd=d, n_head=8, d_ff=c, d_m=dm,
                               impl="grouped"), dev)
    dense = S.DenseFFN(d, c, base.activation, base.n_layer).to(dev)
    params = [x] + list(dense.parameters())

    def step(f, ps):          # one fwd+bwd under autocast; grads assigned, not accumulated
        for p in ps:
            p.grad = None
        with torch.autocast(dev, dt):
            y = f()
        y.backward(gy)

    rows, csv_rows = [], []
    dense_c = compile(lambda: dense(x)[0])
    unit = {False: timed(lambda: step(lambda: dense(x)[0], params))}
    try:
        unit[True] = timed(lambda: step(dense_c, params))
    except Exception as e:
        print(f"dense compiled FAILED {one_line(e)}")
        unit[True] = unit[False]
    rows.append(dict(g="dense", b="-", B="-", path="DenseFFN(c)", eager=unit[False],
                     compiled=unit[True], err=None))
    for i, g in enumerate(G):
        cfg = dataclasses.replace(base, g=g, b=c // g)
        layer = S.SparseFFN(cfg, 1).to(dev)
        ps = [x, layer.K, layer.V]
        with torch.no_grad(), torch.autocast(dev, dt):
            ids = layer.route(x)[0]
        best = (float("inf"), None, None)
        for nm in names:
            fn, needs_triton = CANDIDATES[nm]
            row = dict(g=g, b=cfg.b, B=layer.B, path=nm, eager=None, compiled=None, err=None)
            rows.append(row)
            if needs_triton and not triton_ok(dev):
                print(f"g={g} {nm}: SKIPPED, triton missing (or no CUDA and TRITON_INTERPRET != 1)")
                continue
            try:
                with torch.autocast(dev, dt):
                    row["err"] = compare(fn, layer, x, ids, None, gy)
                f = functools.partial(fn, layer, x, ids, None)
                row["eager"] = timed(lambda: step(f, ps))
                best = min(best, (row["eager"], f"{nm} eager", f))
            except Exception as e:
                print(f"g={g} {nm} eager FAILED {one_line(e)}")
            if time.perf_counter() - t0 > budget_s * (i + 1) / len(G):
                print(f"g={g} {nm} compiled: SKIPPED, over the time budget")
                continue
            outside = " (compiled: kernel outside graph)", KERNEL_OUTSIDE.get(nm)
            for how, fc in (("", fn), outside):
                if fc is None:
                    break
                try:
                    cf = compile(functools.partial(fc, layer))
                    row["compiled"] = timed(lambda: step(lambda: cf(x, ids, None), ps))
                    best = min(best, (row["compiled"], f"{nm} compiled{how}",
                                      functools.partial(cf, x, ids, None)))
                    row["path"] += how
                    break
                except Exception as e:
                    print(f"g={g} {nm} compiled{how} FAILED {one_line(e)}")
            print(f"g={g} {nm:14s} eager {row['eager']} compiled {row['compiled']} ms, "
                  f"rel err {row['err']}", flush=True)
        xb = x.detach().to(dt)
        with torch.no_grad():
            href = key_side_ref(layer, xb, ids)
        for nm, (fn, needs_triton) in KEY_SIDE.items():       # (d): forward only, eager
            row = dict(g=g, b=cfg.b, B=layer.B, path=nm + " (fwd only)", eager=None,
                       compiled=None, err=None, fwd_only=True)
            rows.append(row)
            if needs_triton and not triton_ok(dev):
                continue
            try:
                with torch.no_grad():
                    row["err"] = rel_err(fn(layer, xb, ids), href)
                    row["eager"] = timed(lambda: fn(layer, xb, ids))
            except Exception as e:
                print(f"g={g} {nm} FAILED {one_line(e)}")
            print(f"g={g} {nm} eager {row['eager']} ms (forward only), rel err {row['err']}")
        with torch.no_grad(), torch.autocast(dev, dt):      # (e) and the whole forward
            yref = layer.compute_masked(x.detach(), ids, None)
            hb = key_side_grouped(layer, xb, ids)               # the value side's input
        fwd_rows = [(nm, fn, nt, (layer, hb, ids)) for nm, (fn, nt) in VALUE_SIDE.items()
                    if "32x32" not in nm]
        fwd_rows += [(nm, fn, nt, (layer, x.detach(), ids)) for nm, (fn, nt) in FWD.items()]
        for nm, fn, needs_triton, args in fwd_rows:              # forward only, eager
            row = dict(g=g, b=cfg.b, B=layer.B, path=nm + " (fwd only)", eager=None,
                       compiled=None, err=None, fwd_only=True)
            rows.append(row)
            if needs_triton and not triton_ok(dev):
                continue
            try:
                with torch.no_grad(), torch.autocast(dev, dt):
                    row["err"] = rel_err(fn(*args), yref)
                    row["eager"] = timed(lambda: fn(*args))
            except Exception as e:
                print(f"g={g} {nm} FAILED {one_line(e)}")
            print(f"g={g} {nm} eager {row['eager']} ms (forward only), rel err {row['err']}")
        del href, yref, hb
        if best[2] is not None and dev == "cuda":
            f = best[2]
            from profutil import prof
            prof(lambda: step(f, ps), 10, f"fastest at g={g}: {best[1]} fwd+bwd", top=10)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    ratio = lambda v, u, r: "-" if v is None or "fwd_only" in r else f"{v / u:.2f}x"  # noqa
    lines = [f"layer fwd+bwd on {name}, torch {torch.__version__}, N={N} d={d} c={c} d_m={dm}, "
             f"fp32 params + bf16 autocast, Avg-K ids fixed (selection not timed; the pair sort "
             f"is), mean of {iters} (ms); x dense = the same mode's dense; rel err: max of y, dx, "
             f"dK, dV vs compute_masked (fwd-only rows: key_fwd h vs all cells; value_fwd, "
             f"fwd: y vs compute_masked's y, value_fwd from the bf16 h of key_fwd:grouped)", "",
             "| g | b | B | path | eager ms | compiled ms | eager x dense | compiled x dense "
             "| max rel err (bf16) |", "|" + "---|" * 9]
    for r in rows:
        err = "-" if r["err"] is None else f"{r['err']:.1e}"
        lines.append(f"| {r['g']} | {r['b']} | {r['B']} | {r['path']} | {fmt(r['eager'])} | "
                     f"{fmt(r['compiled'])} | {ratio(r['eager'], unit[False], r)} | "
                     f"{ratio(r['compiled'], unit[True], r)} | {err} |")
        for comp in (False, True):
            v = r["compiled" if comp else "eager"]
            if v is not None:
                csv_rows.append(dict(g=r["g"], b=r["b"], B=r["B"], path=r["path"],
                                     ms=round(v, 4), compiled=comp, device=name,
                                     torch=torch.__version__))
    table = "\n".join(lines)
    print("\n" + table)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "variants.md"), "w") as fh:
            fh.write(table + "\n")
        with open(os.path.join(out_dir, "variants.csv"), "w", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=list(csv_rows[0]) if csv_rows else ["g"])
            wr.writeheader()
            wr.writerows(csv_rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="CPU correctness check, small shapes")
    ap.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    ap.add_argument("--budget", type=float, default=150, help="seconds; later compiles skipped")
    ap.add_argument("--smoke", action="store_true", help="timing mode's dry run: CPU, tiny shapes")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(CANDIDATES)
    bad = [n for n in names if n not in CANDIDATES]
    if bad:
        ap.error(f"unknown candidates {bad}; known: {list(CANDIDATES)}")
    if a.check:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        print(f"triton: {'found' if importlib.util.find_spec('triton') else 'missing'}, "
              f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
        sys.exit(0 if run_check(names) else 1)
    sys.path.insert(0, HERE)
    if a.smoke:
        return run_timing(names, a.budget, a.iters, os.environ.get("OUT"), "cpu", SMOKE_SHAPE)
    if not torch.cuda.is_available():
        sys.exit("timing needs CUDA; on CPU run --check (or --smoke)")
    run_timing(names, a.budget, a.iters, os.environ.get("OUT"))


if __name__ == "__main__":
    main()
