"""nano_sffn.py -- a unified view of sparse feed-forward networks, in one file.

Paper: Zeyu Leo Liu, Tim Dettmers, Xi Victoria Lin, Veselin Stoyanov, Xian Li,
"Towards A Unified View of Sparse Feed-Forward Network in Pretraining Large
Language Model", EMNLP 2023, arXiv:2305.13999. No official code was released;
this file is a from-scratch reimplementation of the paper's framework, its
method Avg-K, and every selector it compares.

The idea
--------
A transformer FFN is a key-value memory (the paper's unified view): with keys
K = W1 (d_m x d) and values V = W2^T (d_m x d),

    FFN(x) = f(x K^T) V = sum_{i=1..d_m} f(x . k_i) v_i          (memory cells i)

Cut the d_m cells into B = d_m / g contiguous *memory blocks* of g cells (a
block is exactly an MoE "expert" of hidden size g). A *selector* S(x) picks b
blocks per token, so c = b*g cells are active and

    y(x) = sum_{beta in S(x)} w_beta(x) * sum_{i in beta} f(x . k_i) v_i

Compute is held at a dense FFN of width c by construction (c = dense d_ff);
the parameter count grows with d_m. The paper studies two axes:
  (1) the block size g (at fixed c: smaller g -> lower perplexity), and
  (2) how blocks are selected: *directly* from the FFN's own keys (VanillaM,
      PKM, Avg-K) or *indirectly* through a gate/static map (Switch, GShard
      top-k, BASE, Hash).
Its method, Avg-K, embeds each block by the mean of its keys,
    e_beta = mean_{i in beta} k_i          (no new parameters, no gradient)
and keeps the b blocks with the largest x . e_beta (= the mean pre-activation
of the block). No gate weight, no load-balancing loss.

    token h --LN--> x --+--> selector --> S(x) = {beta_1..beta_b}, w_beta
                        |                      |
                        |   K (d_m x d) = [ K_1 | K_2 | ... | K_B ]   B = d_m/g blocks
                        |                      |  only the b chosen blocks
                        +-----> f(x K_beta^T) V_beta  (g cells each) --* w_beta --+--> sum --> + h
                                                                                   |
    selectors  dense    : one block of c cells, always on
    (--selector) avgk   : top-b of x . mean(K_beta)             (this paper)
               vanillam : top-b of agg_{i in beta}(x . k_i)     (all d_m scores)
               switch   : top-1 of softmax(W_g x), w = p        (Fedus et al. 2021)
               topk     : top-b of softmax(W_g x), renormalized (GShard, Lepikhin et al. 2020)
               base     : balanced assignment (train), argmax (eval), w = sigmoid(x.c_e) (Lewis et al. 2021)
               hash     : fixed random map token id -> blocks   (Roller et al. 2021)
               pkm      : product-key memory, g = 1, N = d_m    (Lample et al. 2019)

Two exact compute paths (`--impl`):
  masked  : compute all d_m cells, zero the unselected blocks (the reference;
            d_m/c times the FLOPs, but one big GEMM: fastest for small g).
  grouped : sort the (token, block) pairs by block, one grouped GEMM per FFN
            matrix (torch's grouped_mm), scatter-add back. Dropless, no host
            sync, no Python loop over blocks. Fastest for large g on a GPU.
  auto    : grouped on CUDA when g >= 128 and torch's grouped GEMM can take the
            shapes, masked otherwise (CPU grouped_mm is slower than masked).

Run it
------
    python nano_sffn.py --selector avgk                # laptop CPU, ~5 min, char Shakespeare
    python nano_sffn.py --preset gpu --selector avgk --g 256   # one H100 (8L/512d miniature)
    python nano_sffn.py --compare dense,switch:512,hash:512,avgk:64 --max_iters 300       # CPU, sel:g
    python nano_sffn.py --preset gpu --compare dense,switch:2048,hash:2048,topk:256,avgk:256,avgk:64,vanillam:64
    python nano_sffn.py --bench --device cuda          # layer fwd+bwd timings, dense vs masked vs grouped
    torchrun --nproc_per_node 8 nano_sffn.py --preset gpu   # DDP
    python -m pytest -q tests/test_sffn.py             # CPU tests
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SELECTORS = ("dense", "avgk", "vanillam", "switch", "topk", "base", "hash", "pkm")
IMPLS = ("auto", "masked", "grouped")
AGGREGATORS = ("pre_mean", "post_mean", "post_sum", "max")


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    # --- what to run
    preset: str = "auto"            # named config: cpu | gpu | auto (gpu if CUDA else cpu); explicit flags override it
    compare: str = ""               # comma list of runs "sel[:g]" trained one after another (e.g. dense,switch:2048,avgk:64)
    bench: bool = False             # run the layer fwd+bwd micro-benchmark (dense/masked/grouped) instead of training
    bench_tokens: int = 8192        # tokens per benchmark call
    bench_g: str = "2048,512,256,64"  # block sizes the benchmark sweeps
    bench_iters: int = 20           # timed iterations per benchmark entry (after 5 warm-up iterations)
    bench_explain: bool = True      # with --bench: also count torch.compile graph breaks in each selector's FFN
    # --- data
    dataset: str = "shakespeare"    # shakespeare | pycode | pycode_all | path to a UTF-8 text file
    tokenizer: str = "char"         # char | gpt2
    data_dir: str = ""              # where dataset sources are looked for ("" = NANO_DATA_DIR or data/)
    # --- model (nanoGPT-style, pre-LN, tied embeddings)
    n_layer: int = 4                # transformer blocks
    n_head: int = 4                 # attention heads
    n_embd: int = 128               # model width d
    block_size: int = 128           # context length
    d_ff: int = 512                 # active cells c per token (= the dense baseline's FFN width); 0 -> 4*n_embd
    # --- sparse FFN (unified view: d_m cells in blocks of g, b blocks per token)
    selector: str = "avgk"          # dense | avgk | vanillam | switch | topk | base | hash | pkm
    d_m: int = 2048                 # memory size (cells per sparse layer); 0 -> 8*d_ff
    g: int = 64                     # cells per memory block (block size); 0 -> d_ff (one block per token)
    b: int = 0                      # blocks selected per token; 0 -> d_ff // g (keeps c = d_ff)
    sffn_every: int = 2             # sparse FFN in layers i with i % sffn_every == sffn_every-1 (1 = every layer, 2 = every other)
    activation: str = "gelu"        # f: gelu | relu
    impl: str = "auto"              # auto | masked | grouped (exact compute paths, see docstring)
    avgk_weight: str = "none"       # Avg-K output weight: none (paper default) | softmax (over the b kept scores)
    key_init_std: float = 0.02      # std of the N(0, s^2) init of the keys K (probe of dead Avg-K blocks)
    select_fp32: bool = False       # compute selection scores x.e in float32 (default: the autocast dtype)
    vanillam_agg: str = "pre_mean"  # VanillaM block score: pre_mean | post_mean | post_sum | max (over the block's cells)
    aux_alpha: float = 0.01         # switch/topk load-balancing loss weight alpha
    capacity_factor: float = 0.0    # switch/topk capacity factor (tokens over capacity dropped in training); 0 = dropless
    base_iters: int = 8             # BASE: Sinkhorn iterations of the balanced assignment (training only)
    hash_seed: int = 1234           # seed of the fixed random token -> block table
    pkm_heads: int = 4              # PKM query heads H
    pkm_knn: int = 32               # PKM k (keys kept per head)
    pkm_dq: int = 128               # PKM query dim per head (two halves of d_q/2)
    # --- training (nanoGPT-style)
    batch_size: int = 16            # sequences per micro-batch (per process)
    grad_accum: int = 1             # micro-batches per optimizer step (per process)
    max_iters: int = 600            # optimizer steps
    lr: float = 2e-3                # peak learning rate
    min_lr: float = 2e-4            # final learning rate of the cosine decay
    warmup_iters: int = 60          # linear warm-up steps
    weight_decay: float = 0.1       # AdamW decay (matrices and embeddings only)
    beta1: float = 0.9              # AdamW beta1
    beta2: float = 0.95             # AdamW beta2
    grad_clip: float = 1.0          # global grad-norm clip (0 = off)
    eval_interval: int = 100        # steps between evaluations
    eval_iters: int = 10            # batches per split per evaluation
    # --- system
    device: str = "auto"            # auto | cpu | cuda | mps
    dtype: str = "auto"             # auto (bf16 on CUDA, else float32) | float32 | bfloat16 | float16
    compile: bool | None = None     # torch.compile the model (default: on for CUDA, off elsewhere)
    seed: int = 1337                # seed for init and data order
    out_dir: str = "out_sffn"       # where logs, plots, checkpoints go
    resume: bool = False            # continue from out_dir/ckpt.pt
    stop_at: int = 0                # stop (eval + checkpoint) at this step without changing the schedule; 0 = max_iters
    sample_tokens: int = 200        # tokens to sample at the end (0 = none)
    progress: bool = True           # tqdm progress bar


PRESETS = {
    # laptop CPU, a few minutes: char Shakespeare, 4 layers, 2 sparse layers of 4x memory (d_m = 4c)
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, d_ff=512, d_m=2048, g=64,
                batch_size=16, max_iters=600, lr=2e-3, min_lr=2e-4, warmup_iters=60,
                eval_interval=100, eval_iters=10),
    # one H100, a miniature of the paper's setup: 8L/512d, S-FFN every other layer, d_m = 8*2048, c = 2048.
    # 6000 x 16k = 98M tokens: pycode_all (stdlib + installed packages, ~70-100M GPT-2 tokens) so a run sees
    # each token about once; plain pycode (~5M tokens) would be ~20 epochs and the val loss would measure overfitting.
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, block_size=512, d_ff=2048, d_m=16384, g=256,
                batch_size=32, max_iters=6000, lr=1e-3, min_lr=1e-4, warmup_iters=400,
                eval_interval=500, eval_iters=20, dataset="pycode_all", tokenizer="gpt2", pkm_knn=64),
}


class BadInput(Exception):
    """One-line user error: printed to stderr, exit status 2, nothing written."""


# ----------------------------------------------------------------------------- helpers
def f32(t):
    """Router math in at least float32 (float64 stays float64, so gradcheck is exact)."""
    return t if t.dtype == torch.float64 else t.float()


def activation_fn(name):
    return F.gelu if name == "gelu" else F.relu


def is_compiling():
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def native_grouped_mm():
    """torch's grouped GEMM (public F.grouped_mm in torch>=2.11, private torch._grouped_mm in 2.8+), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def native_grouped_ok(device_type: str, dtype: torch.dtype, d: int, g: int, B: int) -> bool:
    """Can torch's grouped GEMM take (M, d) x (B, d, g) (or (M, g) x (B, g, d))? Else the loop fallback runs."""
    if native_grouped_mm() is None:
        return False
    size = torch.empty((), dtype=dtype).element_size()
    aligned = (d * size) % 16 == 0 and (g * size) % 16 == 0            # rows must be 16-byte aligned
    if is_compiling() and dtype != torch.bfloat16:
        return False    # torch.compile's shape function for grouped_mm accepts bf16 only (torch 2.11)
    if device_type == "cpu":
        return aligned and dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device_type == "cuda":
        # bf16 only (SM80+), at most 1023 groups per call (torch 2.11, H100)
        return aligned and dtype == torch.bfloat16 and B <= 1023
    return False


def grouped_mm_loop(a, w, offs):
    """Reference/fallback grouped GEMM: out[offs[i-1]:offs[i]] = a[offs[i-1]:offs[i]] @ w[i].

    Used where torch's grouped GEMM is missing (torch<2.8, float64, CUDA float32).
    `offs.tolist()` is its one unavoidable host sync (segment sizes are data)."""
    outs, start = [], 0
    for i, end in enumerate(offs.tolist()):
        outs.append(a[start:end] @ w[i])
        start = end
    return torch.cat(outs, 0)


def grouped_mm(a, w, offs):
    """(M, K) x (G, K, N) -> (M, N), rows grouped by cumulative end offsets offs (G,) int32."""
    fn = native_grouped_mm()
    if fn is not None and native_grouped_ok(a.device.type, a.dtype, a.shape[1], w.shape[-1], w.shape[0]):
        return fn(a, w, offs=offs)
    return grouped_mm_loop(a, w, offs)


def compute_dtype(x):
    """dtype the grouped path runs in: the autocast dtype if autocast is on (grouped_mm is not autocast-aware)."""
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError):  # torch 2.4: no device argument
        if dev == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return x.dtype


# ----------------------------------------------------------------------------- the FFN as a key-value memory
class DenseFFN(nn.Module):
    """The dense baseline: FFN(x) = f(x K^T) V with d_ff = c cells.

    K = W1 (c, d), V = W2^T (c, d): the same parameter names as the sparse layer,
    so `avgk` with b = B is this module with d_ff = d_m (tested)."""

    def __init__(self, d, c, act, n_layer):
        super().__init__()
        self.act = activation_fn(act)
        self.K = nn.Parameter(torch.randn(c, d) * 0.02)                            # keys k_i
        self.V = nn.Parameter(torch.randn(c, d) * 0.02 / math.sqrt(2 * n_layer))   # values v_i (residual proj.)
        self.track = False

    def forward(self, x, idx=None, ids=None):  # x (N, d) -> (N, d), aux
        # FFN(x) = sum_i f(x . k_i) v_i
        return self.act(x @ self.K.t()) @ self.V, x.new_zeros(())


class SparseFFN(nn.Module):
    """S-FFN over d_m cells in B = d_m/g blocks; a selector picks b blocks per token.

    route(x, idx, ids)  -> block ids (N, b), weights w (N, b) or None, aux loss, pre-activations or None
    forward(x, idx, ids)-> y (N, d), aux.  Pass `ids` to hold the selection fixed (gradcheck, tests)."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        d, self.d_m, self.g, self.b = cfg.n_embd, cfg.d_m, cfg.g, cfg.b
        self.B = self.d_m // self.g
        self.selector, self.impl, self.agg = cfg.selector, cfg.impl, cfg.vanillam_agg
        self.act = activation_fn(cfg.activation)                      # f: GeLU or ReLU
        self.alpha, self.cf, self.base_iters, self.avgk_weight = cfg.aux_alpha, cfg.capacity_factor, cfg.base_iters, cfg.avgk_weight
        # the memory: K (d_m, d), V (d_m, d); block beta = rows [beta*g, (beta+1)*g)
        self.K = nn.Parameter(torch.randn(self.d_m, d) * cfg.key_init_std)
        self.select_fp32 = cfg.select_fp32
        self.V = nn.Parameter(torch.randn(self.d_m, d) * 0.02 / math.sqrt(2 * cfg.n_layer))
        if self.selector in ("switch", "topk"):
            self.W_g = nn.Parameter(torch.randn(self.B, d) * 0.02)   # router (gate) weights, one row per block
        if self.selector == "base":
            self.C = nn.Parameter(torch.randn(self.B, d) * 0.02)     # BASE expert centroids c_e
        if self.selector == "hash":
            # Roller et al. 2021: a fixed random map token id -> b distinct blocks, never trained
            gen = torch.Generator().manual_seed(cfg.hash_seed)
            table = torch.rand(vocab_size, self.B, generator=gen).argsort(1)[:, : self.b]
            self.register_buffer("hash_table", table, persistent=True)  # (vocab, b) long
        self.track = False      # routing-health bookkeeping (eval only, uncompiled)
        self.stats = []

    # ---- selection --------------------------------------------------------
    def route(self, x, idx=None, ids=None):
        N, b, B, g = x.shape[0], self.b, self.B, self.g
        w, aux, pre = None, x.new_zeros(()), None
        sel = self.selector
        if sel == "avgk":
            # Avg-K (the paper's method): e_beta = (1/g) sum_{i in beta} k_i -- derived from K, no params, no gradient
            e = self.K.detach().view(B, g, -1).mean(1)                   # (B, d), stop-gradient
            # s_beta(x) = x . e_beta  (= mean pre-activation of block beta)
            if self.select_fp32:  # autocast would cast the matmul back to bf16: switch it off here
                with torch.autocast(x.device.type, enabled=False):
                    s = f32(x) @ f32(e).t()                              # (N, B) float32
            else:
                s = x @ e.t().to(x.dtype)                                # (N, B)
            if ids is None:
                ids = s.detach().topk(b, dim=-1).indices                # (N, b)  S(x) = TopK_b(s)
            if self.avgk_weight == "softmax":
                # optional gate: w_beta = softmax over the kept scores (flows to x only; e is detached)
                w = torch.softmax(f32(s).gather(1, ids), -1)
        elif sel == "vanillam":
            # VanillaM: all d_m scores x . k_i (full key product), aggregated per block, top-b
            pre = x @ self.K.t()                                         # (N, d_m)
            if ids is None:
                p3 = pre.detach().view(N, B, g)
                if self.agg == "pre_mean":
                    score = p3.mean(-1)
                elif self.agg == "post_mean":
                    score = self.act(p3).mean(-1)
                elif self.agg == "post_sum":
                    score = self.act(p3).sum(-1)
                else:
                    score = self.act(p3).amax(-1)
                ids = score.topk(b, dim=-1).indices                      # (N, b)
        elif sel in ("switch", "topk"):
            # Switch (Fedus et al. 2021) / GShard (Lepikhin et al. 2020): p = softmax(W_g x) in float32
            logits = f32(x @ self.W_g.t().to(x.dtype))                   # (N, B)
            p = torch.softmax(logits, -1)
            if ids is None:
                ids = p.detach().topk(b, dim=-1).indices                # (N, b)
            w = p.gather(1, ids)                                         # (N, b)
            if sel == "topk":
                # GShard: renormalize the kept probabilities to sum to 1
                w = w / w.sum(-1, keepdim=True)
            # aux = alpha * B * sum_e f_e P_e, f_e = fraction of the N*b assignments to e, P_e = mean_t p_e(x_t)
            f = torch.zeros(B, device=x.device, dtype=p.dtype).scatter_add_(
                0, ids.reshape(-1), torch.ones(ids.numel(), device=x.device, dtype=p.dtype)) / ids.numel()
            P = p.mean(0)
            aux = self.alpha * B * (f * P).sum()
            if self.cf > 0 and self.training:
                # capacity C = ceil(cf * N * b / B): assignments past it (in token order, 1st choices first) are dropped
                cap = math.ceil(self.cf * N * b / B)
                onehot = F.one_hot(ids.t().reshape(-1), B)               # (b*N, B)
                pos = (onehot.cumsum(0) * onehot).sum(-1) - 1            # position of each assignment in its block
                keep = (pos < cap).view(b, N).t()                        # (N, b)
                w = w * keep.to(w.dtype)
        elif sel == "base":
            # BASE (Lewis et al. 2021): score s_te = x_t . c_e; weight sigma(x . c_e)
            s = f32(x @ self.C.t().to(x.dtype))                          # (N, B)
            if ids is None:
                if self.training:
                    # balanced assignment: Sinkhorn (S-BASE approximation, Clark et al. 2022) to a doubly
                    # stochastic plan (rows sum 1, columns N/B), then each token takes its top-b blocks
                    logp = s.detach()
                    for _ in range(self.base_iters):
                        logp = logp - logp.logsumexp(0, keepdim=True) + math.log(N / B)  # columns -> N/B
                        logp = logp - logp.logsumexp(1, keepdim=True)                   # rows -> 1
                    ids = logp.topk(b, dim=-1).indices
                else:
                    ids = s.detach().topk(b, dim=-1).indices            # greedy at evaluation
            w = torch.sigmoid(s.gather(1, ids))                          # (N, b)
        elif sel == "hash":
            # HashLayer (Roller et al. 2021): blocks = table[token id]; no router, no loss
            if ids is None:
                ids = self.hash_table[idx.reshape(-1)]                   # (N, b)
        return ids, w, aux, pre

    # ---- compute: masked reference ------------------------------------------
    def compute_masked(self, x, ids, w, pre=None):
        """All d_m cells, unselected blocks zeroed: y = (f(x K^T) * mask) V.  Exact reference."""
        N, B, g = x.shape[0], self.B, self.g
        h = self.act(pre if pre is not None else x @ self.K.t())        # (N, d_m)
        vals = torch.ones_like(ids, dtype=h.dtype) if w is None else w.to(h.dtype)
        mask = torch.zeros(N, B, device=x.device, dtype=h.dtype).scatter(1, ids, vals)  # (N, B)
        return (h.view(N, B, g) * mask.unsqueeze(-1)).view(N, -1) @ self.V.to(h.dtype)  # (N, d)

    # ---- compute: grouped GEMM over sorted (token, block) pairs -------------
    def compute_grouped(self, x, ids, w, pre=None):
        """Sort the N*b (token, block) pairs by block, grouped GEMM, scatter-add back. Dropless, no sync."""
        N, b, B, g = x.shape[0], self.b, self.B, self.g
        dt = compute_dtype(x)
        blk = ids.reshape(-1)                                            # (N*b,)
        blk_sorted, order = blk.sort(stable=True)                        # pairs grouped by block
        tok = order // b                                                 # token of each sorted pair
        # offs[e] = number of pairs in blocks 0..e (cumulative end offsets, int32, on device)
        offs = torch.searchsorted(blk_sorted, torch.arange(B, device=x.device), right=True).to(torch.int32)
        V3 = self.V.view(B, g, -1).to(dt)                                # (B, g, d)
        if pre is not None:  # VanillaM: the key side was computed for all cells already -> reuse it
            h = self.act(pre.view(N, B, g)).gather(1, ids.unsqueeze(-1).expand(N, b, g)).view(N * b, g)
            h = h[order].to(dt)                                          # (N*b, g)
        else:
            xs = x.to(dt)[tok]                                           # (N*b, d) gathered token rows
            K3t = self.K.view(B, g, -1).to(dt).transpose(-2, -1)         # (B, d, g)
            h = self.act(grouped_mm(xs, K3t, offs))                      # (N*b, g)  f(x . k_i), i in the pair's block
        ys = grouped_mm(h, V3, offs)                                     # (N*b, d)
        if w is not None:
            ys = ys * w.reshape(-1)[order].to(ys.dtype).unsqueeze(-1)
        return torch.zeros(N, ys.shape[1], device=x.device, dtype=ys.dtype).index_add(0, tok, ys)

    def use_grouped(self, device_type, dtype, d):
        if self.impl in ("grouped", "masked"):
            return self.impl == "grouped"
        # auto: grouped only where it was measured faster: CUDA, native grouped GEMM, g >= 128 (see --bench)
        return device_type == "cuda" and self.g >= 128 and native_grouped_ok("cuda", dtype, d, self.g, self.B)

    def forward(self, x, idx=None, ids=None):  # x (N, d)
        ids, w, aux, pre = self.route(x, idx, ids)
        if self.track:
            self.stats.append(ids.detach().reshape(-1))
        grouped = self.use_grouped(x.device.type, compute_dtype(x), x.shape[1])
        y = self.compute_grouped(x, ids, w, pre) if grouped else self.compute_masked(x, ids, w, pre)
        return y, aux


class ProductKeyMemory(nn.Module):
    """PKM (Lample et al. 2019) as an S-FFN with g = 1 and N = d_m cells (values only, product keys).

    q = BN(W_q x) split into H heads of two halves; each half scores sqrt(N) sub-keys;
    top-k per half; the k*k sums contain the exact top-k of all N = n^2 product keys;
    w = softmax(top-k scores); y = sum_heads sum_k w v_{i}  (an EmbeddingBag read)."""

    def __init__(self, cfg: Config):
        super().__init__()
        d, self.N, self.H, self.k, self.dq = cfg.n_embd, cfg.d_m, cfg.pkm_heads, cfg.pkm_knn, cfg.pkm_dq
        self.n = math.isqrt(self.N)
        self.impl = cfg.impl
        self.b = self.H * self.k
        self.B, self.g = self.N, 1
        self.W_q = nn.Linear(d, self.H * self.dq, bias=False)
        self.bn = nn.BatchNorm1d(self.H * self.dq)                       # query BatchNorm (Lample et al. 2019)
        self.subkeys = nn.Parameter(torch.randn(self.H, 2, self.n, self.dq // 2) / math.sqrt(self.dq // 2))
        self.V = nn.Parameter(torch.randn(self.N, d) * 0.02 / math.sqrt(2 * cfg.n_layer))
        self.track, self.stats = False, []

    def half_scores(self, x):
        q = self.bn(self.W_q(x)).view(x.shape[0], self.H, 2, self.dq // 2)     # (N_tok, H, 2, dq/2)
        # s1[t,h,j] = q1 . K1[h,j], s2[t,h,j] = q2 . K2[h,j]
        s = torch.einsum("thcq,hcjq->thcj", q, self.subkeys.to(q.dtype))       # (N_tok, H, 2, n)
        return s[:, :, 0], s[:, :, 1]

    def route(self, x, idx=None, ids=None):
        s1, s2 = self.half_scores(x)                                       # (T, H, n) each
        T = x.shape[0]
        if ids is None:
            v1, i1 = s1.detach().topk(self.k, -1)                      # (T, H, k)
            v2, i2 = s2.detach().topk(self.k, -1)
            # candidate sums s1[i1_a] + s2[i2_b] over the k x k grid; exact top-k of all n^2 sums
            cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).view(T, self.H, -1)  # (T, H, k*k)
            top = cand.topk(self.k, -1).indices                            # (T, H, k)
            ids = i1.gather(-1, top // self.k) * self.n + i2.gather(-1, top % self.k)  # (T, H, k) in [0, N)
            ids = ids.view(T, -1)
        # score of cell i = s1[i // n] + s2[i % n]; w = softmax over the k kept cells of each head
        ih = ids.view(T, self.H, self.k)
        sc = s1.gather(-1, ih // self.n) + s2.gather(-1, ih % self.n)     # (T, H, k)
        w = torch.softmax(f32(sc), -1).view(T, -1)
        return ids, w, x.new_zeros(()), None

    def compute_masked(self, x, ids, w, pre=None):
        # reference: a dense (T, N) weight matrix times all N values
        W = torch.zeros(x.shape[0], self.N, device=x.device, dtype=w.dtype).scatter_add(1, ids, w)
        return W.to(x.dtype) @ self.V.to(x.dtype)

    def compute_grouped(self, x, ids, w, pre=None):
        # fast: read only the H*k chosen value rows per token (EmbeddingBag, mode='sum')
        return F.embedding_bag(ids, self.V, per_sample_weights=w.to(self.V.dtype), mode="sum").to(x.dtype)

    def use_grouped(self, device_type, dtype, d):
        return self.impl != "masked"     # auto/grouped: the EmbeddingBag read is always the fast path

    def forward(self, x, idx=None, ids=None):
        ids, w, aux, _ = self.route(x, idx, ids)
        if self.track:
            self.stats.append(ids.detach().reshape(-1))
        y = self.compute_masked(x, ids, w) if self.impl == "masked" else self.compute_grouped(x, ids, w)
        return y, aux


# ----------------------------------------------------------------------------- transformer
class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.c_proj.RESIDUAL = True

    def forward(self, x):  # (B, T, C)
        Bs, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(Bs, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(Bs, T, C))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int, vocab_size: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=False), nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.sparse = cfg.selector != "dense" and layer % cfg.sffn_every == cfg.sffn_every - 1
        if not self.sparse:
            self.ffn = DenseFFN(cfg.n_embd, cfg.d_ff, cfg.activation, cfg.n_layer)
        elif cfg.selector == "pkm":
            self.ffn = ProductKeyMemory(cfg)
        else:
            self.ffn = SparseFFN(cfg, vocab_size)

    def forward(self, x, idx):  # x (B, T, C), idx (B, T) token ids (Hash routes on them)
        x = x + self.attn(self.ln_1(x))
        Bs, T, C = x.shape
        # pre-LN: the FFN input is x = LN(h)
        y, aux = self.ffn(self.ln_2(x).view(Bs * T, C), idx)
        return x + y.view(Bs, T, C).to(x.dtype), aux


class GPT(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.wte = nn.Embedding(vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg, i, vocab_size) for i in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight                            # tied embeddings
        for m in self.modules():   # 0.02 init, 0.02/sqrt(2L) on residual projections (K, V are set in their modules)
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer) if getattr(m, "RESIDUAL", False) else 0.02)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx, targets=None):  # idx (B, T)
        Bs, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        aux = x.new_zeros((), dtype=torch.float32)
        for blk in self.h:
            x, a = blk(x, idx)
            aux = aux + a
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None, aux
        logits = self.lm_head(x)
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, ce, aux

    def sparse_layers(self):
        return [(i, blk.ffn) for i, blk in enumerate(self.h) if blk.sparse]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.8, top_k=50, generator=None, vocab_size=None):
        for _ in range(max_new_tokens):
            logits, _, _ = self(idx[:, -self.cfg.block_size:])
            logits = logits[:, -1, :].float() / temperature
            if vocab_size is not None:
                logits[:, vocab_size:] = -float("inf")                   # never sample the padding ids
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(torch.softmax(logits.float(), -1).cpu(), 1, generator=generator).to(idx.device)
            idx = torch.cat([idx, nxt], 1)
        return idx


# ----------------------------------------------------------------------------- FLOPs and parameters per layer
def layer_flops(cfg: Config, selector: str):
    """Per token, forward, multiply-add = 2 FLOPs: (cells FLOPs, selection overhead, params) of one FFN layer."""
    d, c, d_m, g = cfg.n_embd, cfg.d_ff, cfg.d_m, cfg.g
    B = d_m // g if g else 1
    if selector == "dense":
        return 4 * d * c, 0, 2 * d * c
    if selector == "avgk":      # 2dB scores (+ d_m*d per step for the key means, amortized away)
        return 4 * d * c, 2 * d * B, 2 * d * d_m
    if selector == "vanillam":  # key side needs all d_m scores: 2 d d_m, of which 2 d c are the active cells
        return 4 * d * c, 2 * d * (d_m - c) + d_m, 2 * d * d_m
    if selector in ("switch", "topk"):
        return 4 * d * c, 2 * d * B, 2 * d * d_m + d * B
    if selector == "base":      # + Sinkhorn (training only): ~4 * iters * B per token
        return 4 * d * c, 2 * d * B, 2 * d * d_m + d * B
    if selector == "hash":
        return 4 * d * c, 0, 2 * d * d_m
    if selector == "pkm":
        H, k, dq, n = cfg.pkm_heads, cfg.pkm_knn, cfg.pkm_dq, math.isqrt(d_m)
        return 2 * H * k * d, 2 * d * dq * H + 2 * H * n * dq + H * k * k, d_m * d + H * d * dq + H * n * dq + 2 * H * dq
    raise ValueError(selector)


def flop_table(cfg: Config, model: GPT):
    """Rows per FFN layer + whole-model totals (forward FLOPs per token, parameters)."""
    d, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    rows = []
    for i, blk in enumerate(model.h):
        sel = cfg.selector if blk.sparse else "dense"
        cells, over, _ = layer_flops(cfg, sel)
        rows.append(dict(layer=i, ffn=sel, params=sum(p.numel() for p in blk.ffn.parameters()),
                         cells_flops=cells, select_flops=over))
    attn_params = 4 * d * d
    params = sum(p.numel() for p in model.parameters())
    # non-FFN forward FLOPs per token: QKV+proj 2*4d^2 per layer, attention scores+mix 4*T*d per layer, lm_head 2*d*V
    other = L * (2 * attn_params + 4 * T * d) + 2 * d * model.vocab_size
    ffn = sum(r["cells_flops"] + r["select_flops"] for r in rows)
    total = dict(params=params, params_ffn=sum(r["params"] for r in rows),
                 ffn_flops=ffn, select_flops=sum(r["select_flops"] for r in rows), fwd_flops=other + ffn)
    return rows, total


def format_flop_table(cfg, rows, total):
    lines = [f"FLOPs/params per FFN layer (forward, per token) -- selector={cfg.selector} d={cfg.n_embd} "
             f"c={cfg.d_ff} d_m={cfg.d_m} g={cfg.g} b={cfg.b} B={cfg.d_m // max(cfg.g, 1)}",
             f"{'layer':>5} {'ffn':>9} {'params':>12} {'cell FLOPs':>12} {'select FLOPs':>13} {'select %':>9}"]
    for r in rows:
        pct = 100.0 * r["select_flops"] / r["cells_flops"]
        lines.append(f"{r['layer']:>5} {r['ffn']:>9} {r['params']:>12,} {r['cells_flops']:>12,} {r['select_flops']:>13,} {pct:>8.2f}%")
    lines.append(f"model: params {total['params']:,} (FFN {total['params_ffn']:,}); forward FLOPs/token {total['fwd_flops']:,} "
                 f"(FFN {total['ffn_flops']:,}, selection {total['select_flops']:,} = "
                 f"{100.0 * total['select_flops'] / total['fwd_flops']:.2f}% of the model)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- routing health
def routing_health(layer):
    """From the block ids seen during one eval: usage entropy / log B, dead fraction, max/mean load, overflow@cf."""
    if not layer.stats:
        return {}
    B = layer.B
    per_call = [torch.bincount(s, minlength=B).float() for s in layer.stats]
    counts = torch.stack(per_call).sum(0)
    p = counts / counts.sum()
    ent = -(p[p > 0] * p[p > 0].log()).sum() / math.log(B)
    out = dict(entropy=ent.item(), dead=(counts == 0).float().mean().item(), maxload=(counts.max() / counts.mean()).item())
    for cf in (1.0, 1.25):
        over = [(torch.clamp(c - math.ceil(cf * c.sum().item() / B), min=0).sum() / c.sum()).item() for c in per_call]
        out[f"overflow{cf:g}"] = float(np.mean(over))
    layer.stats = []
    return out


# ----------------------------------------------------------------------------- validation of the config
def finalize_config(cfg: Config, device_type: str = "cpu") -> Config:
    """Fill derived sizes and reject impossible combinations (BadInput: one line, exit 2)."""
    if cfg.selector not in SELECTORS:
        raise BadInput(f"unknown --selector {cfg.selector!r}; use one of {', '.join(SELECTORS)}")
    if cfg.impl not in IMPLS:
        raise BadInput(f"unknown --impl {cfg.impl!r}; use one of {', '.join(IMPLS)}")
    if cfg.vanillam_agg not in AGGREGATORS:
        raise BadInput(f"unknown --vanillam_agg {cfg.vanillam_agg!r}; use one of {', '.join(AGGREGATORS)}")
    for name, choices in (("activation", ("gelu", "relu")), ("avgk_weight", ("none", "softmax")),
                          ("device", ("auto", "cpu", "cuda", "mps")),
                          ("dtype", ("auto", "float32", "bfloat16", "float16"))):
        if getattr(cfg, name) not in choices:
            raise BadInput(f"unknown --{name} {getattr(cfg, name)!r}; use one of {', '.join(choices)}")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_interval",
                 "eval_iters", "sffn_every", "bench_tokens", "bench_iters"):
        if getattr(cfg, name) <= 0:
            raise BadInput(f"--{name} must be positive (got {getattr(cfg, name)})")
    if cfg.max_iters < 0 or cfg.warmup_iters < 0:
        raise BadInput("--max_iters and --warmup_iters must be >= 0")
    if cfg.n_embd % cfg.n_head:
        raise BadInput(f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}; pick sizes that divide")
    if cfg.d_ff <= 0:
        cfg.d_ff = 4 * cfg.n_embd
    if cfg.d_m <= 0:
        cfg.d_m = 8 * cfg.d_ff
    if cfg.selector == "dense":
        cfg.g, cfg.b = cfg.d_ff, 1
        return cfg
    if cfg.selector == "pkm":
        n = math.isqrt(cfg.d_m)
        if n * n != cfg.d_m:
            raise BadInput(f"--selector pkm needs --d_m N to be a perfect square (got {cfg.d_m}); try {n * n} or {(n + 1) ** 2}")
        if cfg.pkm_dq % 2 or cfg.pkm_dq <= 0 or cfg.pkm_heads <= 0:
            raise BadInput(f"--pkm_dq must be positive and even and --pkm_heads positive (got {cfg.pkm_dq}, {cfg.pkm_heads})")
        if not 0 < cfg.pkm_knn <= n:
            raise BadInput(f"--pkm_knn {cfg.pkm_knn} must be in 1..sqrt(d_m)={n}")
        cfg.g, cfg.b = 1, cfg.pkm_heads * cfg.pkm_knn
        return cfg
    if cfg.g <= 0:
        cfg.g = cfg.d_ff
    if cfg.d_m % cfg.g:
        raise BadInput(f"--d_m {cfg.d_m} is not divisible by --g {cfg.g}; choose g dividing d_m")
    B = cfg.d_m // cfg.g
    if cfg.b <= 0:
        if cfg.d_ff % cfg.g:
            raise BadInput(f"--d_ff (active cells c) {cfg.d_ff} is not divisible by --g {cfg.g}; choose g dividing c or set --b")
        cfg.b = cfg.d_ff // cfg.g
    if cfg.b > B:
        raise BadInput(f"--b {cfg.b} blocks per token exceeds B = d_m/g = {B} blocks; lower --b or raise --d_m")
    if cfg.selector == "switch" and cfg.b != 1:
        raise BadInput(f"--selector switch routes to exactly one block (b=1), got b={cfg.b}; set --g {cfg.d_ff} or use --selector topk")
    if cfg.impl == "grouped" and device_type == "cuda" and native_grouped_mm() is not None:
        if cfg.n_embd % 8 or cfg.g % 8 or B > 1023:
            raise BadInput(f"--impl grouped on CUDA needs n_embd and g multiples of 8 and B=d_m/g <= 1023 "
                           f"(got d={cfg.n_embd}, g={cfg.g}, B={B}); use --impl masked or a larger g")
    if cfg.capacity_factor < 0:
        raise BadInput("--capacity_factor must be >= 0 (0 = dropless)")
    return cfg


# ----------------------------------------------------------------------------- command line
class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser():
    p = OneLineParser(description="nano_sffn.py: unified sparse FFN (Liu et al. 2023, arXiv 2305.13999)",
                                argument_default=argparse.SUPPRESS)
    comments = _field_comments()
    for f in dataclasses.fields(Config):
        help_ = f"{comments.get(f.name, '')} (default: {f.default})"
        if f.type in ("bool", "bool | None", bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, type(f.default))
            p.add_argument(f"--{f.name}", type=typ, help=help_)
    return p


def _field_comments():
    """One-line comments of the Config fields, read from this file's source (so --help shows them)."""
    out = {}
    try:
        src = open(__file__, encoding="utf-8").read().split("class Config:", 1)[1].split("\n\n\n", 1)[0]
        for line in src.splitlines():
            line = line.strip()
            if ":" in line and "#" in line and not line.startswith("#"):
                out[line.split(":", 1)[0].strip()] = line.split("#", 1)[1].strip()
    except OSError:
        pass
    return out


def config_from_args(argv=None) -> Config:
    args = vars(build_parser().parse_args(argv))
    preset = args.get("preset", "auto")
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() else "cpu"
    if preset not in PRESETS:
        raise BadInput(f"unknown --preset {preset!r}; use one of auto, {', '.join(PRESETS)}")
    cfg = Config(**{**PRESETS[preset], **args})
    cfg.preset = preset
    return cfg


# ----------------------------------------------------------------------------- training
def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda but no CUDA device is visible; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadInput("--device mps but MPS is not available; use --device cpu or auto")
    return name


PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
             ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12))


def peak_flops(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, val in PEAK_BF16:
        if key in name:
            return val
    return None


def get_lr(it, cfg):
    # linear warm-up, then cosine decay to min_lr
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.max_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg, device):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]                          # matrices, embeddings, K, V, gates
    no_decay = [p for p in params if p.dim() < 2]                        # norms, gains, biases
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    extra = dict(fused=True) if device == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return None


def load_data(cfg):
    import data
    try:
        ds = data.load_dataset(name=cfg.dataset, tokenizer=cfg.tokenizer, data_dir=cfg.data_dir or None)
        ds.check_block_size(cfg.block_size)
    except data.DataError as e:
        raise BadInput(str(e)) from None
    return ds


def train(cfg: Config, ds=None, quiet=False):
    """Train one model with cfg; returns the results dict (also written to cfg.out_dir)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = pick_device(cfg.device)
    if ddp:
        import torch.distributed as dist
        backend = "nccl" if device == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        rank, world = 0, 1
    master = rank == 0
    cfg = finalize_config(cfg, device)
    if cfg.resume and not os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt")):
        raise BadInput(f"--resume but {os.path.join(cfg.out_dir, 'ckpt.pt')} does not exist; drop --resume or fix --out_dir")
    if ds is None:
        ds = load_data(cfg)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    use_compile = cfg.compile if cfg.compile is not None else device == "cuda"
    if use_compile and device == "mps":
        print("note: torch.compile is not used on MPS; running eagerly", file=sys.stderr)
        use_compile = False
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    dev = torch.device(device, int(os.environ.get("LOCAL_RANK", 0))) if (device == "cuda" and ddp) else torch.device(device)

    torch.manual_seed(cfg.seed)
    vocab = ((ds.vocab_size + 63) // 64) * 64                             # padded to a multiple of 64
    model = GPT(cfg, vocab).to(dev)
    opt = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(enabled=(dtype == "float16" and device == "cuda"))
    gen = torch.Generator().manual_seed(cfg.seed + rank)                  # data order (saved in ckpt)
    step, log_rows, t_prev_elapsed = 0, [], 0.0
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, log_rows, t_prev_elapsed = ck["step"], ck["log_rows"], ck["elapsed_s"]
        gen.set_state(ck["rng"]["data"])
        torch.set_rng_state(ck["rng"]["torch"])
        if device == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
    rows, total = flop_table(cfg, model)
    if master and not quiet:
        print(format_flop_table(cfg, rows, total))
        for n in ds.notes:
            print(n)
    if master:
        with open(os.path.join(cfg.out_dir, "flops.txt"), "w") as f:
            f.write(format_flop_table(cfg, rows, total) + "\n")
        meta = dict(config=asdict(cfg), torch=torch.__version__, device=device,
                    device_name=torch.cuda.get_device_name() if device == "cuda" else device, git_commit=git_commit(),
                    dataset=ds.name, tokenizer=ds.tokenizer, vocab_size=ds.vocab_size, vocab_padded=vocab)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)

    raw = model
    if use_compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[dev.index] if device == "cuda" else None)
    autocast = torch.autocast(device_type=device, dtype=ptdtype) if (device == "cuda" and ptdtype != torch.float32) \
        else contextlib.nullcontext()
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    flops_per_token = 3 * total["fwd_flops"]                             # fwd + bwd ~ 3x forward
    peak = peak_flops(device)

    @torch.no_grad()
    def evaluate():
        """Mean CE on fixed train/val batches (same batches at every eval) + routing health on val."""
        raw.eval()
        out = {}
        egen = torch.Generator().manual_seed(cfg.seed + 10_000 + rank)
        for split in ("train", "val"):
            for _, l in raw.sparse_layers():
                l.track = split == "val"
            losses = []
            for _ in range(cfg.eval_iters):
                x, y = ds.get_batch(split, cfg.batch_size, cfg.block_size, device=dev, generator=egen, rank=rank, world_size=world)
                with autocast:
                    _, ce, _ = raw(x, y)
                losses.append(ce.float())
            out[split] = torch.stack(losses).mean()
            if ddp:
                torch.distributed.all_reduce(out[split])
                out[split] /= world
            out[split] = out[split].item()
        health = {}
        for i, l in raw.sparse_layers():
            l.track = False
            for k, v in routing_health(l).items():
                health[f"L{i}_{k}"] = v
        raw.train()
        return out, health

    def save_ckpt(step, elapsed):
        ck = dict(model=raw.state_dict(), optimizer=opt.state_dict(), config=asdict(cfg), step=step,
                  log_rows=log_rows, elapsed_s=elapsed,
                  rng=dict(data=gen.get_state(), torch=torch.get_rng_state(),
                           cuda=torch.cuda.get_rng_state() if device == "cuda" else None))
        tmp = ckpt_path + ".tmp"
        torch.save(ck, tmp)
        os.replace(tmp, ckpt_path)

    pbar = None
    if master and cfg.progress and not quiet:
        try:
            from tqdm import tqdm
            pbar = tqdm(total=cfg.max_iters, initial=step, dynamic_ncols=True, desc=f"{cfg.selector}")
        except ImportError:
            pbar = None
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    t0 = time.time()
    train_time, train_tokens = 0.0, 0       # measured between evals, after `warm` compile/warm-up steps
    last_loss = float("nan")
    first_step = step
    warm = 3 if cfg.max_iters - first_step > 6 else 0
    t_mark, n_mark = time.time(), step      # start of the current timed interval
    timing = warm == 0
    while True:
        elapsed = t_prev_elapsed + time.time() - t0
        stop = step >= cfg.max_iters or (cfg.stop_at > 0 and step >= cfg.stop_at)
        if (step % cfg.eval_interval == 0 or stop) and not (cfg.resume and step == first_step):
            if timing and step > n_mark:
                sync()
                train_time += time.time() - t_mark
                train_tokens += (step - n_mark) * tokens_per_step
            losses, health = evaluate()
            tps = train_tokens / train_time if train_time > 0 else float("nan")
            row = dict(step=step, tokens=step * tokens_per_step, elapsed_s=round(elapsed, 3), lr=get_lr(step, cfg),
                       train_loss=losses["train"], val_loss=losses["val"], tokens_per_s=tps,
                       mfu=(tps * flops_per_token / peak) if peak and tps == tps else None, **health)
            log_rows.append(row)
            if master:
                write_log(cfg.out_dir, log_rows)
                msg = f"step {step}: train {losses['train']:.4f} val {losses['val']:.4f} tok/s {tps:,.0f}"
                if health:
                    ents = [v for k, v in health.items() if k.endswith("_entropy")]
                    deads = [v for k, v in health.items() if k.endswith("_dead")]
                    msg += f" | usage entropy {np.mean(ents):.3f} dead {np.mean(deads):.3f}"
                if pbar is not None:
                    pbar.write(msg)
                elif not quiet:
                    print(msg)
                save_ckpt(step, elapsed)
            t_mark, n_mark = time.time(), step
        if stop:
            break
        # one optimizer step
        lr = get_lr(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            x, y = ds.get_batch("train", cfg.batch_size, cfg.block_size, device=dev, generator=gen, rank=rank, world_size=world)
            if ddp:
                model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            with autocast:
                _, ce, aux = model(x, y)
                loss = (ce + aux) / cfg.grad_accum
            scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0 or step == cfg.max_iters or step - first_step <= 2:
            last_loss = ce.item()                                        # the only host sync: once per 10 steps
        if not timing and step - first_step == warm:                    # compile and warm-up done: start the clock
            sync()
            t_mark, n_mark, timing = time.time(), step, True
        if pbar is not None:
            tt, tk = train_time + (time.time() - t_mark if timing else 0), train_tokens + ((step - n_mark) * tokens_per_step if timing else 0)
            pbar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tk / tt if tt > 0 else 0:,.0f}")
            pbar.update(1)
    if pbar is not None:
        pbar.close()
    elapsed = t_prev_elapsed + time.time() - t0
    final = log_rows[-1]
    results = dict(script="nano_sffn.py", config=asdict(cfg),
                   final=dict(train_loss=final["train_loss"], val_loss=final["val_loss"], val_ppl=math.exp(final["val_loss"]),
                              tokens_per_s=final["tokens_per_s"], params=total["params"], elapsed_s=elapsed),
                   paper=dict(selector=cfg.selector, g=cfg.g, b=cfg.b, B=cfg.d_m // max(cfg.g, 1), d_m=cfg.d_m, c=cfg.d_ff,
                              active_fwd_flops_per_token=total["fwd_flops"], selection_flops_per_token=total["select_flops"],
                              ffn_params=total["params_ffn"], flop_table=rows,
                              routing_health={k: v for k, v in final.items() if k.startswith("L")},
                              impl={i: "grouped" if l.use_grouped(device, ptdtype, cfg.n_embd) else "masked"
                                    for i, l in raw.sparse_layers()}))
    if master:
        with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        plot_run(cfg.out_dir, log_rows, cfg.selector)
        if cfg.sample_tokens > 0 and not quiet:
            raw.eval()
            start = torch.tensor([ds.encode("\n")], dtype=torch.long, device=dev)
            with autocast:
                out = raw.generate(start, cfg.sample_tokens, generator=torch.Generator().manual_seed(cfg.seed),
                                   vocab_size=ds.vocab_size)
            print("---- sample ----")
            print(ds.decode(out[0].tolist()))
            print("----------------")
    if ddp:
        torch.distributed.destroy_process_group()
    return results


def write_log(out_dir, rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path = os.path.join(out_dir, "log.csv")
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("note: matplotlib is not installed; plots skipped (pip install matplotlib)", file=sys.stderr)
        return None


def plot_run(out_dir, rows, title):
    plt = _pyplot()
    if plt is None:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, [r["train_loss"] for r in rows], label="train")
    ax.plot(steps, [r["val_loss"] for r in rows], label="val")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title(title), ax.legend()
    fig.tight_layout(), fig.savefig(os.path.join(out_dir, "loss.png"), dpi=120), plt.close(fig)
    layers = sorted({k.split("_")[0] for r in rows for k in r if k.startswith("L") and k.endswith("_entropy")})
    if not layers:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    for L in layers:
        for ax, key, name in zip(axes, ("entropy", "dead", "maxload"),
                                 ("block-usage entropy / log B", "fraction of blocks never selected", "max load / mean load")):
            ax.plot(steps, [r.get(f"{L}_{key}", float("nan")) for r in rows], label=f"layer {L[1:]}")
            ax.set_title(name, fontsize=9), ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"routing health: {title}", fontsize=10)
    fig.tight_layout(), fig.savefig(os.path.join(out_dir, "routing_health.png"), dpi=120), plt.close(fig)


def plot_compare(out_dir, runs):
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in runs:
        ax.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], label=name, marker=".")
    ax.set_xlabel("step"), ax.set_ylabel("val loss"), ax.set_title("val loss (same seed, same data order)"), ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(os.path.join(out_dir, "compare_val_loss.png"), dpi=120), plt.close(fig)


# ----------------------------------------------------------------------------- comparison mode
def parse_compare(spec, cfg):
    runs = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        sel, _, g = item.partition(":")
        if sel not in SELECTORS:
            raise BadInput(f"unknown selector {sel!r} in --compare; use one of {', '.join(SELECTORS)} (as sel or sel:g)")
        try:
            g = int(g) if g else (cfg.d_ff if sel in ("switch", "dense") else cfg.g)
        except ValueError:
            raise BadInput(f"bad block size in --compare item {item!r}; write sel:g with an integer g") from None
        c = dataclasses.replace(cfg, selector=sel, g=g, b=0 if sel != "switch" else 1, compare="",
                                out_dir=os.path.join(cfg.out_dir, f"{sel}_g{g}" if sel not in ("dense", "pkm") else sel))
        runs.append((f"{sel}" + (f" g={g}" if sel not in ("dense", "pkm") else ""), c))
    if not runs:
        raise BadInput("--compare is empty; give e.g. dense,switch:2048,avgk:64")
    return runs


def write_compare(out_dir, table):
    with open(os.path.join(out_dir, "compare.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    md = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    md += ["| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()) + " |" for r in table]
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write("\n".join(md) + "\n")


def run_compare(cfg):
    device = pick_device(cfg.device)
    runs = parse_compare(cfg.compare, cfg)
    for _, c in runs:
        finalize_config(c, device)                                       # validate every run before writing anything
    ds = load_data(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    table, curves = [], []
    for name, c in runs:
        print(f"==== {name} ====")
        res = train(c, ds=ds)
        curves.append((name, list(csv.DictReader(open(os.path.join(c.out_dir, "log.csv"))))))
        curves[-1] = (name, [{k: float(v) if v not in ("", None) else float("nan") for k, v in r.items()} for r in curves[-1][1]])
        p = res["paper"]
        table.append(dict(selector=c.selector, g=p["g"], b=p["b"], params=res["final"]["params"],
                          active_fwd_flops_per_token=p["active_fwd_flops_per_token"],
                          val_loss=round(res["final"]["val_loss"], 4), val_ppl=round(res["final"]["val_ppl"], 3),
                          tokens_per_s=round(res["final"]["tokens_per_s"]) if res["final"]["tokens_per_s"] == res["final"]["tokens_per_s"] else None))
        write_compare(cfg.out_dir, table)                                # after every run: partial results survive
        plot_compare(cfg.out_dir, curves)
    print(open(os.path.join(cfg.out_dir, "compare.md")).read())
    return table


# ----------------------------------------------------------------------------- benchmark
def run_bench(cfg):
    """Layer forward+backward time: dense FFN of width c vs Avg-K S-FFN on the masked and grouped paths."""
    device = pick_device(cfg.device)
    d, c, d_m, T = cfg.n_embd, cfg.d_ff if cfg.d_ff > 0 else 4 * cfg.n_embd, cfg.d_m, cfg.bench_tokens
    d_m = d_m if d_m > 0 else 8 * c
    gs = [int(s) for s in cfg.bench_g.split(",") if s.strip()]
    for g in gs:
        if d_m % g or c % g:
            raise BadInput(f"--bench_g {g} must divide d_m={d_m} and d_ff={c}")
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    x = torch.randn(T, d, device=device, dtype=dt, requires_grad=True)
    gy = torch.randn(T, d, device=device, dtype=dt)

    def timeit(fn, iters=cfg.bench_iters, warm=5):
        for _ in range(warm):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t) / iters

    def fwd_bwd(layer, ids=None):
        def f():
            y, _ = layer(x, None, ids)
            y.backward(gy)
        return f

    rows = []
    dense = DenseFFN(d, c, cfg.activation, cfg.n_layer).to(device, dt)
    rows.append(dict(g="dense", b="-", B="-", select_ms=None, masked_ms=round(timeit(fwd_bwd(dense)), 3), grouped_ms=None))
    for g in gs:
        bc = dataclasses.replace(cfg, selector="avgk", g=g, b=0, d_ff=c, d_m=d_m, impl="masked")
        finalize_config(bc, device)
        layer = SparseFFN(bc, 1).to(device, dt)
        sel_ms = timeit(lambda: layer.route(x.detach())[0])
        masked = timeit(fwd_bwd(layer))
        layer.impl = "grouped"
        ok = native_grouped_ok(device, dt, d, g, layer.B)
        try:
            grouped = timeit(fwd_bwd(layer)) if (ok or device == "cpu") else None
        except RuntimeError as e:
            grouped = None
            print(f"g={g}: grouped failed: {str(e).splitlines()[0]}")
        rows.append(dict(g=g, b=bc.b, B=layer.B, select_ms=round(sel_ms, 3), masked_ms=round(masked, 3),
                         grouped_ms=round(grouped, 3) if grouped is not None else None))
        del layer
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if cfg.bench_explain:
        md_x = explain_graph_breaks(cfg, device, dt)
        open(os.path.join(cfg.out_dir, "graph_breaks.md"), "w").write("\n".join(md_x) + "\n")
    head = (f"layer fwd+bwd, {name}, {dt}, T={T} d={d} d_m={d_m} c={c}, Avg-K selection, torch {torch.__version__}, "
            f"mean of {cfg.bench_iters} iterations (ms)")
    md = [head, "", "| g | b | B | Avg-K selection | masked | grouped |", "|---|---|---|---|---|---|"]
    md += [f"| {r['g']} | {r['b']} | {r['B']} | {r['select_ms']} | {r['masked_ms']} | {r['grouped_ms']} |" for r in rows]
    print("\n".join(md))
    open(os.path.join(cfg.out_dir, "bench.md"), "w").write("\n".join(md) + "\n")
    with open(os.path.join(cfg.out_dir, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def explain_graph_breaks(cfg, device, dt):
    """torch._dynamo.explain on one FFN layer per selector and impl (under autocast on CUDA): graphs and breaks."""
    import torch._dynamo
    md = ["| selector | impl | graphs | graph breaks | reasons |", "|---|---|---|---|---|"]
    d = 64
    for sel in SELECTORS[1:]:
        for impl in ("masked", "grouped"):
            g = 64 if sel != "switch" else 256
            c = dataclasses.replace(cfg, selector=sel, n_embd=d, n_head=4, d_ff=256, d_m=1024 if sel != "pkm" else 1024,
                                    g=g, b=0, impl=impl, pkm_dq=32, pkm_knn=16)
            finalize_config(c, device)
            layer = (ProductKeyMemory(c) if sel == "pkm" else SparseFFN(c, 128)).to(device)
            x = torch.randn(512, d, device=device)
            idx = torch.randint(0, 128, (512,), device=device)
            torch._dynamo.reset()
            ctx = torch.autocast(device, dtype=dt) if dt != torch.float32 else contextlib.nullcontext()
            with ctx:
                ex = torch._dynamo.explain(layer)(x, idx)
            reasons = "; ".join(sorted({str(getattr(r, "reason", r)).splitlines()[0][:80] for r in ex.break_reasons}))
            md.append(f"| {sel} | {impl} | {ex.graph_count} | {ex.graph_break_count} | {reasons or '-'} |")
    print("\n".join(md))
    return md


# ----------------------------------------------------------------------------- main
def main(argv=None):
    try:
        cfg = config_from_args(argv)
        if cfg.bench:
            return run_bench(cfg)
        if cfg.compare:
            return run_compare(cfg)
        return train(cfg)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
