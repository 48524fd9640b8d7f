"""nano_sffn.py: a unified view of sparse feed-forward networks, in one file.

Paper: Zeyu Leo Liu, Tim Dettmers, Xi Victoria Lin, Veselin Stoyanov, Xian Li, "Towards A Unified
View of Sparse Feed-Forward Network in Pretraining Large Language Model", EMNLP 2023,
arXiv:2305.13999. A from-scratch reimplementation (no official code was released) of its framework,
its method Avg-K and the selectors it compares. Equation numbers (1)-(5) are this file's own.

The idea (the paper's unified view: MoE and sparse memory are both "memory with large key and
value tables"). A transformer FFN is a key-value memory with keys K = W1 and values V = W2^T,
both (d_m, d):
    FFN(x) = f(x K^T) V = sum_{i=1..d_m} f(x . k_i) v_i                        (1)  memory cells i
Cut the d_m cells into B = d_m/g contiguous *memory blocks* of g cells (a block is an MoE
"expert" of hidden size g). A *selector* picks a set S(x) of b blocks per token:
    y(x) = sum_{beta in S(x)} w_beta(x) sum_{i in beta} f(x . k_i) v_i          (2)  the S-FFN
so c = b*g cells are active: compute is that of a dense FFN of width c (VanillaM and PKM aside,
see Departures), while parameters grow with d_m.
The paper studies two axes: (1) the block size g (at fixed c, smaller g -> lower perplexity) and
(2) the selection method: *direct*, from the FFN's own keys (VanillaM, PKM, Avg-K), or *indirect*,
through a gate or a static map (Switch, GShard top-k, BASE, Hash). Its method, Avg-K, embeds each
block by the mean of its keys (no new parameters, no gradient) and keeps the top b blocks:
    e_beta = (1/g) sum_{i in beta} k_i                                          (3)
    s_beta(x) = x . e_beta = mean_{i in beta} x . k_i     (mean pre-activation)  (4)
    S(x) = TopK_b(s(x)),  w_beta = 1       (no gate, no load-balancing loss)    (5)

    x = LN(h) --+--> selector --> S(x) = {beta_1 .. beta_b}, w_beta
                |                      |
                |  K = [ K_1 | K_2 | ... | K_B ]     B = d_m/g blocks of g cells
                |                      |  only the b chosen blocks
                +----> f(x K_beta^T) V_beta --* w_beta --> sum over S(x) --> y,  h + y

    --selector  dense    : one block of c cells, always on                        (1)
                vanillam : top-b of agg_{i in beta} x . k_i (all d_m scores)      sparse memory
                pkm      : product-key memory, g = 1, N = d_m (Lample et al. 2019)
                switch   : top-1 of softmax(W_g x), w = p             (Fedus et al. 2021)
                topk     : top-b of softmax(W_g x), renormalized      (GShard, Lepikhin et al.)
                base     : balanced assignment (train), argmax (eval)  (Lewis et al. 2021)
                hash     : fixed random map token id -> blocks         (Roller et al. 2021)
                avgk     : top-b of x . mean(K_beta)                   (this paper) (3)-(5)

--impl masked computes all d_m cells and zeroes the unselected blocks (the reference); grouped runs
one grouped GEMM per FFN matrix, triton fused Triton kernels ("making it fast"); auto = on CUDA
triton for 64 <= g < 256 (grouped without triton), grouped for g >= 256, else masked.

Departures (measured at the gpu preset; see README): VanillaM scores all d_m cells and PKM keeps
H*k cells, so they are not compute-matched (+53% and -12% active FLOPs/token); the top-k aux loss
counts all b choices in f_e (GShard counts first choices); the Hash table is uniform over token ids,
not Roller et al.'s frequency-balanced one; BASE's Sinkhorn plan is approximate (max/mean load
1.09-1.16 where exact BASE gives 1.00). Beyond the paper: --avgk_balance bias (loss-free balancing).

Measured at the gpu preset (98M tokens, 2-3 seeds, LRs swept; README): sparse beats a tuned dense
FFN (not BASE evaluated greedily, nor Avg-K at g = 2048; Avg-K at g = 512 and PKM are level with
it); smaller g helps Avg-K (the paper's first claim), but Avg-K does not beat Switch, nor a
learned top-k gate at the same g, is level with Hash, and leaves 24-62% of its blocks unused.

Run it
    python nano_sffn.py --selector avgk                      # laptop CPU, ~5 min, char Shakespeare
    python nano_sffn.py --preset gpu --selector avgk --g 256 # one H100: 8L/512d miniature
    python nano_sffn.py --compare dense,switch:512,hash:512,avgk:64 --max_iters 300   # sel[:g]
    python nano_sffn.py --preset gpu --compare dense,switch:2048,hash:2048,topk:256,avgk:64
    python nano_sffn.py --bench 2048,512,256,64 --device cuda   # layer fwd+bwd timings per g
    torchrun --standalone --nproc_per_node 8 nano_sffn.py --preset gpu   # DDP

Reading map: Config -> the FFN as a memory (DenseFFN, (1)) -> the S-FFN (SparseFFN, (2)) and its
selectors: VanillaM (PKM: its own module), Switch, top-k, BASE, Hash, Avg-K -> the model (GPT) ->
the experiment (FLOPs, routing health, --compare) -> making it fast (grouped GEMM, fused Triton
kernels, --bench) -> command line, training loop, checkpoints.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

import data

SCRIPT, TITLE = "nano_sffn", "Unified sparse FFN (Liu et al. 2023, arXiv 2305.13999)"
SELECTORS = ("dense", "vanillam", "pkm", "switch", "topk", "base", "hash", "avgk")
AGGREGATORS = ("pre_mean", "post_mean", "post_sum", "max")


def _f(default, help, choices=None):
    """A Config field with its --help text (and allowed values): the parser is built from these."""
    return field(default=default, metadata=dict(help=help, choices=choices))


@dataclass
class Config:
    # --- the paper
    selector: str = _f("avgk", "how blocks are selected", SELECTORS)
    d_ff: int = _f(512, "active cells c per token (= the dense FFN's width); 0 -> 4*n_embd")
    d_m: int = _f(2048, "memory size: cells per sparse layer; 0 -> 8*d_ff")
    g: int = _f(64, "cells per memory block (block size); 0 -> d_ff")
    b: int = _f(0, "blocks selected per token; 0 -> d_ff // g (keeps c = d_ff)")
    sffn_every: int = _f(2, "sparse FFN in layers i % sffn_every == sffn_every-1 (2 = every other)")
    activation: str = _f("gelu", "f, the FFN nonlinearity", ("gelu", "relu"))
    impl: str = _f("auto", "masked (reference), grouped or triton (fast); auto: by device and g",
                   ("auto", "masked", "grouped", "triton"))
    avgk_weight: str = _f("none", "Avg-K weight w: none (paper) or softmax", ("none", "softmax"))
    # probed for the dead blocks at the gpu preset (README): neither changed them, defaults stay
    key_init_std: float = _f(0.02, "std of the N(0, s^2) init of the keys K")
    select_fp32: bool = _f(False, "Avg-K selection scores in float32 (default: the autocast dtype)")
    avgk_balance: str = _f("none", "Avg-K load balancing: none (paper) | bias (Wang et al. 2024)",
                           ("none", "bias"))
    balance_rate: float = _f(1e-3, "--avgk_balance bias: bias step u per optimizer step")
    vanillam_agg: str = _f("pre_mean", "VanillaM block score over its cells", AGGREGATORS)
    aux_alpha: float = _f(0.01, "switch/topk load-balancing loss weight alpha")
    capacity_factor: float = _f(0.0, "switch/topk capacity factor (training); 0 = dropless")
    base_iters: int = _f(8, "BASE: Sinkhorn iterations of the balanced assignment")
    base_eval: str = _f("greedy", "BASE routing at evaluation: greedy (Lewis et al.) or balanced "
                        "(as in training; each token's choice then depends on its batch)",
                        ("greedy", "balanced"))
    hash_seed: int = _f(1234, "seed of the fixed random token -> block table")
    pkm_heads: int = _f(4, "PKM query heads H")
    pkm_knn: int = _f(32, "PKM k (keys kept per head)")
    pkm_dq: int = _f(128, "PKM query dim per head (two halves of d_q/2)")
    # --- model
    n_layer: int = _f(4, "transformer blocks")
    n_head: int = _f(4, "attention heads")
    n_embd: int = _f(128, "model width d")
    block_size: int = _f(128, "context length")
    # --- data
    dataset: str = _f("shakespeare", "shakespeare | pycode | pycode_all | a UTF-8 text file")
    tokenizer: str = _f("char", "tokenizer", ("char", "gpt2"))
    data_dir: str = _f("", "where dataset sources are looked for ('' = NANO_DATA_DIR or data/)")
    # --- training
    batch_size: int = _f(16, "sequences per micro-batch (per process)")
    grad_accum: int = _f(1, "micro-batches per optimizer step (per process)")
    max_iters: int = _f(600, "optimizer steps")
    lr: float = _f(2e-3, "peak learning rate")
    min_lr: float = _f(2e-4, "final learning rate of the cosine decay")
    warmup_iters: int = _f(60, "linear warm-up steps")
    weight_decay: float = _f(0.1, "AdamW decay (matrices and embeddings only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "global grad-norm clip (0 = off)")
    eval_interval: int = _f(100, "steps between evaluations (and checkpoints)")
    eval_iters: int = _f(10, "batches per split per evaluation")
    # --- system
    device: str = _f("auto", "device", ("auto", "cpu", "cuda", "mps"))
    dtype: str = _f("auto", "auto = bf16 on CUDA", ("auto", "float32", "bfloat16", "float16"))
    compile: bool | None = _f(None, "torch.compile the model (default: on for CUDA only)")
    seed: int = _f(1337, "seed for init and data order")
    out_dir: str = _f("out_sffn", "where logs, plots and the checkpoint go")
    resume: bool = _f(False, "continue from out_dir/ckpt.pt")
    stop_at: int = _f(0, "stop with a checkpoint after this step, schedule unchanged (0 = off)")
    progress: bool = _f(True, "tqdm progress bar")
    sample_tokens: int = _f(200, "tokens to sample at the end (0 = none)")
    # --- modes
    preset: str = _f("auto", "named config (auto: gpu if CUDA)", ("auto", "cpu", "gpu"))
    compare: str = _f("", "comma list of runs sel[:g], trained one after another")
    bench: str = _f("", "comma list of g values: time one layer fwd+bwd per g ('' = off)")
    bench_tokens: int = _f(8192, "tokens per --bench call")
    bench_iters: int = _f(20, "timed iterations per --bench entry (after 5 warm-up ones)")


PRESETS = {
    # laptop CPU, a few minutes: Config's defaults (char Shakespeare, 4 layers, d_m = 4c)
    "cpu": dict(),
    # one H100/H200, a miniature: 8L/512d, S-FFN every other layer, d_m = 8*2048, c = 2048.
    # 6000 x 16k = 98M tokens of pycode_all (~70-100M GPT-2 tokens): each token seen about once.
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, block_size=512, d_ff=2048, d_m=16384, g=256,
                batch_size=32, max_iters=6000, lr=1e-3, min_lr=1e-4, warmup_iters=400,
                eval_interval=500, eval_iters=20, dataset="pycode_all", tokenizer="gpt2",
                pkm_knn=64),
}


# ---- the FFN as a key-value memory
ACTIVATIONS = dict(gelu=F.gelu, relu=F.relu)     # f, the FFN nonlinearity


def f32(t):
    """Router math in at least float32 (float64 stays float64, so gradcheck is exact)."""
    return t if t.dtype == torch.float64 else t.float()


class DenseFFN(nn.Module):
    """The dense FFN as a key-value memory (1): K = W1 (c, d), V = W2^T (c, d).

    The same parameter names as the sparse layer: avgk with b = B is this module (tested)."""

    def __init__(self, d, c, act, n_layer):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.K = nn.Parameter(torch.randn(c, d) * 0.02)                           # keys k_i
        self.V = nn.Parameter(torch.randn(c, d) * 0.02 / math.sqrt(2 * n_layer))  # values v_i

    def forward(self, x, idx=None, ids=None):  # x (N, d) -> (N, d), aux
        return self.act(x @ self.K.t()) @ self.V, x.new_zeros(())             # (1)


class SparseFFN(nn.Module):
    """The S-FFN (2): d_m cells in B = d_m/g blocks; a selector picks b blocks per token.

    route(x, idx, ids) -> block ids (N, b), weights w (N, b) or None, aux loss, pre-activations
    or None; forward(x, idx, ids) -> y (N, d), aux. Pass `ids` to hold the selection fixed."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        d, self.d_m, self.g, self.b = cfg.n_embd, cfg.d_m, cfg.g, cfg.b
        self.B = self.d_m // self.g                                  # blocks (a.k.a. experts)
        self.selector, self.impl, self.agg = cfg.selector, cfg.impl, cfg.vanillam_agg
        if self.impl == "triton" or auto_triton(self) and torch.cuda.is_available() and triton_ok(
                "cuda", torch.bfloat16):
            custom_ops()                     # registered here: never while torch.compile traces
        self.act = ACTIVATIONS[cfg.activation]                       # f: GeLU or ReLU
        self.alpha, self.cf, self.base_iters = cfg.aux_alpha, cfg.capacity_factor, cfg.base_iters
        self.base_eval = cfg.base_eval
        self.avgk_weight, self.select_fp32 = cfg.avgk_weight, cfg.select_fp32
        # the memory (1): K, V (d_m, d); block beta = rows [beta*g, (beta+1)*g)
        self.K = nn.Parameter(torch.randn(self.d_m, d) * cfg.key_init_std)
        self.V = nn.Parameter(torch.randn(self.d_m, d) * 0.02 / math.sqrt(2 * cfg.n_layer))
        if self.selector in ("switch", "topk"):
            self.W_g = nn.Parameter(torch.randn(self.B, d) * 0.02)  # gate, one row per block
        if self.selector == "base":
            self.C = nn.Parameter(torch.randn(self.B, d) * 0.02)    # BASE centroids c_e
        if self.selector == "hash":  # a fixed random map token id -> b distinct blocks
            gen = torch.Generator().manual_seed(cfg.hash_seed)
            table = torch.rand(vocab_size, self.B, generator=gen).argsort(1)[:, : self.b]
            self.register_buffer("hash_table", table, persistent=True)  # (vocab, b) long
        self.track, self.stats, self.agree = False, [], []  # routing health (eval only)
        self.balance, self.balance_rate = cfg.avgk_balance == "bias", cfg.balance_rate
        if self.selector == "avgk" and self.balance:  # beyond the paper, see balance_step()
            self.register_buffer("sel_bias", torch.zeros(self.B))               # (B,) in ckpt
            self.register_buffer("load", torch.zeros(self.B), persistent=False)  # (B,) counts

    def forward(self, x, idx=None, ids=None):  # x (N, d)
        ids, w, aux, pre = self.route(x, idx, ids)
        if self.track:
            self.stats.append(ids.detach().reshape(-1))
        path = impl_path(self, x.device.type, compute_dtype(x), x.shape[1])
        if path == "masked":
            return self.compute_masked(x, ids, w, pre), aux
        fast = compute_triton if path == "triton" else compute_grouped   # making it fast
        return fast(self, x, ids, w, pre), aux

    def compute_masked(self, x, ids, w, pre=None):
        """(2) as one product: all d_m cells, unselected blocks zeroed. The exact reference.

        x (N, d), ids (N, b) chosen blocks, w (N, b) their weights or None (w_beta = 1), pre
        (N, d_m) = x K^T when the selector computed it already -> y (N, d), in h's dtype:
            y = (f(x K^T) * M) V,  M (N, d_m) = w_beta on the g cells of a chosen block, else 0"""
        # BEGIN EXERCISE sffn_masked: f(x K^T) (or f(pre)), chosen blocks * w, others 0; @ V
        N, B, g = x.shape[0], self.B, self.g
        h = self.act(pre if pre is not None else x @ self.K.t())                  # (N, d_m)
        vals = torch.ones_like(ids, dtype=h.dtype) if w is None else w.to(h.dtype)
        mask = torch.zeros(N, B, device=x.device, dtype=h.dtype).scatter(1, ids, vals)  # (N, B)
        return (h.view(N, B, g) * mask.unsqueeze(-1)).view(N, -1) @ self.V.to(h.dtype)
        # END EXERCISE sffn_masked

    @torch.no_grad()
    def balance_step(self):
        """Loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing"), not in
        the paper: after each optimizer step, b_beta += u * sign(mean load - load_beta), so
        overloaded blocks score lower next time and idle ones higher. Called by train()."""
        self.sel_bias += self.balance_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()

    def route(self, x, idx=None, ids=None):
        name = "gate" if self.selector in ("switch", "topk") else self.selector
        return getattr(self, "select_" + name)(x, idx, ids)

    # ---- direct selection, sparse memory: VanillaM scores every cell with the FFN's own keys
    def select_vanillam(self, x, idx, ids):
        pre = x @ self.K.t()                                          # (N, d_m) all x . k_i
        if ids is None:
            p3 = pre.detach().view(x.shape[0], self.B, self.g)      # pre_mean = Avg-K's (4)
            score = p3.mean(-1) if self.agg == "pre_mean" else getattr(
                self.act(p3), dict(post_mean="mean", post_sum="sum", max="amax")[self.agg])(-1)
            ids = score.topk(self.b, dim=-1).indices                  # (N, b)
        return ids, None, x.new_zeros(()), pre       # pre is reused by the compute (no 2nd GEMM)

    # ---- the other sparse memory, PKM, has its own query and product keys: ProductKeyMemory

    # ---- indirect selection through a learned gate: Switch (Fedus et al. 2021, eqs. 1-2)
    #      and GShard top-k (Lepikhin et al. 2020): p = softmax(W_g x) in float32
    def select_gate(self, x, idx, ids):
        ids, w, aux = self.gate_route(x, ids)
        N, b, B = x.shape[0], self.b, self.B
        if self.cf > 0 and self.training:
            # Switch eq. 3: capacity C = ceil(cf * N * b / B); later assignments (token order,
            # first choices first) past it are dropped
            cap = math.ceil(self.cf * N * b / B)
            onehot = F.one_hot(ids.t().reshape(-1), B)                # (b*N, B)
            pos = (onehot.cumsum(0) * onehot).sum(-1) - 1             # position in its block
            w = w * (pos < cap).view(b, N).t().to(w.dtype)
        return ids, w, aux, None

    def gate_route(self, x, ids=None):
        """The router: x (N, d) -> ids (N, b), w (N, b), aux (a scalar).

            p(x) = softmax(W_g x)       (N, B), in float32 (f32) whatever x's dtype
            ids  = top-b of p           (detached: the choice itself gets no gradient), or as given
            w_e  = p_e(x) at ids        (topk: renormalized so each token's b weights sum to 1)
            aux  = alpha * B * sum_e f_e P_e     Switch eq. 4: f_e = share of the N*b assignments
                   that went to block e (a count, no gradient), P_e = mean_t p_e(x_t)"""
        b, B = self.b, self.B
        # BEGIN EXERCISE sffn_switch: fp32 softmax(x W_g^T); top-b; w = p at ids; aux = aB sum f*P
        p = torch.softmax(f32(x @ self.W_g.t().to(x.dtype)), -1)     # (N, B)
        if ids is None:
            ids = p.detach().topk(b, dim=-1).indices                  # (N, b)
        w = p.gather(1, ids)                                          # w = p_e(x)
        if self.selector == "topk":
            w = w / w.sum(-1, keepdim=True)                           # GShard: renormalize
        f = torch.zeros(B, device=x.device, dtype=p.dtype).scatter_add_(
            0, ids.reshape(-1), torch.ones(ids.numel(), device=x.device, dtype=p.dtype))
        aux = self.alpha * B * (f / ids.numel() * p.mean(0)).sum()
        return ids, w, aux
        # END EXERCISE sffn_switch

    # ---- BASE (Lewis et al. 2021): balanced assignment in training, greedy at evaluation
    def balanced(self, s):
        """Sinkhorn (the S-BASE approximation, Clark et al. 2022) to a doubly stochastic plan
        (rows sum 1, columns N/B), then each token takes its top-b blocks. s (N, B) -> (N, b)"""
        N, B = s.shape
        logp = s
        for _ in range(self.base_iters):
            logp = logp - logp.logsumexp(0, keepdim=True) + math.log(N / B)
            logp = logp - logp.logsumexp(1, keepdim=True)
        return logp.topk(self.b, dim=-1).indices

    def select_base(self, x, idx, ids):
        s = f32(x @ self.C.t().to(x.dtype))                           # (N, B) s_te = x_t . c_e
        if ids is None and (self.training or self.base_eval == "balanced"):
            ids = self.balanced(s.detach())
        elif ids is None:
            ids = s.detach().topk(self.b, dim=-1).indices
            if self.track:  # diagnostic: share of the greedy choices training's plan also makes
                bal = self.balanced(s.detach())
                self.agree.append((ids.unsqueeze(-1) == bal.unsqueeze(1)).any(-1).float().mean())
        return ids, torch.sigmoid(s.gather(1, ids)), x.new_zeros(()), None  # w = sigma(x . c_e)

    # ---- HashLayer (Roller et al. 2021): blocks = table[token id]; no router, no loss
    def select_hash(self, x, idx, ids):
        if ids is None:
            ids = self.hash_table[idx.reshape(-1)]                    # (N, b)
        return ids, None, x.new_zeros(()), None

    # ---- Avg-K, the paper's method: direct selection at the cost of a gate, no gate parameters
    def avgk_scores(self, x):
        """x (N, d) -> s (N, B): s_beta(x) = x . e_beta (4), e_beta = mean of block beta's g keys
        (3), rows [beta*g, (beta+1)*g) of K, under stop-gradient (K gets no gradient from s).
        In x's dtype; with --select_fp32 in float32, autocast off (so bf16 cannot flip a choice)."""
        B, g = self.B, self.g
        # BEGIN EXERCISE sffn_avgk: e = mean of each block's keys (K detached); s = x e^T
        e = self.K.detach().view(B, g, -1).mean(1)         # (B, d) e_beta (3), stop-gradient
        if self.select_fp32:  # autocast would cast the matmul back to bf16: switch it off here
            with torch.autocast(x.device.type, enabled=False):
                return f32(x) @ f32(e).t()                            # (N, B) (4) in float32
        return x @ e.t().to(x.dtype)                                  # (N, B) s_beta(x) (4)
        # END EXERCISE sffn_avgk

    def select_avgk(self, x, idx, ids):
        s = self.avgk_scores(x)
        if ids is None:
            s_sel = s.detach()
            if self.balance:  # the bias moves the choice only: never the output, no gradient
                s_sel = f32(s_sel) + self.sel_bias
            ids = s_sel.topk(self.b, dim=-1).indices                  # (N, b) TopK_b (5)
        if self.balance and self.training:  # load of each block in this optimizer step
            flat = ids.reshape(-1)
            self.load.scatter_add_(0, flat, torch.ones_like(flat, dtype=self.load.dtype))
        w = None                                                      # w_beta = 1 (5)
        if self.avgk_weight == "softmax":  # optional: softmax of the kept scores (grad to x only)
            w = torch.softmax(f32(s).gather(1, ids), -1)
        return ids, w, x.new_zeros(()), None


class ProductKeyMemory(nn.Module):
    """PKM (Lample et al. 2019), direct selection: an S-FFN with g = 1 and N = d_m cells.

    q = BN(W_q x) in H heads of two halves; each half scores sqrt(N) sub-keys; top-k per half;
    the k*k sums hold the exact top-k of all N = n^2 product keys; w = softmax(top-k scores);
    y = sum_heads sum_k w v_i."""

    def __init__(self, cfg: Config):
        super().__init__()
        d, self.N, self.H = cfg.n_embd, cfg.d_m, cfg.pkm_heads
        self.k, self.dq = cfg.pkm_knn, cfg.pkm_dq
        self.n, self.impl = math.isqrt(self.N), cfg.impl
        self.b, self.B, self.g = self.H * self.k, self.N, 1
        self.W_q = nn.Linear(d, self.H * self.dq, bias=False)
        self.bn = nn.BatchNorm1d(self.H * self.dq)                    # query BatchNorm
        self.subkeys = nn.Parameter(torch.randn(self.H, 2, self.n, self.dq // 2)
                                    / math.sqrt(self.dq // 2))
        self.V = nn.Parameter(torch.randn(self.N, d) * 0.02 / math.sqrt(2 * cfg.n_layer))
        self.track, self.stats = False, []

    forward = SparseFFN.forward

    def half_scores(self, x):
        q = self.bn(self.W_q(x)).view(x.shape[0], self.H, 2, self.dq // 2)   # (T, H, 2, dq/2)
        s = torch.einsum("thcq,hcjq->thcj", q, self.subkeys.to(q.dtype))     # (T, H, 2, n)
        return s[:, :, 0], s[:, :, 1]                       # s1 = q1 . K1[j], s2 = q2 . K2[j]

    def route(self, x, idx=None, ids=None):
        s1, s2 = self.half_scores(x)                                  # (T, H, n) each
        T, k = x.shape[0], self.k
        if ids is None:
            ids = self.product_topk(s1.detach(), s2.detach())         # (T, H*k)
        ih = ids.view(T, self.H, k)                   # score of cell i = s1[i // n] + s2[i % n]
        sc = s1.gather(-1, ih // self.n) + s2.gather(-1, ih % self.n)       # (T, H, k)
        return ids, torch.softmax(f32(sc), -1).view(T, -1), x.new_zeros(()), None

    def product_topk(self, s1, s2):
        """Exact top-k of all N = n^2 product keys: s1, s2 (T, H, n) half scores -> ids (T, H*k),
        cell i = i1 * n + i2 with score s1[i1] + s2[i2], per head the k best in descending order.
        A cell in the top k of the n^2 sums has both halves in their own half's top k, so the
        k*k sums of the two top-k lists hold all of it: O(n + k^2) per head instead of O(n^2)."""
        T, k = s1.shape[0], self.k
        # BEGIN EXERCISE sffn_pkm: top-k per half, top-k of the k*k sums, back to i1 * n + i2
        v1, i1 = s1.topk(k, -1)                                       # (T, H, k)
        v2, i2 = s2.topk(k, -1)
        cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).view(T, self.H, -1)  # (T, H, k*k)
        top = cand.topk(k, -1).indices                                # exact top-k of n^2
        return (i1.gather(-1, top // k) * self.n + i2.gather(-1, top % k)).view(T, -1)
        # END EXERCISE sffn_pkm

    def compute_masked(self, x, ids, w, pre=None):
        """Reference: a dense (T, N) weight matrix times all N values."""
        W = torch.zeros(x.shape[0], self.N, device=x.device, dtype=w.dtype).scatter_add(1, ids, w)
        return W.to(x.dtype) @ self.V.to(x.dtype)


# ---- the model
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
        q, k, v = (t.view(Bs, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))                                # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(Bs, T, C))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int, vocab_size: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=False)
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
        y, aux = self.ffn(self.ln_2(x).view(Bs * T, C), idx)         # pre-LN: x = LN(h)
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
        self.wte.weight = self.lm_head.weight                         # tied embeddings
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)   # K, V are initialized in their modules
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, resid_std if getattr(m, "RESIDUAL", 0) else 0.02)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx, targets=None):  # idx (B, T)
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))  # (B, T, C)
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
    def generate(self, idx, max_new_tokens, vocab_size, generator, temperature=0.8, top_k=50):
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.block_size:])[0][:, -1, :].float() / temperature
            logits[:, vocab_size:] = -float("inf")                    # never the padding ids
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator)
            idx = torch.cat([idx, nxt.to(idx.device)], 1)
        return idx


# ---- the experiment: FLOPs, health
def layer_flops(cfg: Config, selector: str):
    """Per token, forward, multiply-add = 2 FLOPs: (cell FLOPs, selection FLOPs, params)."""
    d, c, d_m, B = cfg.n_embd, cfg.d_ff, cfg.d_m, cfg.d_m // cfg.g
    if selector == "dense":
        return 4 * d * c, 0, 2 * d * c
    if selector == "avgk":      # 2dB scores (+ d_m*d per step for the key means, amortized away)
        return 4 * d * c, 2 * d * B, 2 * d * d_m
    if selector == "vanillam":  # all d_m scores: 2 d d_m, of which 2 d c are the active cells
        return 4 * d * c, 2 * d * (d_m - c) + d_m, 2 * d * d_m
    if selector in ("switch", "topk", "base"):   # base: + Sinkhorn in training, ~4*iters*B
        return 4 * d * c, 2 * d * B, 2 * d * d_m + d * B
    if selector == "hash":
        return 4 * d * c, 0, 2 * d * d_m
    H, k, dq, n = cfg.pkm_heads, cfg.pkm_knn, cfg.pkm_dq, math.isqrt(d_m)     # pkm
    return (2 * H * k * d, 2 * d * dq * H + 2 * H * n * dq + H * k * k,
            d_m * d + H * d * dq + H * n * dq + 2 * H * dq)


def flop_table(cfg: Config, model: GPT):
    """Rows per FFN layer + whole-model totals (forward FLOPs per token, parameters)."""
    d, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    rows = []
    for i, blk in enumerate(model.h):
        sel = cfg.selector if blk.sparse else "dense"
        cells, over, _ = layer_flops(cfg, sel)
        rows.append(dict(layer=i, ffn=sel, params=sum(p.numel() for p in blk.ffn.parameters()),
                         cells_flops=cells, select_flops=over))
    # non-FFN forward FLOPs per token: QKV+proj 2*4d^2 and attention 4*T*d per layer, lm_head
    other = L * (2 * 4 * d * d + 4 * T * d) + 2 * d * model.vocab_size
    ffn = sum(r["cells_flops"] + r["select_flops"] for r in rows)
    total = dict(params=sum(p.numel() for p in model.parameters()),
                 params_ffn=sum(r["params"] for r in rows), ffn_flops=ffn,
                 select_flops=sum(r["select_flops"] for r in rows), fwd_flops=other + ffn)
    return rows, total


def routing_health(layer):
    """Block ids seen in one val eval: usage entropy / log B, dead fraction, max/mean load,
    overflow at capacity factors 1 and 1.25 (Avg-K has no balancing loss: is it healthy?)."""
    B = layer.B
    per_call = [torch.bincount(s, minlength=B).float() for s in layer.stats]
    counts = torch.stack(per_call).sum(0)
    p = counts / counts.sum()
    ent = -(p[p > 0] * p[p > 0].log()).sum() / math.log(B)
    out = dict(entropy=ent.item(), dead=(counts == 0).float().mean().item(),
               maxload=(counts.max() / counts.mean()).item())
    for cf in (1.0, 1.25):
        over = [(torch.clamp(c - math.ceil(cf * c.sum().item() / B), min=0).sum() / c.sum()).item()
                for c in per_call]
        out[f"overflow{cf:g}"] = float(np.mean(over))
    if getattr(layer, "agree", None):  # BASE: greedy eval choices that training's plan shares
        out["agree"] = torch.stack(layer.agree).mean().item()
    layer.track, layer.stats, layer.agree = False, [], []  # tracking ends with the eval
    return out


# ---- the experiment: compare, plots
def parse_compare(cfg):
    """--compare "dense,switch:2048,avgk:64" -> [(name, Config)] (main() validates each)."""
    runs = []
    for item in [s.strip() for s in cfg.compare.split(",") if s.strip()]:
        sel, _, g = item.partition(":")
        need(sel in SELECTORS and (g == "" or g.isdigit()), f"--compare {item!r}: write sel or "
             f"sel:g, sel one of {', '.join(SELECTORS)}, g an integer")
        g = int(g) if g else (cfg.d_ff if sel in ("switch", "dense") else cfg.g)
        plain = sel in ("dense", "pkm")
        c = dataclasses.replace(cfg, selector=sel, g=g, b=0 if sel != "switch" else 1,
                                compare="", out_dir=os.path.join(
                                    cfg.out_dir, sel if plain else f"{sel}_g{g}"))
        runs.append((sel + ("" if plain else f" g={g}"), c))
    need(runs, "--compare is empty; give e.g. dense,switch:2048,avgk:64")
    return runs


def run_compare(cfg, runs, ds, device):
    """Train each run (same seed, same data order); compare.csv/.md and a plot after each."""
    table, curves = [], []
    master = int(os.environ.get("RANK", 0)) == 0               # under torchrun: rank 0 writes
    for name, c in runs:
        if master:
            print(f"==== {name} ====")
        res = train(c, ds, device)
        f, tps = res["final"], res["final"]["tokens_per_s"]
        table.append(dict(selector=c.selector, g=c.g, b=c.b, params=f["params"],
                          active_fwd_flops_per_token=res["flops"]["fwd_flops"],
                          val_loss=round(f["val_loss"], 4), val_ppl=round(f["val_ppl"], 3),
                          tokens_per_s=round(tps) if tps == tps else None))
        curves.append((name, [r["step"] for r in res["log"]], [r["val_loss"] for r in res["log"]]))
        if master:                                   # after each run: partial results survive
            md = write_table(cfg.out_dir, "compare", table)
            save_plot(os.path.join(cfg.out_dir, "compare_val_loss.png"),
                      "val loss (same seed, same data order)", [("val loss", curves)])
    if master:
        print(md)
    return table


def markdown(rows):
    """A list of dicts as the lines of a markdown table (ints with thousands separators)."""
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + [
        "| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()) + " |"
        for r in rows]


def save_plot(path, title, panels):
    """One figure, one axis per panel; panels = [(axis title, [(label, steps, values), ...])]."""
    fig = Figure(figsize=(1 + 4 * len(panels), 3.5), layout="tight")
    for ax, (name, lines) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, steps, values in lines:
            ax.plot(steps, values, label=label, marker=".")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)


def plot_run(out_dir, rows, title):
    """loss.png, and routing_health.png: usage entropy, dead blocks, max load per sparse layer."""
    steps = [r["step"] for r in rows]
    save_plot(os.path.join(out_dir, "loss.png"), title, [("loss", [
        (split, steps, [r[f"{split}_loss"] for r in rows]) for split in ("train", "val")])])
    layers = sorted({k.split("_")[0] for k in rows[0] if k[0] == "L" and k.endswith("_entropy")})
    if layers:
        save_plot(os.path.join(out_dir, "routing_health.png"), f"routing health: {title}", [
            (name, [(f"layer {L[1:]}", steps, [r.get(f"{L}_{key}", math.nan) for r in rows])
                    for L in layers])
            for key, name in (("entropy", "block-usage entropy / log B"),
                              ("dead", "fraction of blocks never selected"),
                              ("maxload", "max load / mean load"))])


# ---- making it fast
# The grouped path computes exactly (2) for the selected blocks only: sort the N*b (token, block)
# pairs by block, one grouped GEMM per FFN matrix, sum each token's b rows. Dropless, no host sync.
def native_grouped_mm():
    """torch's grouped GEMM (F.grouped_mm in torch>=2.11, torch._grouped_mm in 2.8+), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def native_grouped_ok(device_type: str, dtype: torch.dtype, d: int, g: int, B: int) -> bool:
    """Can torch's grouped GEMM take (M, d) x (B, d, g) and (M, g) x (B, g, d)? Else the loop."""
    if native_grouped_mm() is None or (d * dtype.itemsize) % 16 or (g * dtype.itemsize) % 16:
        return False                # rows must be 16-byte aligned
    if device_type == "cuda":       # bf16 only (SM80+), at most 1023 groups per call (torch 2.11)
        return dtype == torch.bfloat16 and B <= 1023
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False                # torch.compile's grouped_mm accepts bf16 only (torch 2.11)
    return device_type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_loop(a, w, offs):
    """Reference/fallback: out[offs[i-1]:offs[i]] = a[offs[i-1]:offs[i]] @ w[i], where torch's
    grouped GEMM cannot run; `offs.tolist()` is its one host sync (segment sizes are data)."""
    outs, start = [], 0
    for i, end in enumerate(offs.tolist()):
        outs.append(a[start:end] @ w[i])
        start = end
    return torch.cat(outs, 0)


def grouped_mm(a, w, offs):
    """(M, K) x (G, K, N) -> (M, N), rows grouped by cumulative end offsets offs (G,) int32."""
    if native_grouped_ok(a.device.type, a.dtype, a.shape[1], w.shape[-1], w.shape[0]):
        return native_grouped_mm()(a, w, offs=offs)
    return grouped_mm_loop(a, w, offs)


def compute_dtype(x):
    """The autocast dtype if autocast is on (grouped_mm is not autocast-aware), else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def impl_path(layer, device_type, dtype, d):
    """The path SparseFFN.forward takes: "masked", "grouped" or "triton"; --impl as asked (PKM:
    its EmbeddingBag read; VanillaM: grouped, which reuses its pre). auto: where measured fastest
    in training (one H200, gpu preset, README; numbers above TILES): on CUDA triton for
    64 <= g < 256 (bf16, installed), grouped for g >= 64 where torch's grouped GEMM takes the
    shapes, masked elsewhere (on CPU always)."""
    if isinstance(layer, ProductKeyMemory) or layer.impl in ("grouped", "masked"):
        return "masked" if layer.impl == "masked" else "grouped"
    if layer.impl == "triton":
        return "grouped" if layer.selector == "vanillam" else "triton"
    if device_type != "cuda":
        return "masked"
    if auto_triton(layer) and dtype == torch.bfloat16 and triton_ok("cuda", dtype):
        return "triton"
    return "grouped" if layer.g >= 64 and native_grouped_ok("cuda", dtype, d, layer.g,
                                                            layer.B) else "masked"


def auto_triton(layer):  # --impl auto's triton range (impl_path)
    return layer.impl == "auto" and layer.selector != "vanillam" and 64 <= layer.g < 256


def sort_pairs(ids, B):
    """The N*b (token, block) pairs of ids (N, b), sorted by block (stable): blk (N*b,) their
    blocks, order (N*b,) their flat index n*b + j, tok (N*b,) their tokens, and offs (B,) int32,
    offs[e] = number of pairs in blocks 0..e (cumulative end offsets, on device: no host sync)."""
    # the key in the narrowest type that holds 0..B-1: a radix sort makes one pass per key byte,
    # so 1-2 passes, not int64's 8 (the same pairs and order; +1-2% tokens/s at the gpu preset)
    kt = torch.uint8 if B <= 256 else torch.int16 if B <= 32768 else torch.int32
    key, order = ids.reshape(-1).to(kt).sort(stable=True)
    offs = torch.searchsorted(key, torch.arange(B, device=ids.device, dtype=kt), right=True)
    return key.long(), order, order // ids.shape[1], offs.to(torch.int32)


class ExpandPairs(torch.autograd.Function):
    """x (N, d) -> xs = x[tok] (N*b, d): each token's row once per chosen block, in sorted-pair
    order. Backward gathers instead of scatter-adding (no atomics): dx[n] = sum_j dxs[inv[n, j]],
    summed in float32. inv (N, b) = the sorted position of pair (n, j); tok (N*b,) = its token."""

    @staticmethod
    def forward(ctx, x, tok, inv):
        ctx.save_for_backward(inv)
        return x[tok]

    @staticmethod
    def backward(ctx, dxs):
        (inv,) = ctx.saved_tensors
        return dxs[inv].sum(1), None, None


class SumPairs(torch.autograd.Function):
    """ys (N*b, d) in sorted-pair order -> y (N, d), y[n] = sum_j ys[inv[n, j]] (float32 sum).
    The adjoint of ExpandPairs: its backward is the gather dys = dy[tok]."""

    @staticmethod
    def forward(ctx, ys, tok, inv):
        ctx.save_for_backward(tok)
        return ys[inv].sum(1)

    @staticmethod
    def backward(ctx, dy):
        (tok,) = ctx.saved_tensors
        return dy[tok], None, None


def compute_grouped(layer, x, ids, w, pre=None):
    """(2) over the selected blocks only, in compute_dtype(x); the numbers of compute_masked.

    x (N, d), ids (N, b), w (N, b) or None, pre (N, d_m) or None -> y (N, d). The N*b (token,
    block) pairs sorted by block form B contiguous groups (some empty); per group e
    h = f(x_tok K_e^T) (g cells; f(pre) for VanillaM), y_pair = w * h V_e, y[tok] = sum of its
    b pairs. Rows move by gathers only (ExpandPairs, SumPairs): no atomics (README, H200)."""
    if isinstance(layer, ProductKeyMemory):  # read only the H*k chosen value rows per token
        return F.embedding_bag(ids, layer.V, per_sample_weights=w.to(layer.V.dtype),
                               mode="sum").to(x.dtype)
    # BEGIN EXERCISE sffn_grouped: sort pairs by block; grouped_mm K, f, grouped_mm V; *w; sum
    N, b, B, g = x.shape[0], layer.b, layer.B, layer.g
    dt = compute_dtype(x)
    _, order, tok, offs = sort_pairs(ids, B)                         # pairs grouped by block
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * b, device=x.device))
    inv = inv.view(N, b)                                             # sorted position of (n, j)
    V3 = layer.V.view(B, g, -1).to(dt)                               # (B, g, d)
    if pre is not None:  # VanillaM computed the key side for all cells already: reuse it
        h = layer.act(pre.view(N, B, g)).gather(1, ids.unsqueeze(-1).expand(N, b, g))
        h = h.view(N * b, g)[order].to(dt)                           # (N*b, g)
    else:
        xs = ExpandPairs.apply(x.to(dt), tok, inv)                   # (N*b, d) token rows
        K3t = layer.K.view(B, g, -1).to(dt).transpose(-2, -1)        # (B, d, g)
        h = layer.act(grouped_mm(xs, K3t, offs))                     # (N*b, g) f(x . k_i)
    ys = grouped_mm(h, V3, offs)                                     # (N*b, d)
    if w is not None:
        ys = ys * w.reshape(-1)[order].to(ys.dtype).unsqueeze(-1)
    return SumPairs.apply(ys, tok, inv)                              # (N, d)
    # END EXERCISE sffn_grouped


# The fused Triton path (--impl triton; ScatterMoE's idea): compute_grouped's numbers, but no
# (N*b, d) pair tensor in the forward or the backward: token rows are read by index (a gather
# GEMM) and added back by float32 atomic adds (a scatter GEMM; y's last bits vary run to run on
# CUDA). It runs as torch.library custom ops inside torch.compile's graph (as a compiler.disable'd
# Function it broke the graph: 0.50x dense tokens/s at g 64). Training at the gpu preset on one
# H200 (README, "Speed"): g 64 0.61-0.70x dense against grouped's 0.53-0.55x, g 128 0.74x against
# 0.69x, level at g 256, so --impl auto takes it for 64 <= g < 256. Imported on first use.
TILES = dict(BM=64, BN=64, BK=64, BD=128,  # per program: pairs, g columns, reduced, d columns
             warps=4, stages=3)           # warps per program, pipeline depth (triton's defaults)
_KERNELS, tl = {}, None             # the compiled kernels; triton.language (triton_kernels())


def triton_ok(device_type, dtype):
    """Triton installed, and CUDA or its CPU interpreter (TRITON_INTERPRET=1) in float32 (the
    interpreter's bf16 tl.dot is wrong, triton-lang/triton#11584)."""
    interp = os.environ.get("TRITON_INTERPRET") == "1" and dtype == torch.float32
    return (device_type == "cuda" or device_type == "cpu" and interp) and (
        importlib.util.find_spec("triton") is not None)


def triton_kernels():
    """The two kernels below, compiled by triton.jit on first use (not at import: triton is not
    a dependency of this file) and kept; `tl` is triton.language from then on."""
    global tl
    if not _KERNELS:
        import triton
        import triton.language as tl
        _KERNELS.update(pair_mm=triton.jit(_pair_mm), weight_grad=triton.jit(_weight_grad))
    return _KERNELS


# ---- the Triton kernels (plain functions here; triton_kernels() compiles them)
def _pair_mm(a, tok, blk, W, out, M, KD, ND, sk, sn, SCATTER: tl.constexpr,
             PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # sorted pair m, of block e = blk[m] and token tok[m]; W_e (KD, ND) = W[e*KD*ND:], strides
    #   gather:  out[m] = a[tok[m]] W_e        a (N, KD), out (M, ND)    pre = x[tok] K_e^T
    #   scatter: out[tok[m]] += a[m] W_e       a (M, KD), out (N, ND)    y[tok] += h V_e
    # A tile of BM pairs meets blocks blk[m0] .. blk[m0 + BM - 1] (sorted): a pass for each.
    m0 = tl.program_id(0) * BM
    rm, rn = m0 + tl.arange(0, BM), tl.program_id(1) * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < ND
    t = tl.load(tok + rm, mask=mm, other=0).to(tl.int64)
    src = rm.to(tl.int64) if SCATTER else t                 # the rows of a read
    e_row = tl.load(blk + rm, mask=mm, other=-1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for e in range(tl.load(blk + m0), tl.load(blk + tl.minimum(m0 + BM, M) - 1) + 1):
        me = mm & (e_row == e)                              # block e's pairs
        for k0 in range(0, KD, BK):
            rk = k0 + tl.arange(0, BK)
            mk = rk < KD
            x = tl.load(a + src[:, None] * KD + rk[None, :], mask=me[:, None] & mk[None, :],
                        other=0)                            # (BM, BK)
            w = tl.load(W + e * KD * ND + rk[:, None] * sk + rn[None, :] * sn,
                        mask=mk[:, None] & mn[None, :], other=0)   # (BK, BN) of W_e
            acc += tl.dot(x, w, input_precision=PREC)
    if SCATTER:
        tl.atomic_add(out + t[:, None] * ND + rn[None, :], acc,
                      mask=mm[:, None] & mn[None, :], sem="relaxed")
    else:
        tl.store(out + rm.to(tl.int64)[:, None] * ND + rn[None, :],
                 acc.to(out.dtype.element_ty), mask=mm[:, None] & mn[None, :])


def _weight_grad(a, tok, offs, src, out, D, G, PREC: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    # out[e*G + i] = sum over block e's pairs m in [offs[e-1], offs[e]) (read here: no host
    # sync) of a[m, i] src[tok[m]]; a (M, G), src (N, D), out (B*G, D), every row written
    # once (an empty block: zeros). dK_e = dpre_e^T x[tok], dV_e = h_e^T dy[tok].
    e = tl.program_id(0)
    rg, rd = tl.program_id(1) * BN + tl.arange(0, BN), tl.program_id(2) * BK + tl.arange(0, BK)
    mg, md = rg < G, rd < D
    lo = tl.where(e > 0, tl.load(offs + tl.maximum(e - 1, 0)), 0)
    hi = tl.load(offs + e)
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
    tl.store(out + (e * G + rg).to(tl.int64)[:, None] * D + rd[None, :],
             acc.to(out.dtype.element_ty), mask=mg[:, None] & md[None, :])


def _tile(key, n):  # TILES[key], at least 16 (tl.dot's minimum), at most n's next power of 2
    return min(TILES[key], max(16, 1 << (n - 1).bit_length()))


def pair_mm(a, tok, blk, W, g, n_tok=None):
    """Gather (n_tok None): (N*b, g) in a's dtype, row m = a[tok[m]] W_e^T, W = K or V (B*g, d).
    Scatter: (n_tok, d) float32, row n = sum over token n's pairs m of a[m] W_e, a (N*b, g)."""
    M, KD, ND = tok.numel(), a.shape[1], g if n_tok is None else W.shape[1]
    out = a.new_empty(M, g) if n_tok is None else a.new_zeros(n_tok, ND, dtype=torch.float32)
    BM, BN, BK = TILES["BM"], _tile("BN" if n_tok is None else "BD", ND), _tile("BK", KD)
    sk, sn = (1, KD) if n_tok is None else (ND, 1)       # W_e read as (KD, ND): W_e^T or W_e
    triton_kernels()["pair_mm"][(-(-M // BM), -(-ND // BN))](
        a.contiguous(), tok, blk, W.to(a.dtype), out, M, KD, ND, sk, sn, n_tok is not None,
        "ieee" if a.dtype == torch.float32 else None, BM, BN, BK,   # (float32: no tf32)
        num_warps=TILES["warps"], num_stages=TILES["stages"])
    return out


def weight_grad(a, src, tok, offs, g, dtype):
    """(B*g, d) in dtype: block e's rows = a_e^T src[tok_e], a (N*b, g) in sorted-pair order."""
    B, D = offs.numel(), src.shape[1]
    out = torch.empty(B * g, D, device=src.device, dtype=dtype)
    BN, BK = _tile("BN", g), _tile("BD", D)
    triton_kernels()["weight_grad"][(B, -(-g // BN), -(-D // BK))](
        a.contiguous(), tok, offs, src.contiguous(), out, D, g,
        "ieee" if a.dtype == torch.float32 else None, TILES["BM"], BN, BK,
        num_warps=TILES["warps"], num_stages=TILES["stages"])
    return out


_OPS = {}  # nano_sffn::pair_mm and ::weight_grad, the torch.library custom ops (custom_ops())


def custom_ops():
    """pair_mm, weight_grad as custom ops, opaque to torch.compile (no graph break); registered
    on first use, by SparseFFN(impl triton) before tracing. n_tok: int? (None: gather).
    Gradients, in a (compute dtype) and W (its own dtype): gather and scatter are adjoints:
    gather  out = a[tok] W_e^T    (N*b, g):  da = scatter(dout, W), dW_e = dout_e^T a[tok_e]
    scatter out[tok] += a W_e     (N, d):    da = gather(dout, W),  dW_e = a_e^T dout[tok_e]"""
    lib, ops = torch.library, torch.ops.nano_sffn
    if not _OPS and not hasattr(ops, "pair_mm"):  # once, also if this file is __main__ and imported
        @lib.custom_op("nano_sffn::pair_mm", mutates_args=(), schema="(Tensor a, Tensor W, "
                       "Tensor tok, Tensor blk, Tensor offs, int g, int? n_tok) -> Tensor")
        def op_mm(a, W, tok, blk, offs, g, n_tok):
            return pair_mm(a, tok, blk, W, g, n_tok)

        @lib.custom_op("nano_sffn::weight_grad", mutates_args=(), schema="(Tensor a, Tensor src, "
                       "Tensor tok, Tensor offs, int g, ScalarType dtype) -> Tensor")
        def op_wg(a, src, tok, offs, g, dtype):
            return weight_grad(a, src, tok, offs, g, dtype)

        @op_mm.register_fake
        def _(a, W, tok, blk, offs, g, n_tok):   # gather (M, g) in a's dtype; scatter float32
            return a.new_empty(tok.shape[0], g) if n_tok is None else a.new_empty(
                n_tok, W.shape[1], dtype=torch.float32)
        op_wg.register_fake(lambda a, src, tok, offs, g, dtype: src.new_empty(
            offs.shape[0] * g, src.shape[1], dtype=dtype))
        op_mm.register_autograd(_pair_mm_backward, setup_context=_pair_mm_setup)
    if not _OPS:
        _OPS.update(pair_mm=ops.pair_mm.default, weight_grad=ops.weight_grad.default)
    return _OPS


def _pair_mm_setup(ctx, inputs, output):
    a, W, tok, blk, offs, ctx.g, ctx.n_tok = inputs
    ctx.save_for_backward(a, W, tok, blk, offs)


def _pair_mm_backward(ctx, dout):
    (a, W, tok, blk, offs), g = ctx.saved_tensors, ctx.g
    mm, wg, dout = _OPS["pair_mm"], _OPS["weight_grad"], dout.to(a.dtype)
    if ctx.n_tok is None:
        da = mm(dout, W, tok, blk, offs, g, a.shape[0]).to(a.dtype)
        dW = wg(dout, a, tok, offs, g, W.dtype)
    else:
        da, dW = mm(dout, W, tok, blk, offs, g, None), wg(a, dout, tok, offs, g, W.dtype)
    return da, dW, None, None, None, None, None


def compute_triton(layer, x, ids, w, pre=None):
    """compute_grouped with the pair rows never written (custom_ops(), inside torch.compile's
    graph); VanillaM (pre given) and PKM take compute_grouped. Tested against compute_masked."""
    if pre is not None or isinstance(layer, ProductKeyMemory):
        return compute_grouped(layer, x, ids, w, pre)
    dt, g, mm = compute_dtype(x), layer.g, custom_ops()["pair_mm"]
    blk, order, tok, offs = sort_pairs(ids, layer.B)                 # pairs grouped by block
    h = layer.act(mm(x.to(dt), layer.K, tok, blk, offs, g, None))    # (N*b, g) f(x[tok] K_e^T)
    if w is not None:
        h = h * w.reshape(-1)[order].to(h.dtype).unsqueeze(-1)       # w of each pair
    return mm(h, layer.V, tok, blk, offs, g, x.shape[0]).to(dt)      # (N, d) y[tok] += w h V_e


def run_bench(cfg, device):
    """--bench g1,g2,..: one layer's fwd+bwd time, dense FFN of width c vs Avg-K on each path;
    eager, or with --compile each (layer, path) compiled afresh (training compiles the model)."""
    d, T, dt = cfg.n_embd, cfg.bench_tokens, torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(cfg.seed)

    def run(m):  # the module as timed: compiled anew for each path (the warm-up calls compile)
        torch._dynamo.reset()
        return torch.compile(m) if cfg.compile else m
    x = torch.randn(T, d, device=device, dtype=dt, requires_grad=True)
    gy = torch.randn(T, d, device=device, dtype=dt)

    def ms(fn, warm=5):  # mean milliseconds of one call, after `warm` untimed calls
        for i in range(warm + cfg.bench_iters):
            if i == warm:
                sync(device)
                t = time.perf_counter()
            fn()
        sync(device)
        return round(1000 * (time.perf_counter() - t) / cfg.bench_iters, 3)

    dense = DenseFFN(d, cfg.d_ff, cfg.activation, cfg.n_layer).to(device, dt)
    fn = run(dense)
    rows = [dict(g="dense", b="-", B="-", select_ms=None,
                 masked_ms=ms(lambda: fn(x)[0].backward(gy)), grouped_ms=None, triton_ms=None)]
    for g in [int(s) for s in cfg.bench.split(",") if s.strip()]:
        layer = SparseFFN(dataclasses.replace(cfg, selector="avgk", g=g, b=cfg.d_ff // g), 1)
        layer = layer.to(device, dt)             # g was checked by validate(): it divides c, d_m
        row = dict(g=g, b=layer.b, B=layer.B, select_ms=ms(lambda: layer.route(x.detach())[0]))
        for impl in ("masked", "grouped", "triton"):   # each where it runs (triton: on CUDA)
            layer.impl = impl
            ok = dict(masked=True, triton=device == "cuda" and triton_ok(device, dt),
                      grouped=device == "cpu" or native_grouped_ok(device, dt, d, g, layer.B))
            if impl == "triton" and ok[impl]:
                custom_ops()                     # registered before torch.compile traces
            fn = run(layer) if ok[impl] else None
            row[f"{impl}_ms"] = ms(lambda: fn(x)[0].backward(gy)) if ok[impl] else None
        rows.append(row)
    return write_bench(cfg, device, dt, rows)


def write_bench(cfg, device, dt, rows):
    """bench.md (the table, also printed) and bench.csv, long: one row per (g, path)."""
    md = "\n".join([f"layer fwd+bwd, {device_name(device)}, {dt}, T={cfg.bench_tokens} "
                    f"d={cfg.n_embd} d_m={cfg.d_m} c={cfg.d_ff}, Avg-K selection, torch "
                    f"{torch.__version__}, {'compiled' if cfg.compile else 'eager'}, mean of "
                    f"{cfg.bench_iters} iterations (ms)", ""]
                   + markdown(rows))
    Path(cfg.out_dir, "bench.md").write_text(md + "\n")
    info = dict(device=device_name(device), torch=torch.__version__, commit=git_commit())
    write_csv(os.path.join(cfg.out_dir, "bench.csv"), [   # (as assets/sffn_bench.csv's rows)
        dict(g=None, b=None, B=None, path="dense", ms=rows[0]["masked_ms"], **info)] + [
        dict(g=r["g"], b=r["b"], B=r["B"], path=p, ms=r[f"{p}_ms"], **info)
        for r in rows[1:] for p in ("masked", "grouped", "triton") if r[f"{p}_ms"] is not None])
    print(md)
    return rows


# ---- command line
class BadInput(Exception):
    """A user error: one line on stderr, exit status 2, nothing written."""


class Diverged(Exception):
    """Training or a loaded model went non-finite: one line, exit status 3, checkpoint kept."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # unknown flags and bad choices are one line too
        raise BadInput(message)


def need(ok, msg):
    if not ok:
        raise BadInput(msg)


def build_parser():
    """One flag per Config field (--x / --no-x for booleans); flags not given stay unset."""
    p = OneLineParser(prog=SCRIPT + ".py", argument_default=argparse.SUPPRESS, description=TITLE)
    for f in dataclasses.fields(Config):
        kw = dict(help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"))
        if f.default is None or isinstance(f.default, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), choices=f.metadata["choices"], **kw)
    return p


def parse_config(argv=None) -> Config:
    """Config = defaults, then the preset, then the flags given; cfg.explicit = their names."""
    given = vars(build_parser().parse_args(argv))
    preset = given.get("preset", "auto")
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() else "cpu"
    cfg = Config(**{**PRESETS[preset], **given})
    cfg.preset, cfg.explicit = preset, set(given)
    return cfg


def resolve_device(cfg):
    name, mps = cfg.device, torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    need((name != "cuda" or torch.cuda.is_available()) and (name != "mps" or mps),
         f"--device {name} is not available here; use --device cpu or auto")
    return name


RULES = (  # (flags, what each must be, the test)
    (("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_interval",
      "eval_iters", "sffn_every", "bench_tokens", "bench_iters", "pkm_heads", "pkm_knn",
      "pkm_dq"), "an integer >= 1", lambda v: v >= 1),
    (("max_iters", "warmup_iters", "stop_at", "d_ff", "d_m", "g", "b", "base_iters",
      "sample_tokens", "weight_decay", "grad_clip", "aux_alpha", "capacity_factor"),
     "a finite number >= 0", lambda v: 0 <= v < math.inf),
    (("lr", "key_init_std", "balance_rate"), "a finite number > 0", lambda v: 0 < v < math.inf),
    (("beta1", "beta2"), "in [0, 1)", lambda v: 0 <= v < 1),
    (("seed", "hash_seed"), "in [0, 2**32)", lambda v: 0 <= v < 2 ** 32),
)


def validate(cfg: Config, device: str = "cpu") -> Config:
    """Reject bad settings (BadInput) and fill the derived sizes d_ff, d_m, g, b. Writes nothing."""
    for names, want, ok in RULES:
        for n in names:
            need(ok(getattr(cfg, n)), f"--{n} must be {want} (got {getattr(cfg, n)})")
    need(0 <= cfg.min_lr <= cfg.lr, f"--min_lr must be in [0, lr={cfg.lr}] (got {cfg.min_lr})")
    need(cfg.n_embd % cfg.n_head == 0, f"--n_head {cfg.n_head} must divide --n_embd {cfg.n_embd}")
    need(cfg.avgk_balance == "none" or cfg.selector == "avgk" or cfg.compare,
         "--avgk_balance bias balances Avg-K: use it with --selector avgk")
    need(cfg.dtype != "float16" or device in ("cuda", "mps"),
         "float16 needs CUDA or MPS; use float32 or bfloat16")
    need(cfg.impl != "triton" or triton_ok(device, getattr(torch, cfg.dtype.replace(
        "auto", "float32"))),            # (auto: float32 on CPU; any dtype passes on CUDA)
         "--impl triton needs triton, and CUDA or (CPU) TRITON_INTERPRET=1 with float32; "
         "use --impl grouped")
    cfg.d_ff = cfg.d_ff or 4 * cfg.n_embd
    cfg.d_m = cfg.d_m or 8 * cfg.d_ff
    for s in cfg.bench.split(",") if cfg.bench else []:
        need(s.strip().isdigit() and int(s) > 0 and cfg.d_m % int(s) == cfg.d_ff % int(s) == 0,
             f"--bench {s.strip()!r}: give block sizes g dividing d_m and d_ff, e.g. 256,64")
    if cfg.selector == "dense":
        cfg.g, cfg.b = cfg.d_ff, 1
    elif cfg.selector == "pkm":
        n = math.isqrt(cfg.d_m)
        need(n * n == cfg.d_m and cfg.pkm_dq % 2 == 0 and cfg.pkm_knn <= n,
             f"--selector pkm needs --d_m a perfect square, --pkm_dq even and --pkm_knn <= "
             f"sqrt(d_m) (got {cfg.d_m}, {cfg.pkm_dq}, {cfg.pkm_knn})")
        cfg.g, cfg.b = 1, cfg.pkm_heads * cfg.pkm_knn
    else:  # the blocks tile the memory: B = d_m/g, c = b*g
        cfg.g = cfg.g or cfg.d_ff
        need(cfg.d_m % cfg.g == 0 and (cfg.b or cfg.d_ff % cfg.g == 0),
             f"--g {cfg.g} must divide --d_m {cfg.d_m} and --d_ff {cfg.d_ff} (or set --b)")
        cfg.b, B = cfg.b or cfg.d_ff // cfg.g, cfg.d_m // cfg.g
        need(cfg.b <= B, f"--b {cfg.b} exceeds the B = d_m/g = {B} blocks")
        need(cfg.selector != "switch" or cfg.b == 1,
             f"switch routes to one block, got b={cfg.b}; set --g {cfg.d_ff} or use topk")
        need(cfg.impl != "grouped" or device != "cuda" or native_grouped_mm() is None
             or native_grouped_ok("cuda", torch.bfloat16, cfg.n_embd, cfg.g, B),
             "--impl grouped on CUDA needs n_embd and g multiples of 8, d_m/g <= 1023")
    parent = os.path.abspath(cfg.out_dir)   # out_dir: a file, under a file, not writable?
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    need(os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK),
         f"--out_dir {cfg.out_dir}: {parent} is not a writable directory")
    return cfg


# ---- training
def get_lr(it, cfg):
    """Linear warm-up, then cosine decay to min_lr."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.max_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg, device_type):
    """AdamW; weight decay only on matrices and embeddings, not on gains, norms, biases (< 2-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    extra = dict(fused=True) if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


@torch.no_grad()
def evaluate(raw, ds, cfg, run):
    """Mean CE on fixed train/val batches (the same at every eval) + routing health on val."""
    raw.eval()
    out = {}
    egen = torch.Generator().manual_seed(cfg.seed + 10_000 + run.rank)
    for split in ("train", "val"):
        for _, layer in raw.sparse_layers():
            layer.track = split == "val"
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = ds.get_batch(split, cfg.batch_size, cfg.block_size, device=run.dev,
                                generator=egen, rank=run.rank, world_size=run.world)
            with run.autocast:
                losses.append(raw(x, y)[1].float())
        loss = torch.stack(losses).mean()
        if run.ddp:
            torch.distributed.all_reduce(loss)
        out[split] = loss.item() / run.world
    raw.train()
    return out, {f"L{i}_{k}": v for i, layer in raw.sparse_layers()
                 for k, v in routing_health(layer).items()}


def setup_run(cfg, device):
    """DDP (torchrun), device, dtype, autocast, compile: what a run is made of."""
    ddp, rank, world = int(os.environ.get("RANK", -1)) != -1, 0, 1
    local = int(os.environ.get("LOCAL_RANK", 0))
    if ddp:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device == "cuda":
            torch.cuda.set_device(local)
    auto = "bfloat16" if device == "cuda" else "float32"
    dtype = getattr(torch, auto if cfg.dtype == "auto" else cfg.dtype)
    use_compile = cfg.compile if cfg.compile is not None else device == "cuda"
    if use_compile and device == "mps":
        print("note: torch.compile is not available on MPS; running eagerly")
        use_compile = False
    return SimpleNamespace(
        ddp=ddp, rank=rank, world=world, master=rank == 0, device=device, dtype=dtype,
        dev=torch.device(device, local if device == "cuda" else None),
        autocast=torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32),
        compile=use_compile, tokens=cfg.batch_size * cfg.block_size * cfg.grad_accum * world)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def init_state(cfg, ds, run, ck=None):
    """The model and what a checkpoint restores: optimizer, scaler, step, log, data order."""
    torch.manual_seed(cfg.seed)
    raw = GPT(cfg, ((ds.vocab_size + 63) // 64) * 64).to(run.dev)    # vocab padded to 64
    st = SimpleNamespace(raw=raw, opt=make_optimizer(raw, cfg, run.device), step=0, log=[],
                         elapsed=0.0, path=os.path.join(cfg.out_dir, "ckpt.pt"),
                         kept="no checkpoint yet", scaler=torch.amp.GradScaler(
                             enabled=run.dtype == torch.half and run.device == "cuda"),
                         gen=torch.Generator().manual_seed(cfg.seed + run.rank))  # data order
    if ck is not None:
        restore(ck, st, run.device)
    return st


def train(cfg: Config, ds, device, ck=None):
    """Train one model (nanoGPT's loop); returns the results dict (also written to out_dir)."""
    run = setup_run(cfg, device)
    st = init_state(cfg, ds, run, ck)
    raw = st.raw
    rows, total = flop_table(cfg, raw)
    if run.master:
        write_run_info(cfg, ds, run, rows, total, raw.vocab_size)
    model = torch.compile(raw) if run.compile else raw
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[run.dev.index] if device == "cuda" else None,
                    broadcast_buffers=cfg.avgk_balance == "none")  # bias: all-reduced load
    first, t0 = st.step, time.time()
    st.mark, st.tps = (t0, first), float("nan")  # start of the timed interval: (time, step)
    bad = torch.zeros(2, dtype=torch.bool, device=run.dev)   # [loss, grad norm] non-finite
    pbar = tqdm(total=cfg.max_iters, initial=first, dynamic_ncols=True, desc=cfg.selector,
                disable=not (run.master and cfg.progress))
    try:
        while True:
            stop = st.step >= cfg.max_iters or 0 < cfg.stop_at <= st.step
            if (st.step % cfg.eval_interval == 0 or stop) and not (cfg.resume and st.step == first):
                check_finite(bad, st)                                 # never save bad weights
                log_eval(cfg, ds, run, st, total, time.time() - t0)
                st.mark = (time.time(), st.step)
            if stop:
                break
            ce = train_step(model, ds, cfg, run, st, bad)
            if device != "cuda" or st.step % 10 == 0:  # CPU: every step; CUDA: with the loss sync
                check_finite(bad, st)
                pbar.set_postfix(loss=f"{ce.item():.3f}")
            if st.step - first == 3:                   # compile and warm-up done: restart the clock
                sync(device)
                st.mark = (time.time(), st.step)
            pbar.update(1)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted at step {st.step}; {st.kept}") from None
    st.elapsed += time.time() - t0
    pbar.close()
    return finish_run(cfg, ds, run, st, total, rows)


def train_step(model, ds, cfg, run, st, bad):
    """One optimizer step (grad_accum micro-steps); flags a non-finite loss / grad norm in bad."""
    for group in st.opt.param_groups:
        group["lr"] = get_lr(st.step, cfg)
    for micro in range(cfg.grad_accum):
        x, y = ds.get_batch("train", cfg.batch_size, cfg.block_size, device=run.dev,
                            generator=st.gen, rank=run.rank, world_size=run.world)
        if run.ddp:
            model.require_backward_grad_sync = micro == cfg.grad_accum - 1
        with run.autocast:
            _, ce, aux = model(x, y)
            loss = (ce + aux) / cfg.grad_accum
        bad[0] |= ~torch.isfinite(loss.detach())
        st.scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        st.scaler.unscale_(st.opt)
        norm = torch.nn.utils.clip_grad_norm_(st.raw.parameters(), cfg.grad_clip)
        if not st.scaler.is_enabled():    # float16's scaler skips steps with inf grads by design
            bad[1] |= ~torch.isfinite(norm)
    st.scaler.step(st.opt)
    st.scaler.update()
    st.opt.zero_grad(set_to_none=True)
    for layer in st.raw.modules():  # --avgk_balance bias: nudge the selection biases
        if hasattr(layer, "sel_bias"):
            if run.ddp:
                torch.distributed.all_reduce(layer.load)
            layer.balance_step()
    st.step += 1
    return ce


def check_finite(bad, st):
    if bool(bad.any()):
        what = "loss" if bool(bad[0]) else "grad norm"
        raise Diverged(f"step {st.step}: {what} is not finite; {st.kept}")


PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12,
             "V100": 125e12}   # dense bf16 FLOP/s, for MFU; first match of the device name wins


def device_name(device):
    return torch.cuda.get_device_name(device) if str(device).startswith("cuda") else str(device)


def log_eval(cfg, ds, run, st, total, elapsed):
    """Tokens/s since st.mark; evaluate, append a row to log.csv, print it, checkpoint (not at
    step 0: nanoGPT's rule)."""
    sync(run.device)
    tps = st.tps = ((st.step - st.mark[1]) * run.tokens / (time.time() - st.mark[0])
                    if st.step > st.mark[1] else st.tps)   # (else: the last interval's)
    losses, health = evaluate(st.raw, ds, cfg, run)
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name(run.device)), None)
    st.log.append(dict(step=st.step, tokens=st.step * run.tokens,
                       elapsed_s=round(st.elapsed + elapsed, 3), lr=get_lr(st.step, cfg),
                       train_loss=losses["train"], val_loss=losses["val"], tokens_per_s=tps,
                       mfu=tps * 3 * total["fwd_flops"] / peak if peak and tps == tps else None,
                       **health))
    if not run.master:
        return
    write_csv(os.path.join(cfg.out_dir, "log.csv"), st.log)
    msg = f"step {st.step}: train {losses['train']:.4f} val {losses['val']:.4f} tok/s {tps:,.0f}"
    ents, deads = ([v for k, v in health.items() if k.endswith(s)] for s in ("_entropy", "_dead"))
    if ents:
        msg += f" | usage entropy {np.mean(ents):.3f} dead {np.mean(deads):.3f}"
    tqdm.write(msg)
    if st.step > 0:
        save_checkpoint(st, cfg, run.device, st.elapsed + elapsed)


def finish_run(cfg, ds, run, st, total, rows):
    """results.json, the plots and a sample."""
    f = st.log[-1]
    impl = {i: impl_path(layer, run.device, run.dtype, cfg.n_embd)
            for i, layer in st.raw.sparse_layers()}
    results = dict(script=SCRIPT + ".py", config=dataclasses.asdict(cfg), final=dict(
        train_loss=f["train_loss"], val_loss=f["val_loss"], val_ppl=math.exp(f["val_loss"]),
        tokens_per_s=f["tokens_per_s"], params=total["params"], elapsed_s=st.elapsed),
        flops=dict(total, per_ffn_layer=rows), impl=impl,     # forward FLOPs per token
        routing_health={k: v for k, v in f.items() if k[0] == "L"})
    if run.master:
        write_json(os.path.join(cfg.out_dir, "results.json"), results)
        plot_run(cfg.out_dir, st.log, cfg.selector)
        if cfg.sample_tokens > 0:
            st.raw.eval()
            start = torch.tensor([ds.encode("\n")], dtype=torch.long, device=run.dev)
            with run.autocast:
                out = st.raw.generate(start, cfg.sample_tokens, ds.vocab_size,
                                      torch.Generator().manual_seed(cfg.seed))
            print(f"---- sample ----\n{ds.decode(out[0].tolist())}\n----------------")
    return dict(results, log=st.log)


# ---- checkpoints and files
def save_checkpoint(st, cfg, device, elapsed):
    """Model, optimizer, config, step, log, RNG states: to ckpt.pt.tmp, then renamed (atomic)."""
    ck = dict(script=SCRIPT, model=st.raw.state_dict(), optimizer=st.opt.state_dict(),
              scaler=st.scaler.state_dict(), config=dataclasses.asdict(cfg), step=st.step,
              log_rows=st.log, elapsed_s=elapsed,
              rng=dict(data=st.gen.get_state(), torch=torch.get_rng_state(),
                       cuda=torch.cuda.get_rng_state() if device == "cuda" else None))
    write_file(st.path, lambda f: torch.save(ck, f), "wb")
    st.kept = f"kept {st.path} (step {st.step})"


ARCH = ("selector", "n_layer", "n_head", "n_embd", "block_size", "d_ff", "d_m", "g", "b",
        "sffn_every", "activation", "pkm_heads", "pkm_knn", "pkm_dq", "hash_seed", "dataset",
        "tokenizer")
OWN = ("out_dir", "resume", "stop_at", "progress", "device", "compile", "preset", "compare",
       "bench", "bench_tokens", "bench_iters", "sample_tokens", "data_dir")   # never from a ckpt


def load_checkpoint(path, cfg):
    """Read and check a checkpoint; settings not given on the command line come from it."""
    need(os.path.isfile(path), f"--resume: no checkpoint at {path}; run without --resume first")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if not (isinstance(ck, dict) and {"script", "model", "optimizer", "step", "config"}
                <= set(ck) and isinstance(ck["config"], dict)):
            raise ValueError("not a training checkpoint of these scripts")
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInput(f"cannot read checkpoint {path}: {msg}; delete it or run without --resume")
    need(ck["script"] == SCRIPT, f"{path} was written by {ck['script']}.py, not {SCRIPT}.py")
    for k in ARCH:
        need(k not in cfg.explicit or ck["config"].get(k) == getattr(cfg, k),
             f"checkpoint has {k}={ck['config'].get(k)} but --{k} {getattr(cfg, k)} was given")
    for k, v in ck["config"].items():
        if k not in cfg.explicit and k not in OWN and hasattr(cfg, k):
            setattr(cfg, k, v)
    return ck


def restore(ck, st, device):
    try:
        st.raw.load_state_dict(ck["model"])
        st.opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # (the last line names a tensor)
        raise BadInput(f"checkpoint {st.path} does not fit this model: "
                       f"{str(e).strip().splitlines()[-1].strip()}") from None
    st.scaler.load_state_dict(ck.get("scaler", {}))  # (none in older checkpoints)
    st.step, st.log, st.elapsed = ck["step"], ck["log_rows"], ck["elapsed_s"]
    st.kept = f"kept {st.path} (step {st.step})"
    st.gen.set_state(ck["rng"]["data"])
    torch.set_rng_state(ck["rng"]["torch"])
    if device == "cuda" and ck["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ck["rng"]["cuda"])


def git_commit():
    """HEAD, with "-dirty" if tracked files differ from it; $NANO_GIT_COMMIT wins (for copies of
    the tree whose .git is missing or stale, as on a remote GPU machine)."""
    if os.environ.get("NANO_GIT_COMMIT"):
        return os.environ["NANO_GIT_COMMIT"]
    cmd = ["git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"]  # no tags
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, cwd=os.path.dirname(
            os.path.abspath(__file__))).stdout.strip() or None
    except Exception:
        return None


def write_file(path, write, mode="w"):
    """write(f) into path.tmp, then rename it: never a half-written file."""
    with open(path + ".tmp", mode, newline=None if "b" in mode else "") as f:
        write(f)
    os.replace(path + ".tmp", path)


def write_json(path, obj):  # atomically; numpy and torch values as numbers and lists
    write_file(path, lambda f: json.dump(
        obj, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def write_csv(path, rows):
    def write(f):  # (log.csv is rewritten at every eval)
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    write_file(path, write)


def write_table(out_dir, name, rows, head=""):
    """name.csv and name.md (a markdown table under an optional head line); returns the md."""
    write_csv(os.path.join(out_dir, f"{name}.csv"), rows)
    md = "\n".join(([head, ""] if head else []) + markdown(rows))
    Path(out_dir, f"{name}.md").write_text(md + "\n")
    return md


def write_run_info(cfg, ds, run, rows, total, vocab):
    """flops.txt (the paper's cost side, also printed) and config.json."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    text = "\n".join([
        f"FLOPs/params per FFN layer (forward, per token): selector={cfg.selector} "
        f"d={cfg.n_embd} c={cfg.d_ff} d_m={cfg.d_m} g={cfg.g} b={cfg.b} B={cfg.d_m // cfg.g}",
        f"model: params {total['params']:,} (FFN {total['params_ffn']:,}); forward FLOPs/token "
        f"{total['fwd_flops']:,} (FFN {total['ffn_flops']:,}, selection "
        f"{total['select_flops']:,} = {100 * total['select_flops'] / total['fwd_flops']:.2f}%)",
        ""] + markdown(rows))
    print(text)
    Path(cfg.out_dir, "flops.txt").write_text(text + "\n")
    write_json(os.path.join(cfg.out_dir, "config.json"), dict(
        config=dataclasses.asdict(cfg), torch=torch.__version__, device=run.device,
        device_name=device_name(run.device), git_commit=git_commit(), dataset=ds.name,
        tokenizer=ds.tokenizer, vocab_size=ds.vocab_size, vocab_padded=vocab))


def main(argv=None):
    created = None  # the out_dir this run created: removed again if it fails on bad input
    try:
        cfg = parse_config(argv)
        device = resolve_device(cfg)
        runs = parse_compare(cfg) if cfg.compare else []     # before validate() fills g, b
        for c in [cfg] + [c for _, c in runs]:
            validate(c, device)
        need(not (cfg.compare and cfg.bench or cfg.resume and (cfg.compare or cfg.bench)),
             "--compare, --bench and --resume are separate modes; give one of them")
        ck = None
        if cfg.resume:
            ck = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), cfg)
            validate(cfg, device)
        if not cfg.bench:
            try:
                ds = data.load_dataset(name=cfg.dataset, tokenizer=cfg.tokenizer,
                                       data_dir=cfg.data_dir or None)
                ds.check_block_size(cfg.block_size)
            except data.DataError as e:  # only here: later ones must not remove a run's files
                raise BadInput(str(e)) from None
        created = None if os.path.exists(cfg.out_dir) else cfg.out_dir
        os.makedirs(cfg.out_dir, exist_ok=True)
        try:
            if cfg.bench:
                return run_bench(cfg, device)
            for n in ds.notes if int(os.environ.get("RANK", 0)) == 0 else []:
                print(n)
            return run_compare(cfg, runs, ds, device) if cfg.compare else train(cfg, ds, device, ck)
        except RuntimeError as e:  # (torch.cuda.OutOfMemoryError is one)
            if not isinstance(e, torch.cuda.OutOfMemoryError) and "allocate memory" not in str(e):
                raise
            raise BadInput(f"out of memory at batch_size {cfg.batch_size}, block_size "
                           f"{cfg.block_size}, n_embd {cfg.n_embd}, n_layer {cfg.n_layer}; "
                           "lower them (or raise --grad_accum)") from None
    except (BadInput, Diverged, KeyboardInterrupt) as e:  # one line; exit 2, 3 or 130
        code, what = {BadInput: (2, "error: "), Diverged: (3, "diverged: ")}.get(type(e), (130, ""))
        if code == 2 and created and not any("ckpt.pt" in f for _, _, f in os.walk(created)):
            shutil.rmtree(created, ignore_errors=True)  # (a run with a checkpoint is kept)
        print(f"{SCRIPT}.py: {what}{str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(code)
    finally:  # torchrun: one process group for all --compare runs (re-creating it can hang)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
