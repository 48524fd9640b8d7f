"""
nano_simple_block.py -- "Simplifying Transformer Blocks", in one file.

    Bobby He & Thomas Hofmann, ICLR 2024, arXiv:2311.01906
    official code: https://github.com/bobby-he/simplified_transformers

A Pre-LN block has five pieces besides attention and the MLP: two skips, two norms, and the value
and projection matrices W^V, W^P. The paper removes them one at a time, repairing each removal with
a signal-propagation argument, until the block has no skips, no W^V, W^P and (optionally) no norms,
yet trains as fast per step as Pre-LN with 13-16% fewer parameters.

1. Pre-LN (Eq. 1):  x_hat = x + MHA(Norm(x)),  out = x_hat + MLP(Norm(x_hat)),
   MHA = Concat_h(A_h X W^V_h) W^P with A = softmax(Q K^T / sqrt(d_h) + M)       (Eqs. 2-3)
2. Remove the attention skip (Sec. 4.1): deep skipless attention collapses the tokens onto one
   vector, unless the attention matrix starts as the identity:
       V-SkipInit:   A <- alpha I + beta A                   (Eq. 4, beta = 0 at init)
       shaped:       A <- alpha_h I + beta_h A - gamma_h C     (Eq. 5, C = softmax(M))
   C is the causal uniform matrix (row i averages tokens 1..i); W^Q = 0 at init makes A = C, and
   alpha = beta = gamma = 1 then gives the identity.
3. Values and projections as the identity (Sec. 4.2): with W = alpha I + beta dW (Eq. 6) training
   drives beta/alpha to ~0, so W^V = W^P = I, except the first block's W_1^V = alpha_V I +
   beta_V dW. This is SAS (App. B, Eqs. 12-13):
       x_hat = beta_SA MHA~(Norm_1(x)),  out = alpha_FF x_hat + beta_FF MLP(Norm_2(x_hat))
4. Remove the MLP skip (Sec. 4.3): it hurts sequentially, not in parallel. SAS-P:
       out = beta_SA MHA~(Norm(x)) + beta_FF MLP(Norm(x))          (Eq. 7 with alpha_comb = 0)
5. Remove the norms (Sec. 4.4): trains, slightly worse per step; like the official code we keep
   a norm in front of block 1 and the final norm.
beta_SA = 1, beta_FF = 0.1 (O(1/sqrt(L)) at L = 18), alpha_FF = 1 and the per-head alpha_h,
beta_h, gamma_h are trainable, without weight decay.

    Pre-LN (Eq. 1)            SAS (Eqs. 12-13)              SAS-P (Eq. 7, no skips)
      x                         x                             x
      |------------.            |                             |
      |         RMSNorm       RMSNorm                       RMSNorm
      |     MHA: W^Q W^K        | shaped attention     .------+------.
      |     W^V softmax W^P     | W^Q W^K only     shaped attn      MLP
      + <----------'            | x beta_SA            | x beta_SA   | x beta_FF
      |------------.          x_hat                    '---->(+)<----'
      |         RMSNorm         |------------.                  |
      |           MLP           | x alpha_FF  MLP x beta_FF     out
      + <----------'            + <----------'
     out                       out

--block: preln, parallel, vskip (Value-SkipInit as the paper ran it: shaped attention, orthogonal
W^V, W^P), sas, sasp, sasp_nonorm, on Python code as the paper's CodeParrot (pycode: the standard
library; pycode_all adds installed packages). Ablations: --no-mlp_skip, --attn_matrix vskip,
--gains layer, --beta_ff, --no-trainable_gains, --no-first_value. Training uses the fast forms;
--no-fused --attn_impl explicit runs the plain equations (equal in float64). One H200 (bf16,
compiled, 18 x 768) runs SAS-P at 1.06x the tokens/s of Pre-LN (paper: 1.16x, BERT, RTX 2080Ti);
per step, at tuned LRs, SAS and SAS-P end 0.05 and 0.04 nats below Pre-LN after 82M tokens (README).

Run
    python nano_simple_block.py --block sasp                  # laptop CPU, a few minutes
    python nano_simple_block.py --preset gpu --block sasp     # paper shape: 18 x 768, T 128
    python nano_simple_block.py --compare preln,parallel,sas,sasp,sasp_nonorm   # plots + table
    python nano_simple_block.py --preset gpu --bench preln,sasp,sasp:gains=layer  # tokens/s
    torchrun --nproc_per_node 8 nano_simple_block.py --preset gpu --block sas  # DDP

Reading map: Config -> 1. Pre-LN pieces (RMSNorm, Eq. 2, MLP) -> 2. skipless attention (C, its
running mean cummean, Eqs. 4-5) -> 3. identity values (Eq. 6), Attention -> 4-5. Block (Eqs. 1,
7, 12-13), GPT -> the experiment (parameters, compare, plots) -> making it fast (cummean_fast,
SDPA, fused blocks, --bench) -> command line, training loop, checkpoints, main. Classroom
exercises are marked "BEGIN EXERCISE" (python tests/make_exercises.py --list).
"""

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import data

SCRIPT, TITLE = "nano_simple_block", "Simplifying Transformer Blocks (He & Hofmann, ICLR 2024)."
BLOCKS = ("preln", "parallel", "vskip", "sas", "sasp", "sasp_nonorm")
SHAPED_BLOCKS = ("vskip", "sas", "sasp", "sasp_nonorm")  # skipless, shaped attention sub-block


def _f(default, help, choices=None):
    """A Config field with its --help text (and allowed values): the parser is built from these."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices))


@dataclasses.dataclass
class Config:
    # --- the paper
    block: str = _f("sasp", "block type (paper Secs. 3-4)", BLOCKS)
    beta_sa: float = _f(1.0, "init of beta_SA, the attention branch gain of the simplified blocks")
    beta_ff: float = _f(-1.0, "init of beta_FF, the MLP branch gain; <0: 0.1*sqrt(18/n_layer)")
    mlp_skip: bool = _f(True, "keep the MLP skip alpha_FF in sas/vskip (no: skipless MLP ablation)")
    first_value: bool = _f(True, "keep W_1^V = alpha_V I + beta_V dW in block 1 of sas/sasp")
    trainable_gains: bool = _f(True, "train the scalar gains (paper: yes)")
    attn_matrix: str = _f("shaped", "skipless attention: Eq. 5 or Eq. 4", ("shaped", "vskip"))
    gains: str = _f("head", "alpha, beta, gamma per head (paper) or per layer", ("head", "layer"))
    norm_eps: float = _f(1e-5, "RMSNorm epsilon (official code: 1e-5)")
    attn_impl: str = _f("sdpa", "explicit: the T x T matrix (plain)", ("sdpa", "explicit"))
    cummean: str = _f("matmul", "C @ V: tril(ones) @ V on the tensor cores, or a float32 cumsum",
                      ("matmul", "cumsum"))
    fused: bool = _f(True, "fused block forms (one GEMM for both branches, gains in the weights)")
    # --- model
    n_layer: int = _f(6, "number of blocks L (paper: 18)")
    n_head: int = _f(4, "attention heads H (paper: 12)")
    n_embd: int = _f(128, "width d (paper: 768)")
    block_size: int = _f(128, "context length T (paper: 128)")
    mlp_ratio: int = _f(4, "MLP hidden width = mlp_ratio * d (paper: 4, ReLU)")
    vocab_size: int = _f(0, "vocabulary; 0 = the dataset's (bench: 50257), padded to 64")
    # --- data
    dataset: str = _f("pycode", "shakespeare | pycode (Python stdlib) | pycode_all | a text file")
    tokenizer: str = _f("char", "char | gpt2 (the gpu preset uses gpt2)", ("char", "gpt2"))
    data_dir: str = _f("", "where source text files are looked for ($NANO_DATA_DIR or data/)")
    # --- training (paper: AdamW (0.9, 0.999), wd 0.1, clip 1, 5% warmup + linear decay)
    batch_size: int = _f(16, "sequences per micro-batch (paper: 128)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    max_iters: int = _f(600, "optimizer steps")
    lr: float = _f(3e-3, "peak learning rate (paper: 1e-3 at 18 x 768)")
    min_lr: float = _f(0.0, "final learning rate")
    warmup_iters: int = _f(0, "linear warmup steps; 0: warmup_frac * max_iters")
    warmup_frac: float = _f(0.05, "warmup fraction when --warmup_iters is 0 (paper: 5%)")
    schedule: str = _f("linear", "decay after warmup (paper: linear)", ("linear", "cosine"))
    weight_decay: float = _f(0.1, "AdamW weight decay on matrices and embeddings only")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2 (paper: 0.999)")
    grad_clip: float = _f(1.0, "clip the global gradient norm (0 = off)")
    eval_interval: int = _f(100, "evaluate / log / checkpoint every this many steps")
    eval_iters: int = _f(10, "batches per evaluation")
    # --- system
    device: str = _f("auto", "auto: cuda > mps > cpu", ("auto", "cpu", "cuda", "mps"))
    dtype: str = _f("auto", "auto: bfloat16 on CUDA", ("auto", "float32", "bfloat16", "float16"))
    compile: bool | None = _f(None, "torch.compile (default: on for CUDA, off elsewhere)")
    compile_mode: str = _f("default", "torch.compile mode", ("default", "reduce-overhead",
                           "max-autotune", "max-autotune-no-cudagraphs"))
    seed: int = _f(1337, "random seed (model init and data order)")
    out_dir: str = _f("out_simple_block", "output directory")
    resume: bool = _f(False, "continue from out_dir/ckpt.pt")
    stop_at: int = _f(0, "stop with a checkpoint after this step, schedule unchanged (0 = off)")
    progress: bool = _f(True, "show the tqdm progress bar")
    sample_tokens: int = _f(200, "tokens of text sampled at the end (0 = none)")
    # --- modes
    preset: str = _f("auto", "cpu (laptop), gpu (paper shape); auto: gpu if CUDA",
                     ("auto", "cpu", "gpu"))
    compare: str = _f("", "comma list of blocks to train in turn (same seed and data)")
    bench: str = _f("", "comma list of blocks to time side by side (random tokens); entries take "
                    "overrides, e.g. sasp:cummean=matmul:gains=layer")
    bench_iters: int = _f(15, "bench: timed steps per model in each of 3 rounds (after 5 untimed)")


PRESETS = {
    "cpu": {},  # the defaults: 6 x 128, char tokens of Python source, a few minutes on a laptop
    # the paper's CodeParrot shape (18 x 768, 12 heads, T 128, batch 128); 5000 steps = 82M tokens
    "gpu": dict(n_layer=18, n_head=12, n_embd=768, block_size=128, batch_size=128, max_iters=5000,
                eval_interval=250, eval_iters=50, tokenizer="gpt2", dataset="pycode_all"),
}
# The gpu preset's peak LR per block, as the paper tuned it per block: the best of a factor-2
# sweep at this shape, 1000 steps, one H200 (README; assets/simple_block_gpu_runs.csv). Pre-LN is
# clearly worse at 1e-3; SAS-P without norms gives NaN from 5e-4. An explicit --lr wins.
GPU_LR = dict(preln=5e-4, parallel=5e-4, vskip=2.5e-4, sas=2e-3, sasp=2e-3, sasp_nonorm=2.5e-4)
ARCH_FIELDS = ("block", "n_layer", "n_head", "n_embd", "block_size", "mlp_ratio", "attn_matrix",
               "gains", "mlp_skip", "first_value", "trainable_gains", "vocab_size")


# ---- 1. The Pre-LN block's pieces (Eqs. 1-3): RMSNorm, causal softmax attention, the MLP
class RMSNorm(nn.Module):
    """RMSNorm(x) = g * x / sqrt(mean(x^2) + eps), computed in float32 (App. D.1: RMSNorm)."""

    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):  # (B, T, d)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


def causal_softmax(q, k):
    """Eq. 2: A = softmax(Q K^T / sqrt(d_h) + M), M_ij = 0 for j <= i and -inf above the diagonal
    (token i attends to tokens 1..i). q, k: (B, H, T, d_h) -> A: (B, H, T, T), rows sum to 1."""
    # BEGIN EXERCISE sb_softmax: q k^T / sqrt(d_h), -inf above the diagonal, softmax over the keys
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return att.masked_fill(~causal, float("-inf")).softmax(-1)
    # END EXERCISE sb_softmax


class MLP(nn.Module):
    """MLP(x) = ReLU(x W_in) W_out, no biases, hidden 4d (paper, CodeParrot)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, h):  # (B, T, d) -> (B, T, d)
        return self.c_proj(F.relu(self.c_fc(h)))


# ---- 2. Removing the attention skip (Sec. 4.1): V-SkipInit (Eq. 4), shaped attention (Eq. 5)
def causal_uniform(T, device=None, dtype=None):
    """C = softmax(M): the (T, T) causal uniform matrix, C_ij = 1/i for j <= i (rows 1-indexed)."""
    n = torch.arange(1, T + 1, device=device, dtype=dtype).view(T, 1)
    return torch.ones(T, T, device=device, dtype=dtype).tril() / n


def cummean(v):
    """C V without the (T, T) matrix: row i is the mean of v_1..v_i, the causal running mean.
    This is what makes shaped attention as fast as softmax attention ("making it fast" computes
    it the same way, in cummean_fast). v: (..., T, C) -> (..., T, C), float32 for half-precision
    v (float64 stays float64)."""
    # BEGIN EXERCISE sb_cummean: divide the running sum (a float32 cumsum over T) by 1..T
    T = v.size(-2)
    acc = torch.promote_types(v.dtype, torch.float32)
    n = torch.arange(1, T + 1, device=v.device, dtype=acc).view(T, 1)  # (T, 1): i = 1..T
    return v.to(acc).cumsum(-2) / n
    # END EXERCISE sb_cummean


def skipless_matrix(A, alpha, beta, gamma):
    """The attention matrix without an attention skip, from A of Eq. 2 (B, H, T, T):
    Eq. 4 (V-SkipInit) alpha I + beta A with beta = 0 at init, or Eq. 5 (shaped attention)
    alpha_h I + beta_h A - gamma_h C, = I at init when W^Q = 0 (then A = C).
    alpha, beta, gamma: (H, 1, 1), one per head (or (1, 1, 1)); Eq. 4 is gamma = 0.
    Returns (B, H, T, T) in A's dtype."""
    # BEGIN EXERCISE sb_shaped: beta A + alpha I - gamma C; I and C of A's size, dtype, device
    T = A.size(-1)
    eye = torch.eye(T, device=A.device, dtype=A.dtype)
    return beta * A + alpha * eye - gamma * causal_uniform(T, A.device, A.dtype)
    # END EXERCISE sb_shaped


def _gain(module, name, init, trainable):
    """Register a scalar gain: a parameter (no weight decay: it is < 2-D) or, frozen, a buffer."""
    if trainable:
        setattr(module, name, nn.Parameter(init.clone()))
    else:
        module.register_buffer(name, init.clone())


# ---- 3. Values and projections as the identity (Sec. 4.2; Eq. 6 for the first W^V)
class Attention(nn.Module):
    """Multi-head attention in all the paper's flavours.

    matrix: "softmax" (Eq. 2, Pre-LN / parallel), "vskip" (Eq. 4) or "shaped" (Eq. 5).
    values: "matrix" (a trainable W^V), "identity" (no W^V: V is the head split of the input),
            "first" (W_1^V = alpha_V I + beta_V dW, block 1 of SAS / SAS-P).
    W^P is kept for preln / parallel / vskip and removed (= I) in sas / sasp / sasp_nonorm."""

    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        d, H = cfg.n_embd, cfg.n_head
        self.n_head, self.attn_impl, self.cummean_how = H, cfg.attn_impl, cfg.cummean
        shaped = cfg.block in SHAPED_BLOCKS
        self.matrix = cfg.attn_matrix if shaped else "softmax"
        self.has_proj = cfg.block in ("preln", "parallel", "vskip")  # SAS: W^P = I
        first = layer_idx == 0 and cfg.first_value
        self.values = "matrix" if self.has_proj else "first" if first else "identity"
        # W^Q and W^K fused, with biases (the only biases in the model, as in the official code)
        self.c_qk = nn.Linear(d, 2 * d, bias=True)
        if self.has_proj:  # (then values == "matrix")
            self.c_v = nn.Linear(d, d, bias=False)  # W^V
            self.c_proj = nn.Linear(d, d, bias=False)  # W^P
        if self.values == "first":
            # Eq. 6 for W_1^V = alpha_V I + beta_V dW: dW = 0 at init, alpha_V = beta_V = 1 (fn. 6)
            self.dW_v = nn.Parameter(torch.zeros(d, d))
            _gain(self, "alpha_v", torch.tensor(1.0), cfg.trainable_gains)
            _gain(self, "beta_v", torch.tensor(1.0), cfg.trainable_gains)
            self.register_buffer("eye", torch.eye(d), persistent=False)
        if shaped:  # Eqs. 4-5: alpha_h, beta_h (, gamma_h) per head, trainable, no weight decay
            n = H if cfg.gains == "head" else 1
            _gain(self, "alpha", torch.ones(n), cfg.trainable_gains)
            beta = torch.ones(n) if self.matrix == "shaped" else torch.zeros(n)  # Eq. 4: beta = 0
            _gain(self, "beta", beta, cfg.trainable_gains)
            if self.matrix == "shaped":
                _gain(self, "gamma", torch.ones(n), cfg.trainable_gains)

    def in_weights(self):
        """The matrices that multiply the normalised input h: [W^Q; W^K] and, if any, W^V."""
        ws = [self.c_qk.weight]  # (2d, d)
        if self.values == "matrix":
            ws.append(self.c_v.weight)  # (d, d)
        elif self.values == "first":
            ws.append(self.alpha_v * self.eye + self.beta_v * self.dW_v)  # W_1^V (Sec. 4.2, fn. 6)
        return ws

    def forward(self, h, scale=None):  # (B, T, d) -> (B, T, d)
        z = F.linear(h, torch.cat(self.in_weights()))  # h [W^Q; W^K; (W^V)]^T: (B, T, 2d or 3d)
        return self.from_projections(z, h, scale)

    def from_projections(self, z, h, scale=None):
        """z = h [W^Q; W^K; (W^V)]^T for the normalised input h (B, T, d). scale: a branch gain
        folded into alpha_h, beta_h, gamma_h (see fused_block_forward); None in the plain form."""
        B, T, d = h.shape
        H, dh = self.n_head, d // self.n_head
        bias = self.c_qk.bias.to(z.dtype)  # (bf16 under autocast: keeps q, k in bf16)
        q = (z[..., :d] + bias[:d]).view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        k = (z[..., d:2 * d] + bias[d:]).view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        # SAS: no W^V, the values are the head split of the normalised input itself (Eq. 13)
        v = z[..., 2 * d:3 * d] if self.values != "identity" else h.to(z.dtype)
        v = v.reshape(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        if self.attn_impl == "explicit":
            y = self.attention_matrix(q, k, scale) @ v  # A V with the (B, H, T, T) matrix
        else:
            y = sdpa_attention(self, q, k, v, scale)  # the same without a T x T matrix (fast)
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d): concat heads
        return self.c_proj(y) if self.has_proj else y  # W^P (Eq. 3)

    def coefficients(self, scale=None):
        """(alpha, beta, gamma) as (H or 1, 1, 1) tensors, times the branch gain if given."""
        c = self.gamma if self.matrix == "shaped" else torch.zeros_like(self.alpha)  # Eq. 4: no C
        return tuple((g if scale is None else g * scale).view(-1, 1, 1)
                     for g in (self.alpha, self.beta, c))

    def attention_matrix(self, q, k, scale=None):  # (B, H, T, T), as the official code builds it
        A = causal_softmax(q, k)  # Eq. 2
        return A if self.matrix == "softmax" else skipless_matrix(A, *self.coefficients(scale))


# ---- 4-5. The blocks: the MLP skip goes in parallel (Sec. 4.3), then the norms (Sec. 4.4)
class Block(nn.Module):
    """One transformer block of type cfg.block (paper Secs. 3-4)."""

    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.kind, self.fused, self.mlp_skip = cfg.block, cfg.fused, cfg.mlp_skip
        d = cfg.n_embd
        # Sec. 4.4: sasp_nonorm has no norms, but keeps one in front of block 1 (official code)
        use_norm = cfg.block != "sasp_nonorm" or layer_idx == 0
        self.norm1 = RMSNorm(d, cfg.norm_eps) if use_norm else nn.Identity()
        if cfg.block in ("preln", "vskip", "sas"):
            self.norm2 = RMSNorm(d, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        if cfg.block in SHAPED_BLOCKS:
            # App. D.1: beta_FF = O(1/sqrt(L)), 0.1 at L = 18; --beta_ff < 0 rescales it to n_layer
            beta_ff = cfg.beta_ff if cfg.beta_ff >= 0 else 0.1 * math.sqrt(18 / cfg.n_layer)
            _gain(self, "beta_sa", torch.tensor(float(cfg.beta_sa)), cfg.trainable_gains)
            _gain(self, "beta_ff", torch.tensor(float(beta_ff)), cfg.trainable_gains)
            if cfg.block in ("vskip", "sas") and cfg.mlp_skip:  # trainable in the official code
                _gain(self, "alpha_ff", torch.tensor(1.0), cfg.trainable_gains)

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        """The plain equations (self.attn is the attention sub-block MHA~, self.norm1/norm2 the
        norms, self.mlp the MLP; beta_sa, beta_ff, alpha_ff the trainable gains):
            SAS, vskip (Eqs. 12-13): x_hat = beta_SA MHA~(Norm_1(x)),
                                     out = alpha_FF x_hat + beta_FF MLP(Norm_2(x_hat))
                                     (--no-mlp_skip: no alpha_FF x_hat term)
            SAS-P, SAS-P no-norm (Eq. 7, alpha_comb = 0, one norm for both branches):
                                     out = beta_SA MHA~(Norm(x)) + beta_FF MLP(Norm(x))
        (sasp_nonorm's norm1 is nn.Identity after block 1.)"""
        if self.fused and self.kind != "preln":
            return fused_block_forward(self, x)  # the same function, faster ("making it fast")
        if self.kind == "preln":  # Eq. 1, alpha = beta = 1: x_hat = x + MHA(Norm(x)), ...
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))  # ... out = x_hat + MLP(Norm(x_hat))
        if self.kind == "parallel":  # Eq. 7, alpha_comb = beta_SA = beta_FF = 1, one norm
            h = self.norm1(x)
            return x + self.attn(h) + self.mlp(h)
        # BEGIN EXERCISE sb_block: the SAS and SAS-P equations above, gains and mlp_skip included
        if self.kind in ("sas", "vskip"):  # Eqs. 12-13: no attention skip
            x_hat = self.beta_sa * self.attn(self.norm1(x))  # x_hat = beta_SA MHA~(Norm_1(x))
            m = self.beta_ff * self.mlp(self.norm2(x_hat))  # beta_FF MLP(Norm_2(x_hat))
            return self.alpha_ff * x_hat + m if self.mlp_skip else m  # + alpha_FF x_hat
        h = self.norm1(x)  # parallel blocks: one norm for both branches (Eq. 7)
        return self.beta_sa * self.attn(h) + self.beta_ff * self.mlp(h)  # SAS-P: alpha_comb = 0
        # END EXERCISE sb_block


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, d)  # tied with the LM head
        self.wpe = nn.Embedding(cfg.block_size, d)  # learned positions, as in the official code
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.norm_f = RMSNorm(d, cfg.norm_eps)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for blk in self.blocks:
            att = blk.attn
            nn.init.zeros_(att.c_qk.bias)
            if cfg.block in SHAPED_BLOCKS:
                # Sec. 4.1: W^Q = 0, so softmax = C and alpha I + beta C - gamma C = I at init
                nn.init.zeros_(att.c_qk.weight[:d])
            if cfg.block == "vskip":  # He et al. 2023: independent random-orthogonal W^V, W^P
                nn.init.orthogonal_(att.c_v.weight)
                nn.init.orthogonal_(att.c_proj.weight)

    @staticmethod
    def _init_weights(m):
        # N(0, 0.02^2) everywhere, no 1/sqrt(2L) on residual projections (official code)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):  # idx (B, T) int64
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, d)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # (B, 1, V)
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, n_new, n_valid=None, temperature=0.8, top_k=50):
        """Sample n_new tokens; ids >= n_valid (the vocabulary padding) are never drawn."""
        for _ in range(n_new):
            logits, _ = self(idx[:, -self.cfg.block_size:])
            logits = logits[:, -1, :n_valid].float() / temperature
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, -1), 1)], dim=1)
        return idx


# ---- the paper's experiment: parameters (Sec. 4.2), loss vs step and time (Fig. 5), gains (Fig. 4)
PAPER_NUMBERS = {
    "codeparrot_params_M": {"preln": 167, "sas": 146, "reduction": 0.13},
    "bert_speed_vs_preln": {"preln": 1.00, "parallel": 1.05, "vskip": 0.95, "sas": 1.09,
                            "sasp": 1.16, "sasp_nonorm": 1.20},
    "codeparrot_eval_loss_40k": {"preln": 1.155, "sasp_nonorm": 1.245},
    "note": "SAS/SAS-P match Pre-LN per step on CodeParrot (plots only); speeds: BERT, RTX 2080Ti",
}


def count_params(model):
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def param_formula(cfg: Config, block: str) -> int:
    """Trainable parameters of GPT(cfg with block), by hand: the arithmetic behind Sec. 4.2's
    "167M -> 146M" (param_table counts the real models; tests check both agree).
    Whole model: token embedding (vocab x d, tied with the LM head), positions (block_size x d),
    the final norm (d), and in sasp_nonorm the norm kept in front of block 1 (d).
    Per block: W^Q, W^K (d x d each) with biases (d each); the MLP (d x r d and r d x d, r =
    mlp_ratio, no biases); a gain vector (d) per RMSNorm: 2 in preln, vskip, sas; 1 in parallel,
    sasp; 0 in sasp_nonorm; W^V and W^P (d x d each) in preln, parallel, vskip only.
    Shaped blocks, if trainable_gains: alpha, beta (and gamma in Eq. 5) per head (or one each
    with gains=layer), beta_SA, beta_FF, and alpha_FF in sas/vskip with the MLP skip.
    sas, sasp, sasp_nonorm with first_value: block 1's W_1^V = alpha_V I + beta_V dW adds dW
    (d x d), and alpha_V, beta_V if trainable_gains."""
    # BEGIN EXERCISE sb_params: add up the matrices, biases, norm gains and scalar gains above
    d, g = cfg.n_embd, int(cfg.trainable_gains)
    norms = {"preln": 2, "parallel": 1, "vskip": 2, "sas": 2, "sasp": 1, "sasp_nonorm": 0}[block]
    n = 2 * d * d + 2 * d + 2 * cfg.mlp_ratio * d * d + norms * d  # W^Q,K + biases, MLP, norms
    if block in ("preln", "parallel", "vskip"):
        n += 2 * d * d  # W^V, W^P
    if block in SHAPED_BLOCKS:
        heads = cfg.n_head if cfg.gains == "head" else 1
        n += g * (heads * (3 if cfg.attn_matrix == "shaped" else 2) + 2)  # a, b, (c), beta_SA, FF
        n += g * cfg.mlp_skip * (block in ("sas", "vskip"))  # alpha_FF
    first = d * (block == "sasp_nonorm")  # the norm kept in front of block 1
    if block in ("sas", "sasp", "sasp_nonorm") and cfg.first_value:
        first += d * d + 2 * g  # W_1^V: dW, alpha_V, beta_V
    return (cfg.vocab_size + cfg.block_size + 1) * d + cfg.n_layer * n + first  # + wte, wpe, norm
    # END EXERCISE sb_params


def param_table(cfg: Config):
    """Trainable parameters of every block at cfg's shape, counted on models built on the meta
    device (no memory, no compute); param_formula gives the same numbers by hand."""
    with torch.device("meta"):
        counts = {b: count_params(GPT(with_block(cfg, b))) for b in BLOCKS}
    return [{"block": b, "params": n, "reduction_vs_preln": 1 - n / counts["preln"]}
            for b, n in counts.items()]


def md_table(header, rows):
    """A markdown table from a header and rows of cells."""
    return "\n".join("| " + " | ".join(map(str, r)) + " |"
                     for r in [header, ["---"] * len(header)] + rows)


def write_table(cfg, name, rows, cols, head="", **extra):
    """Print rows (dicts with block, params, tokens_per_s) as a table, parameters and speed
    relative to preln (or the first row), then cols: (title, key, format); write name.md/json."""
    base = next((r for r in rows if r["block"] == "preln"), rows[0])
    for r in rows:
        r["params_vs_base"] = r["params"] / base["params"] - 1
        r["speed_vs_base"] = r["tokens_per_s"] / base["tokens_per_s"]
    text = head + md_table(
        ["block", "params", f"vs {base['block']}", "tokens/s", "speed"] + [c[0] for c in cols],
        [[r["block"], f"{r['params'] / 1e6:.3f}M", f"{100 * r['params_vs_base']:+.1f}%",
          f"{r['tokens_per_s']:,.0f}", f"{r['speed_vs_base']:.3f}x"]
         + [fmt.format(r[k]) if r[k] is not None else "n/a" for _, k, fmt in cols] for r in rows])
    print(text)
    write_file(os.path.join(cfg.out_dir, name + ".md"), lambda f: f.write(text + "\n"))
    write_json(os.path.join(cfg.out_dir, name + ".json"), {
        "script": SCRIPT + ".py", "config": dataclasses.asdict(cfg), "table": rows, **extra})


def learned_gains(model):
    """The learned scalars per block (what the paper plots in Figs. 4, 16-20)."""
    names = ("beta_sa", "beta_ff", "alpha_ff", "alpha", "beta", "gamma", "alpha_v", "beta_v")
    return [{n: getattr(m, n).detach().float().cpu().tolist() for n in names
             for m in (b, b.attn) if hasattr(m, n)} for b in model.blocks]


def plot_runs(runs, out_dir, prefix="loss"):
    """The paper's two views (Figs. 5, 23): validation loss against step and against time."""
    for xkey, xlabel, name in (("step", "step", "step"), ("train_s", "training time (s)", "time")):
        fig = Figure(figsize=(6, 4), layout="tight")  # (no pyplot: no GUI backend, no state)
        ax = fig.subplots()
        for label, rows in runs.items():
            rows = [r for r in rows if r["step"] > 0]
            ax.plot([r[xkey] for r in rows], [r["val_loss"] for r in rows], ".-", label=label)
        ax.set(xlabel=xlabel, ylabel="validation loss", title=f"validation loss vs {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(os.path.join(out_dir, f"{prefix}_vs_{name}.png"), dpi=120)


def run_compare(cfg, ds, device, ddp):
    """Train each block with the same seed and data order (Fig. 5); a table and the two plots."""
    runs, table = {}, []
    for b in cfg.compare.split(","):
        sub = with_block(cfg, b, out_dir=os.path.join(cfg.out_dir, b), compare="")
        os.makedirs(sub.out_dir, exist_ok=True)
        res = train(sub, ds, device)
        runs[b] = res["log"]
        table.append({"block": b, **{k: res["final"][k] for k in (
            "params", "tokens_per_s", "train_loss", "val_loss", "train_s")}})
    if ddp[0] == 0:
        write_table(cfg, "compare", table, [("final train loss", "train_loss", "{:.4f}"),
                                            ("final val loss", "val_loss", "{:.4f}")],
                    paper=PAPER_NUMBERS)
        plot_runs(runs, cfg.out_dir, prefix="compare_loss")


# ---- making it fast: the same functions, computed faster (tests/test_simple_block.py checks
# each against the plain form above, in float64)
def cummean_fast(v, how="matmul"):
    """cummean(v) as training computes it (--cummean): matmul, tril(ones) @ v on the tensor cores
    (float32 accumulation, rounded once), or cumsum, cummean's float32 scan (a copy: a student copy
    with exercise sb_cummean blanked still trains). v: (..., T, C) -> float32 (float64 stays)."""
    T = v.size(-2)
    acc = torch.promote_types(v.dtype, torch.float32)
    n = torch.arange(1, T + 1, device=v.device, dtype=acc).view(T, 1)  # (T, 1): i = 1..T
    if how == "matmul":
        return (torch.ones(T, T, device=v.device, dtype=v.dtype).tril() @ v).to(acc) / n
    return v.to(acc).cumsum(-2) / n


def sdpa_attention(att, q, k, v, scale=None):
    """att.attention_matrix(q, k, scale) @ v without the T x T matrix, on FlashAttention:
    (alpha I + beta A - gamma C) V = beta SDPA(Q, K, V) + alpha V - gamma C V, with C V the
    causal running mean (cummean_fast). q, k, v: (B, H, T, dh) -> (B, H, T, dh)."""
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # A V
    if att.matrix == "softmax":
        return o
    a, b, c = att.coefficients(scale)
    # the three terms are combined in float32 and rounded once; torch.compile fuses them
    acc = torch.promote_types(v.dtype, torch.float32)
    y = b * o.to(acc) + a * v.to(acc)
    if att.matrix == "shaped":  # C is the same for every head: one (T, T) x (T, d) per sequence
        B, H, T, dh = v.shape   # (v is a head split of (B, T, d): no copy to merge the heads)
        cm = cummean_fast(v.transpose(1, 2).reshape(B, T, H * dh), att.cummean_how)
        y = y - c * cm.view(B, T, H, dh).transpose(1, 2)
    return y.to(v.dtype)


def fused_block_forward(blk, x):
    """Block.forward of the simplified and parallel blocks with fewer passes over (B, T, d):
    beta_SA is folded into alpha_h, beta_h, gamma_h and beta_FF into W_out (the same function
    and gradients); the parallel blocks compute both branches' inputs with one GEMM (PaLM) and
    SAS-P adds the attention branch inside the MLP's output GEMM (addmm)."""
    if blk.kind in ("sas", "vskip"):
        x_hat = blk.attn(blk.norm1(x), scale=blk.beta_sa)  # (B, T, d)
        r = F.relu(blk.mlp.c_fc(blk.norm2(x_hat)))  # (B, T, 4d)
        m = F.linear(r, blk.beta_ff * blk.mlp.c_proj.weight)  # r (beta_FF W_out)^T
        return blk.alpha_ff * x_hat + m if blk.mlp_skip else m
    h = blk.norm1(x)  # (B, T, d)
    w_in = blk.attn.in_weights()  # [W^Q; W^K; (W^V)]: n_in = 2d or 3d rows
    n_in = sum(w.size(0) for w in w_in)
    z = F.linear(h, torch.cat(w_in + [blk.mlp.c_fc.weight]))  # (B, T, n_in + 4d)
    r = F.relu(z[..., n_in:])  # (B, T, 4d)
    if blk.kind == "parallel":
        return x + blk.attn.from_projections(z[..., :n_in], h) + F.linear(r, blk.mlp.c_proj.weight)
    y = blk.attn.from_projections(z[..., :n_in], h, scale=blk.beta_sa)  # (B, T, d)
    B, T, d = y.shape
    # SAS-P: out = y + r (beta_FF W_out)^T, the sum done by the GEMM itself
    out = torch.addmm(y.reshape(B * T, d), r.reshape(B * T, -1),
                      (blk.beta_ff * blk.mlp.c_proj.weight).t())
    return out.view(B, T, d)


def parse_bench_entry(entry, cfg):
    """'sasp:cummean=matmul:gains=layer' -> the Config of that --bench entry."""
    block, *overrides = entry.split(":")
    fields, over = {f.name: f.default for f in dataclasses.fields(Config)}, {"block": block}
    for p in overrides:
        k, _, v = p.partition("=")
        need(k in fields and v,
             f"bad bench entry {entry!r}: use block[:field=value...], a Config field")
        typ = bool if fields[k] is None else type(fields[k])  # (--compile's default is None)
        try:
            over[k] = {"true": True, "false": False}[v.lower()] if typ is bool else typ(v)
        except (KeyError, ValueError):
            want = "true or false" if typ is bool else f"a {typ.__name__}"
            raise BadInput(f"bench entry {entry!r}: {k} takes {want}") from None
    return dataclasses.replace(cfg, **over)


def bench_step(c, x, y, device, autocast):
    """One --bench entry: a closure running one full training step, and the model."""
    torch.manual_seed(c.seed)
    model = GPT(c).to(device)
    opt = make_optimizer(model, c, device.type)
    cmodel, compiled = maybe_compile(model, c, device)

    def step():
        with autocast:
            loss = cmodel(x, y)[1]
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model, compiled


def run_bench(cfg, device):
    """Time full training steps (forward, backward, clip, AdamW) of each --bench entry in one
    process on random tokens: 5 untimed steps (the first compiles), then 3 interleaved rounds of
    --bench_iters steps (clock drift hits every entry alike); the best round counts."""
    run, peak = setup_run(cfg, device), peak_flops(device)
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    xy = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1),
                       generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(step, n):  # seconds for n steps
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return time.perf_counter() - t0

    rows, steps = [], []
    for entry in cfg.bench.split(","):
        c = parse_bench_entry(entry, cfg)
        step, model, compiled = bench_step(c, x, y, device, run.autocast)
        steps.append(step)
        rows.append({"block": entry, "params": count_params(model), "ms_rounds": [],
                     "warmup_s": timed(step, 5), "flops_per_token": flops_per_token(model, c),
                     "compiled": compiled})
        print(f"bench {entry}: {rows[-1]['params'] / 1e6:.2f}M params, "
              f"warm-up {rows[-1]['warmup_s']:.1f}s")
    for i in range(3):
        for r, step in zip(rows, steps):
            r["ms_rounds"].append(1000 * timed(step, cfg.bench_iters) / cfg.bench_iters)
        print(f"round {i}: " + ", ".join(f"{r['block']} {r['ms_rounds'][-1]:.2f} ms" for r in rows))
    for r in rows:
        r["ms_per_step"] = min(r["ms_rounds"])
        r["tokens_per_s"] = cfg.batch_size * cfg.block_size / (r["ms_per_step"] / 1000)
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak if peak else None
    head = (f"device {device_name(device)}, torch {torch.__version__}, {run.dtype}, compile "
            f"{rows[0]['compiled']}, L {cfg.n_layer}, d {cfg.n_embd}, H {cfg.n_head}, "
            f"T {cfg.block_size}, B {cfg.batch_size}, vocab {cfg.vocab_size}; best of "
            f"3 rounds x {cfg.bench_iters} steps")
    cols = [("ms/step", "ms_per_step", "{:.2f}"), ("MFU", "mfu", "{:.1%}")]
    write_table(cfg, "bench", rows, cols, head=head + "\n\n", header=head)


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
        cuda = given.get("device", "auto") in ("auto", "cuda") and torch.cuda.is_available()
        preset = "gpu" if cuda else "cpu"
    cfg = Config(**{**PRESETS[preset], **given})
    cfg.preset, cfg.explicit = preset, set(given)  # (they win over presets and checkpoints)
    return with_block(cfg, cfg.block)


def with_block(cfg: Config, block: str, **over) -> Config:
    """cfg for this block (and overrides), keeping cfg.explicit: the gpu preset takes the block's
    tuned LR unless --lr was given."""
    explicit = getattr(cfg, "explicit", set())
    lr = GPU_LR.get(block, cfg.lr) if cfg.preset == "gpu" and "lr" not in explicit else cfg.lr
    new = dataclasses.replace(cfg, block=block, lr=lr, **over)
    new.explicit = explicit
    return new


def resolve_device(cfg):
    ok = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if cfg.device == "auto":
        return torch.device(next(d for d, have in ok.items() if have))
    return torch.device(cfg.device if ok[cfg.device] else "cpu")


RULES = (  # (flags, what each must be, the test)
    (("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "mlp_ratio",
      "eval_interval", "eval_iters", "bench_iters"), "an integer >= 1", lambda v: v >= 1),
    (("max_iters", "warmup_iters", "stop_at", "sample_tokens", "vocab_size", "min_lr",
      "weight_decay", "grad_clip", "norm_eps"),
     "a finite number >= 0", lambda v: 0 <= v < math.inf),
    (("lr",), "a finite number > 0", lambda v: 0 < v < math.inf),
    (("beta1", "beta2"), "in [0, 1)", lambda v: 0 <= v < 1),
    (("warmup_frac",), "in [0, 1]", lambda v: 0 <= v <= 1),
    (("beta_sa", "beta_ff"), "finite (--beta_ff < 0: the default)", math.isfinite),
    (("seed",), "in [0, 2**32)", lambda v: 0 <= v < 2 ** 32),
)


def validate(cfg: Config, device) -> Config:
    """Every check that can fail before anything is written (for each --compare/--bench entry)."""
    for c in run_configs(cfg):
        for names, want, ok in RULES:
            for n in names:
                need(ok(getattr(c, n)), f"--{n} must be {want} (got {getattr(c, n)})")
        need(c.min_lr <= c.lr, f"--min_lr must be in [0, lr={c.lr}] (got {c.min_lr})")
        need(c.n_embd % c.n_head == 0, f"--n_head {c.n_head} must divide --n_embd {c.n_embd}")
        need(c.block in BLOCKS, f"unknown block {c.block!r}; choose from {', '.join(BLOCKS)}")
    cpu = device.type == "cpu"
    need(not cpu or cfg.device in ("cpu", "auto"),
         f"--device {cfg.device} is not available here; use --device cpu or auto")
    need(not (cpu and cfg.dtype == "float16"), "float16 needs CUDA or MPS; use float32 or bfloat16")
    parent = os.path.abspath(cfg.out_dir)   # out_dir: a file, under a file, not writable?
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    need(os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK),
         f"--out_dir {cfg.out_dir}: {parent} is not a writable directory")
    return cfg


def run_configs(cfg: Config):
    """The Configs a run trains or times: cfg, or one per --compare / --bench entry."""
    need(not (cfg.compare and cfg.bench or cfg.resume and (cfg.compare or cfg.bench)),
         "--compare, --bench and --resume are separate modes; give one of them")
    if cfg.compare:
        configs = [with_block(cfg, b) for b in cfg.compare.split(",")]
        need(len({c.block for c in configs}) == len(configs),
             f"--compare {cfg.compare} lists a block twice")
        return configs
    if cfg.bench:
        return [parse_bench_entry(e, cfg) for e in cfg.bench.split(",")]
    need(cfg.block in SHAPED_BLOCKS or (cfg.attn_matrix, cfg.gains) == ("shaped", "head"),
         f"--attn_matrix/--gains change shaped attention, which --block {cfg.block} does not "
         f"have; use one of {', '.join(SHAPED_BLOCKS)}")
    need(cfg.mlp_skip or cfg.block in ("sas", "vskip"),
         "--no-mlp_skip (skipless MLP ablation) applies to --block sas or vskip")
    return [cfg]


# ---- training
def get_lr(it, cfg):
    """Linear warmup (paper: 5% of the steps), then linear decay to min_lr (paper, Sec. 4,
    Fig. 11) or, with --schedule cosine, cosine decay."""
    warmup = warmup_iters(cfg)
    if it < warmup:
        return cfg.lr * (it + 1) / (warmup + 1)
    frac = min(1.0, (it - warmup) / max(1, cfg.max_iters - warmup))
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)
    return cfg.lr + frac * (cfg.min_lr - cfg.lr)


def warmup_iters(cfg):
    return cfg.warmup_iters if cfg.warmup_iters > 0 else int(cfg.warmup_frac * cfg.max_iters)


def make_optimizer(model, cfg, device_type):
    """AdamW; weight decay only on matrices and embeddings, not on gains, norms, biases (< 2-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    extra = dict(fused=True) if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


@torch.no_grad()
def evaluate(model, ds, cfg, run):
    """Mean loss on fixed train/val batches (the same at every eval)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = ds.get_batch(split, cfg.batch_size, cfg.block_size, device=run.dev,
                                generator=gen, rank=run.rank, world_size=run.world)
            with run.autocast:
                losses.append(model(x, y)[1].float())
        loss = torch.stack(losses).mean()
        if run.ddp:
            torch.distributed.all_reduce(loss)
        out[split] = loss.item() / run.world
    model.train()
    return out


def setup_run(cfg, device):
    """DDP (torchrun, set up by setup_ddp), device, dtype, autocast: what a run is made of."""
    ddp, rank, world = torch.distributed.is_available() and torch.distributed.is_initialized(), 0, 1
    if ddp:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    auto = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    dtype = getattr(torch, auto if cfg.dtype == "auto" else cfg.dtype)
    return SimpleNamespace(
        ddp=world > 1, rank=rank, world=world, master=rank == 0, device=device.type, dtype=dtype,
        dev=device, autocast=torch.autocast(device.type, dtype=dtype,
                                            enabled=dtype != torch.float32),
        tokens=cfg.batch_size * cfg.block_size * cfg.grad_accum * world)


def maybe_compile(model, cfg, device):
    """(model, compiled): torch.compile by default on CUDA, never on MPS."""
    if not (cfg.compile if cfg.compile is not None else device.type == "cuda"):
        return model, False
    if device.type == "mps":
        print("note: torch.compile is not available on MPS; running eagerly", file=sys.stderr)
        return model, False
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    return torch.compile(model, mode=mode), True


def init_state(cfg, ds, run, ck=None):
    """The model and what a checkpoint restores: optimizer, scaler, step, log, data order."""
    torch.manual_seed(cfg.seed)
    raw = GPT(cfg).to(run.dev)
    st = SimpleNamespace(raw=raw, opt=make_optimizer(raw, cfg, run.device), step=0, log=[],
                         train_s=0.0, path=os.path.join(cfg.out_dir, "ckpt.pt"),
                         kept="no checkpoint yet", loss=None, norm=None,
                         scaler=torch.amp.GradScaler(run.device, enabled=run.dtype == torch.half),
                         gen=torch.Generator().manual_seed(cfg.seed))  # data order
    if ck is not None:
        restore(ck, st, run.device)
    return st


def train(cfg: Config, ds, device, ck=None):
    """Train one model (nanoGPT's loop); returns the results dict (also written to out_dir)."""
    run = setup_run(cfg, device)
    st = init_state(cfg, ds, run, ck)
    raw = st.raw
    st.model, run.compile = maybe_compile(raw, cfg, device)  # (evaluate runs it too)
    model = st.model
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[run.dev.index] if run.device == "cuda" else None)
    if run.master:
        write_run_info(cfg, ds, run, raw)
    st.t0 = time.time() - (st.log[-1]["elapsed_s"] if st.log else 0.0)
    st.mark = (time.time(), st.step)  # start of the timed interval: (time, step)
    bad = torch.zeros(2, dtype=torch.bool, device=run.dev)   # [loss, grad norm] non-finite
    pbar = tqdm(total=cfg.max_iters, initial=st.step, dynamic_ncols=True, desc=cfg.block,
                disable=not (run.master and cfg.progress))
    try:
        while True:
            stop = st.step >= cfg.max_iters or 0 < cfg.stop_at <= st.step
            if st.step % cfg.eval_interval == 0 or st.step == cfg.max_iters:
                check_finite(bad, st)                                 # never save bad weights
                if not (st.log and st.log[-1]["step"] == st.step):  # (resumed: logged already)
                    log_eval(cfg, ds, run, st)
                st.mark = (time.time(), st.step)
            elif stop and run.master:
                check_finite(bad, st)
                save_checkpoint(st, cfg, run.device)  # --stop_at between two evals
            if stop:
                break
            train_step(model, ds, cfg, run, st, bad)
            pbar.update(1)
            if run.device != "cuda" or st.step % 10 == 0:  # CPU: every step; CUDA: it syncs
                check_finite(bad, st)
            if st.step % 10 == 0 and run.master:
                tps = (st.step - st.mark[1]) * run.tokens / (time.time() - st.mark[0])
                pbar.set_postfix(loss=f"{st.loss.item():.3f}", tok_s=f"{tps:,.0f}")
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted at step {st.step}; {st.kept}") from None
    finally:
        pbar.close()
    return finish_run(cfg, ds, run, st)


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
            _, loss = model(x, y)
        st.scaler.scale(loss / cfg.grad_accum).backward()
    st.loss, st.norm = loss.detach(), None
    if cfg.grad_clip > 0:
        st.scaler.unscale_(st.opt)
        st.norm = torch.nn.utils.clip_grad_norm_(st.raw.parameters(), cfg.grad_clip)
    st.scaler.step(st.opt)
    st.scaler.update()
    st.opt.zero_grad(set_to_none=True)
    bad[0] |= ~torch.isfinite(st.loss)
    bad[1] |= st.norm is not None and ~torch.isfinite(st.norm)
    st.step += 1


def check_finite(bad, st):
    if bool(bad.any()):
        what = "loss" if bool(bad[0]) else "grad norm"
        raise Diverged(f"step {st.step}: {what} is not finite; {st.kept}")


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
             "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
             "A10": 125e12, "A6000": 155e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}


def device_name(device):
    return torch.cuda.get_device_name(device) if str(device).startswith("cuda") else str(device)


def peak_flops(device):
    return next((v for k, v in PEAK_BF16.items() if k in device_name(device)), None)


def flops_per_token(model, cfg):
    """6N (matmuls, forward + backward) + the attention scores, as in nanoGPT / PaLM App. B."""
    N = count_params(model) - model.wpe.weight.numel()
    return 6 * N + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def log_eval(cfg, ds, run, st):
    """Tokens/s since st.mark; evaluate, append a row to log.csv, print it, checkpoint (not at
    step 0)."""
    now, lr, tokens = time.time(), get_lr(st.step, cfg), st.step * run.tokens
    interval = now - st.mark[0]
    st.train_s += interval
    losses = evaluate(st.model, ds, cfg, run)
    tps = (st.step - st.mark[1]) * run.tokens / interval if st.step > 0 and interval > 0 \
        else float("nan")
    peak = peak_flops(run.dev)
    st.log.append(dict(step=st.step, tokens=tokens, elapsed_s=round(now - st.t0, 3),
                       train_s=round(st.train_s, 3), lr=lr, train_loss=losses["train"],
                       val_loss=losses["val"], tokens_per_s=tps,
                       mfu=tps * flops_per_token(st.raw, cfg) / peak if peak else float("nan"),
                       block=cfg.block, **gain_means(st.raw)))
    if not run.master:
        return
    write_csv(os.path.join(cfg.out_dir, "log.csv"), st.log)
    tqdm.write(f"step {st.step}: train {losses['train']:.4f}, val {losses['val']:.4f}, "
               f"lr {lr:.2e}, {tps:,.0f} tok/s")
    if st.step > 0 or cfg.max_iters == 0:
        save_checkpoint(st, cfg, run.device)


def gain_means(model):
    """Mean of beta_SA and beta_FF over blocks (learned; nan for blocks without them)."""
    rows = learned_gains(model)
    vals = {n: [row[n] for row in rows if n in row] for n in ("beta_sa", "beta_ff")}
    return {n + "_mean": sum(v) / len(v) if v else float("nan") for n, v in vals.items()}


def finish_run(cfg, ds, run, st):
    """results.json, the plots and a sample."""
    f, raw = st.log[-1], st.raw
    tps = [x["tokens_per_s"] for x in st.log if not math.isnan(x["tokens_per_s"])]
    tps = tps[1:] or tps  # (the first interval includes compiling)
    results = dict(script=SCRIPT + ".py", config=dataclasses.asdict(cfg), final=dict(
        train_loss=f["train_loss"], val_loss=f["val_loss"], val_ppl=math.exp(f["val_loss"]),
        params=count_params(raw), tokens_per_s=sum(tps) / len(tps) if tps else float("nan"),
        elapsed_s=f["elapsed_s"], train_s=f["train_s"], step=f["step"]),
        param_table=param_table(cfg), paper=PAPER_NUMBERS, gains=learned_gains(raw))
    if run.master:
        write_json(os.path.join(cfg.out_dir, "results.json"), results)
        plot_runs({cfg.block: st.log}, cfg.out_dir, prefix="loss")
        if cfg.sample_tokens > 0:
            start = torch.tensor([ds.encode("def " if "pycode" in ds.name else "\n")],
                                 device=run.dev)
            with run.autocast:
                out = raw.generate(start, cfg.sample_tokens, ds.vocab_size)[0].tolist()
            print(f"---- sample ----\n{ds.decode(out)}\n----------------")
    return dict(results, log=st.log)


# ---- checkpoints and files
def save_checkpoint(st, cfg, device):
    """Model, optimizer, config, step, log, RNG states: to ckpt.pt.tmp, then renamed (atomic)."""
    ck = dict(script=SCRIPT, model=st.raw.state_dict(), optimizer=st.opt.state_dict(),
              scaler=st.scaler.state_dict(), config=dataclasses.asdict(cfg), step=st.step,
              log=st.log, train_s=st.train_s,
              rng=dict(data=st.gen.get_state(), torch=torch.get_rng_state(),
                       cuda=torch.cuda.get_rng_state() if device == "cuda" else None))
    write_file(st.path, lambda f: torch.save(ck, f), "wb")
    st.kept = f"kept {st.path} (step {st.step})"



def load_checkpoint(path, cfg):
    """-> (checkpoint, cfg with the checkpoint's architecture). BadInput if it is unreadable,
    written by another script, or an architecture flag given on the command line differs."""
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
    for k in ARCH_FIELDS:  # (vocab_size: the data's, padded)
        need(k not in cfg.explicit or k == "vocab_size" or ck["config"].get(k) == getattr(cfg, k),
             f"checkpoint has {k}={ck['config'].get(k)} but --{k} {getattr(cfg, k)} was given")
    return ck, with_block(cfg, **{k: ck["config"][k] for k in ARCH_FIELDS})


def restore(ck, st, device):
    try:
        st.raw.load_state_dict(ck["model"])
        st.opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # (the last line names a tensor)
        raise BadInput(f"checkpoint {st.path} does not fit this model: "
                       f"{str(e).strip().splitlines()[-1].strip()}") from None
    st.scaler.load_state_dict(ck.get("scaler", {}))  # (none in older checkpoints)
    st.step, st.log, st.train_s = ck["step"], ck["log"], ck["train_s"]
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


def write_run_info(cfg, ds, run, raw):
    """config.json, and the run's one-line summary."""
    n = count_params(raw)
    write_json(os.path.join(cfg.out_dir, "config.json"), dict(
        config=dataclasses.asdict(cfg), torch=torch.__version__, device=device_name(run.dev),
        dtype=str(run.dtype), compiled=run.compile, world_size=run.world, git_commit=git_commit(),
        params=n, dataset=ds.name, tokenizer=ds.tokenizer))
    print(f"{cfg.block}: {n / 1e6:.3f}M parameters, {run.tokens} tokens/step, "
          f"device {run.dev}, dtype {run.dtype}, compile {run.compile}")


def write_param_table(cfg):
    """params.json, and the table of every block's parameters (printed)."""
    table = param_table(cfg)
    print(f"trainable parameters at L={cfg.n_layer}, d={cfg.n_embd}, H={cfg.n_head}, "
          f"vocab={cfg.vocab_size}:\n" + md_table(["block", "params", "vs Pre-LN"], [
              [r["block"], f"{r['params'] / 1e6:.3f}M", f"{-100 * r['reduction_vs_preln']:+.1f}%"]
              for r in table]))
    write_json(os.path.join(cfg.out_dir, "params.json"),
               {"config": {k: getattr(cfg, k) for k in ARCH_FIELDS}, "table": table})


def setup_ddp(device):
    """(device, (rank, world_size)); under torchrun one process per GPU (NCCL) or CPU (gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, (0, 1)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, (torch.distributed.get_rank(), torch.distributed.get_world_size())


def main(argv=None):
    created = None  # the out_dir this run created: removed again if it fails on bad input
    try:
        cfg = parse_config(argv)
        device = resolve_device(cfg)
        validate(cfg, device)
        ck, ds = None, None
        if cfg.resume:
            ck, cfg = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), cfg)
        if not cfg.bench:
            try:
                ds = data.load_dataset(name=cfg.dataset, tokenizer=cfg.tokenizer,
                                       data_dir=cfg.data_dir or None)
                ds.check_block_size(cfg.block_size)
            except data.DataError as e:  # only here: later ones must not remove a run's files
                raise BadInput(str(e)) from None
        vocab = cfg.vocab_size or 50257 if ds is None else max(cfg.vocab_size, ds.vocab_size)
        cfg = with_block(cfg, cfg.block, vocab_size=64 * math.ceil(vocab / 64))
        device, ddp = setup_ddp(device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        created = None if os.path.exists(cfg.out_dir) or ddp[0] else cfg.out_dir
        try:
            if ddp[0] == 0:
                os.makedirs(cfg.out_dir, exist_ok=True)
                write_param_table(cfg)
            if cfg.bench:
                if ddp[0] == 0:
                    run_bench(cfg, device)
            elif cfg.compare:
                run_compare(cfg, ds, device, ddp)
            else:
                train(cfg, ds, device, ck)
        except RuntimeError as e:  # (torch.cuda.OutOfMemoryError is one)
            if not isinstance(e, torch.cuda.OutOfMemoryError) and "allocate memory" not in str(e):
                raise
            raise BadInput(f"out of memory at batch_size {cfg.batch_size}, block_size "
                           f"{cfg.block_size}, n_embd {cfg.n_embd}, n_layer {cfg.n_layer}; "
                           "lower them (or raise --grad_accum)") from None
        if ddp[1] > 1:
            torch.distributed.destroy_process_group()
    except (BadInput, Diverged, KeyboardInterrupt) as e:  # one line; exit 2, 3 or 130
        code, what = {BadInput: (2, "error: "), Diverged: (3, "diverged: ")}.get(type(e), (130, ""))
        if code == 2 and created and not any("ckpt.pt" in f for _, _, f in os.walk(created)):
            shutil.rmtree(created, ignore_errors=True)  # (a run with a checkpoint is kept)
        print(f"{SCRIPT}.py: {what}{str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
