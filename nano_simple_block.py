"""
nano_simple_block.py -- "Simplifying Transformer Blocks", in one file.

    Bobby He & Thomas Hofmann, ICLR 2024, arXiv:2311.01906
    official code: https://github.com/bobby-he/simplified_transformers

The story
---------
A standard Pre-LN block has five pieces besides attention and the MLP: two
skip connections, two normalisation layers, and the value and projection
matrices W^V, W^P. The paper asks which of them are needed, removes them one at
a time, and repairs each removal with a signal-propagation argument, until
the block has no skips, no W^V, no W^P and (optionally) no norms -- and still
trains as fast per step as Pre-LN, with 13-16% fewer parameters.

1. Remove the attention skip (alpha_SA = 0). Without it, a deep stack of
   attention layers collapses every token onto the same vector (rank
   collapse). Repair: *shaped attention* (Noci et al. 2023), per head h

       A_h(X) = alpha_h I + beta_h softmax(X W^Q W^K^T X^T / sqrt(d_h) + M) - gamma_h C    (Eq. 5)

   with C = softmax(M) the causal uniform matrix (row i averages tokens 1..i).
   With W^Q = 0 at init the softmax equals C, and alpha = beta = gamma = 1
   makes A = I: every attention layer starts as the identity, so the skip is
   not needed for signal propagation.
2. Remove W^V and W^P (set them to I). At init the attention sub-block is a
   deep *linear* network X -> X prod_l W^V_l W^P_l; the paper shows that when
   W^V, W^P are reparameterised as alpha I + beta dW (Eq. 6) the trained beta/alpha
   go to ~0, i.e. the network *wants* identity values/projections, and smaller
   beta trains faster per step (App. A: a down-weighted branch = a smaller LR).
   So W^V = W^P = I, except the first layer's value matrix
   W_1^V = alpha_V I + beta_V dW which stays (a small gain). This is SAS:

       x_hat = beta_SA * MHA~(Norm_1(x))                              (Eq. 12-13)
       out   = alpha_FF * x_hat + beta_FF * MLP(Norm_2(x_hat))

3. Remove the MLP skip. Sequentially this hurts a lot (needs 10x lower LR);
   the repair is the parallel layout (GPT-J / PaLM), where the identity inside
   shaped attention is the only skip-like path. This is SAS-P:

       out = beta_SA * MHA~(Norm(x)) + beta_FF * MLP(Norm(x))         (Eq. 7, alpha_comb = 0)

4. Remove the norms: "SAS-P, no norm" (Sec. 4.4). Trains, slightly worse per
   step, unstable in fine-tuning; the official code keeps a norm in front of
   block 1 and the final norm, and so do we.

The repair scalars beta_SA = 1, beta_FF = 0.1 (= O(1/sqrt(L)) at L = 18), alpha_FF = 1
and the per-head alpha_h, beta_h, gamma_h are trainable and get no weight decay.

    Pre-LN (Eq. 1)            SAS (Eq. 12-13)               SAS-P (Eq. 7, no skips)

      x                         x                             x
      |------------.            |                             |
      |         RMSNorm       RMSNorm                       RMSNorm
      |            |            |                      .------+------.
      |     MHA: W^Q W^K        | shaped attention     |             |
      |     W^V softmax W^P     | W^Q W^K only     shaped attn      MLP
      |            |            | x beta_SA        W^Q W^K only      |
      + <----------'          x_hat                    | x beta_SA   | x beta_FF
      |------------.            |------------.         '---->(+)<----'
      |         RMSNorm         |         RMSNorm               |
      |           MLP           | x alpha_FF  MLP x beta_FF     out
      + <----------'            + <----------'
      |                         |
     out                       out

Shaped attention on FlashAttention
----------------------------------
The shaped matrix acts linearly on V, so no T x T matrix is ever needed:

    (alpha I + beta A - gamma C) V = beta * SDPA(Q, K, V, causal) + alpha * V - gamma * cummean(V)

where cummean(V)[i] = (1/i) sum_{j<=i} V[j] is computed with a float32 cumsum.
`--attn_impl explicit` builds the T x T matrix as the official code does; the
tests check that both agree in float64.

Blocks (`--block`): preln, parallel, vskip (He et al. 2023's Value-SkipInit as
this paper ran it: shaped attention, trainable orthogonal W^V, W^P), sas, sasp,
sasp_nonorm. Ablations: `--no-mlp_skip` (skipless MLP in SAS), `--attn_matrix
vskip` (alpha I + beta A, beta = 0 at init, instead of shaped attention),
`--gains layer` (per-layer instead of per-head alpha, beta, gamma), `--beta_ff`,
`--no-trainable_gains`, `--no-first_value`.

Data: the paper trains on Python code (CodeParrot). The offline analogue is
`--dataset pycode` (the Python standard library's source), the default here; the
gpu presets (5000 x 16k = 82M tokens) use `pycode_all` (stdlib + installed packages,
~70-100M GPT-2 tokens), because pycode's ~5M tokens would be repeated ~16 times.

Speed, measured (one H100, bf16, torch.compile, 18 x 768, 12 heads, T 128, B 128, `--bench`): with trainable gains
SAS-P runs at 1.05x the tokens/s of Pre-LN (paper: 1.16x, Crammed BERT on an RTX 2080Ti), SAS 1.01x, parallel
1.08x, SAS-P without norms 1.17x, SAS-P with frozen gains 1.13x, V-SkipInit 0.94x. The GEMMs shrink by the FLOP
ratio (1.15x); the shaped-attention epilogue and the gains' gradients cost about what the removed norm, skips and
W^V/W^P elementwise work saved. `--epilogue triton` fuses the epilogue into one kernel each way: SAS-P 1.055x.

Run
---
    python nano_simple_block.py --block sasp                  # laptop CPU, a few minutes
    python nano_simple_block.py --preset gpu --block sasp     # paper's shape: 18 x 768, 12 heads, T 128
    python nano_simple_block.py --compare preln,parallel,sas,sasp,sasp_nonorm   # same seed + data order, plots
    python nano_simple_block.py --preset gpu --bench preln,parallel,vskip,sas,sasp,sasp_nonorm  # tokens/s table
    torchrun --nproc_per_node 8 nano_simple_block.py --preset gpu --block sas  # DDP
"""


import argparse
import contextlib
import csv
import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCKS = ("preln", "parallel", "vskip", "sas", "sasp", "sasp_nonorm")
SHAPED_BLOCKS = ("vskip", "sas", "sasp", "sasp_nonorm")  # blocks with a skipless, shaped attention sub-block


def _f(default, help, choices=None):
    """A config field with its --help text (and choices) attached."""
    return field(default=default, metadata={"help": help, "choices": choices})


# ----------------------------------------------------------------------------------------------------------------------
# Config
@dataclass
class Config:
    # --- model
    block: str = _f("sasp", "block type (paper Sec. 3-4)", BLOCKS)
    n_layer: int = _f(6, "number of blocks L (paper: 18)")
    n_head: int = _f(4, "attention heads H (paper: 12)")
    n_embd: int = _f(128, "width d (paper: 768)")
    block_size: int = _f(128, "context length T (paper: 128)")
    mlp_ratio: int = _f(4, "MLP hidden width = mlp_ratio * d (paper: 4, ReLU)")
    vocab_size: int = _f(0, "vocabulary size; 0 = from the dataset (bench: GPT-2's 50257), padded to a multiple of 64")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon (official code: 1e-5)")
    attn_impl: str = _f("sdpa", "sdpa: FlashAttention + O(T) terms; explicit: T x T matrix (reference)", ("sdpa", "explicit"))
    attn_matrix: str = _f("shaped", "skipless attention matrix: shaped (Eq. 5) or vskip (Eq. 4: alpha I + beta A, beta=0 init)",
                          ("shaped", "vskip"))
    gains: str = _f("head", "alpha, beta, gamma per head (paper) or one per layer (ablation)", ("head", "layer"))
    beta_sa: float = _f(1.0, "init of beta_SA, the attention branch gain of the simplified blocks")
    beta_ff: float = _f(-1.0, "init of beta_FF (MLP branch gain); <0: 0.1*sqrt(18/n_layer), the paper's 0.1 at L=18")
    mlp_skip: bool = _f(True, "keep the MLP skip alpha_FF in sas/vskip (--no-mlp_skip: skipless MLP ablation)")
    first_value: bool = _f(True, "keep the first block's W_1^V = alpha_V I + beta_V dW in sas/sasp/sasp_nonorm")
    trainable_gains: bool = _f(True, "train the scalar gains (paper: yes); --no-trainable_gains freezes them")
    cummean: str = _f("cumsum", "C @ V: cumsum (float32 scan) or matmul (tril(ones) @ V on the tensor cores: float32 "
                                "accumulation, the sum rounded once to the activation dtype)", ("cumsum", "matmul"))
    epilogue: str = _f("torch", "shaped-attention epilogue: torch (compiled PyTorch ops) or triton (hand-written fused "
                                "forward/backward kernels; CUDA, T <= 512)", ("torch", "triton"))
    # --- data
    dataset: str = _f("pycode", "shakespeare | pycode (Python stdlib, offline; the paper trains on Python code) | "
                                "pycode_all | path to a text file")
    tokenizer: str = _f("char", "char | gpt2 (the cpu preset uses char, the gpu presets gpt2)", ("char", "gpt2"))
    data_dir: str = _f("", "where source text files are looked for (default: $NANO_DATA_DIR or data/)")
    # --- training (paper: AdamW (0.9, 0.999), eps 1e-8, wd 0.1, clip 1, 5% warmup + linear decay, lr 1e-3)
    batch_size: int = _f(16, "sequences per micro-batch (paper: 128)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    max_iters: int = _f(600, "optimizer steps")
    lr: float = _f(3e-3, "peak learning rate (paper: 1e-3 at 18 x 768)")
    min_lr: float = _f(0.0, "final learning rate")
    warmup_iters: int = _f(-1, "linear warmup steps; <0: 5% of max_iters (paper)")
    schedule: str = _f("linear", "decay after warmup: linear (paper, Fig. 11) or cosine", ("linear", "cosine"))
    weight_decay: float = _f(0.1, "AdamW weight decay on matrices and embeddings only")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2 (paper: 0.999)")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm (0 = off)")
    eval_interval: int = _f(100, "evaluate / log / checkpoint every this many steps")
    eval_iters: int = _f(10, "batches per evaluation")
    log_interval: int = _f(10, "update the progress bar every this many steps")
    progress: bool = _f(True, "show the tqdm progress bar (--no-progress for logs redirected to a file)")
    seed: int = _f(1337, "random seed (model init and data order)")
    halt_at: int = _f(0, "stop after this step as if interrupted (tests --resume); 0 = never")
    resume: bool = _f(False, "continue from out_dir/ckpt.pt")
    # --- system
    device: str = _f("auto", "auto: cuda > mps > cpu", ("auto", "cpu", "cuda", "mps"))
    dtype: str = _f("auto", "auto: bfloat16 on CUDA, float32 elsewhere", ("auto", "float32", "bfloat16", "float16"))
    compile: bool = _f(None, "torch.compile (default: on for CUDA, off elsewhere)")
    compile_mode: str = _f("default", "torch.compile mode",
                           ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    out_dir: str = _f("out_simple_block", "output directory")
    sample_tokens: int = _f(200, "tokens of text sampled at the end (0 = none)")
    # --- modes
    preset: str = _f("auto", "named config: cpu (laptop, minutes), gpu (paper shape), gpu_mini (12 x 512 miniature); "
                             "auto = gpu if CUDA else cpu; explicit flags override", ("auto", "cpu", "gpu", "gpu_mini", "none"))
    compare: str = _f("", "comma list of blocks to train one after another (same seed, same data), e.g. preln,sas,sasp")
    bench: str = _f("", "comma list of blocks to time (random tokens, one process); entries may carry overrides, "
                        "e.g. sasp:cummean=matmul:gains=layer")
    bench_warmup: int = _f(5, "bench: untimed steps per model (the first compiles)")
    bench_iters: int = _f(15, "bench: timed steps per model per round")
    bench_rounds: int = _f(3, "bench: interleaved timing rounds (best round is reported)")
    profile: bool = _f(False, "bench: also write a torch.profiler kernel summary per block")


PRESETS = {
    # a laptop CPU in a few minutes: 6 x 128, char tokens of Python source
    "cpu": dict(n_layer=6, n_head=4, n_embd=128, block_size=128, batch_size=16, max_iters=600, lr=3e-3,
                eval_interval=100, eval_iters=10, tokenizer="char", dataset="pycode"),
    # the paper's CodeParrot shape (18 x 768, 12 heads, T 128, batch 128); 5000 steps = 82M tokens (paper: 43K)
    "gpu": dict(n_layer=18, n_head=12, n_embd=768, block_size=128, batch_size=128, max_iters=5000, lr=1e-3,
                eval_interval=250, eval_iters=50, tokenizer="gpt2", dataset="pycode_all"),
    # a miniature for quick GPU runs: 12 x 512, 8 heads
    "gpu_mini": dict(n_layer=12, n_head=8, n_embd=512, block_size=128, batch_size=128, max_iters=5000, lr=1e-3,
                     eval_interval=250, eval_iters=50, tokenizer="gpt2", dataset="pycode_all"),
}
ARCH_FIELDS = ("block", "n_layer", "n_head", "n_embd", "block_size", "mlp_ratio", "attn_matrix", "gains",
               "mlp_skip", "first_value", "trainable_gains")


# ----------------------------------------------------------------------------------------------------------------------
# Model: norms, shaped attention, MLP, the six blocks


class RMSNorm(nn.Module):
    """RMSNorm(x) = g * x / sqrt(mean(x^2) + eps), computed in float32."""

    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):  # (B, T, d)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


def cummean(v, how="cumsum"):
    """C @ v for the causal uniform matrix C (C_ij = 1/i for j <= i, rows 1-indexed), along dim -2.

    v: (..., T, C) -> (..., T, C) in float32 (float64 stays float64). "cumsum": a float32 cumulative sum;
    "matmul": tril(ones) @ v on the tensor cores (float32 accumulation, the sum rounded once to v.dtype)."""
    T = v.size(-2)
    acc = torch.promote_types(v.dtype, torch.float32)
    n = torch.arange(1, T + 1, device=v.device, dtype=acc).view(T, 1)  # (T, 1): i = 1..T
    if how == "matmul":  # tril(ones) @ v: tensor cores accumulate in float32, the sum is rounded once to v.dtype
        ones = torch.ones(T, T, device=v.device, dtype=v.dtype).tril()
        return (ones @ v).to(acc) / n
    return v.to(acc).cumsum(-2) / n


def causal_uniform(T, device=None, dtype=None):
    """C = softmax(M): the (T, T) causal uniform matrix."""
    n = torch.arange(1, T + 1, device=device, dtype=dtype).view(T, 1)
    return torch.ones(T, T, device=device, dtype=dtype).tril() / n


# ----------------------------------------------------------------------------------------------------------------------
# Optional fast path (--epilogue triton, CUDA only): the shaped-attention epilogue
#     y = beta_h * O + alpha_h * V - gamma_h * cummean(V)
# and its backward as two hand-written Triton kernels, one program per (batch, head, d_h tile), the cumulative sums
# in float32 registers. The backward writes dO, dV and per-program partial sums of the gains' gradients in one pass:
#     dO = beta_h g,   dV = alpha_h g - gamma_h C^T g,   d alpha_h = sum g V,  d beta_h = sum g O,  d gamma_h = -sum g CV
# where (C^T g)_s = sum_{t >= s} g_t / t. Registered as torch.library custom ops, so torch.compile treats them as
# opaque kernels; the tests check them against the PyTorch path (Triton's CPU interpreter, TRITON_INTERPRET=1).

_EPILOGUE_OPS = {}


def triton_epilogue_ops():
    """Build (once) and return the Triton epilogue custom op; None where Triton or torch.library.custom_op is missing."""
    if "op" in _EPILOGUE_OPS:
        return _EPILOGUE_OPS["op"]
    _EPILOGUE_OPS["op"] = None
    global triton, tl  # module globals: older Triton (3.0) looks up `tl` in the kernel's globals, not its closure
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    if not hasattr(torch.library, "custom_op"):
        return None

    @triton.jit
    def _fwd(O, V, Y, A, Bt, C, H, T, DH, so_b, so_t, so_h, sv_b, sv_t, sv_h, sy_b, sy_t, sy_h,
             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid, pd = tl.program_id(0), tl.program_id(1)
        bi, hi = pid // H, pid % H
        t = tl.arange(0, BLOCK_T)
        dd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = (t[:, None] < T) & (dd[None, :] < DH)
        o = tl.load(O + bi * so_b + hi * so_h + t[:, None] * so_t + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + bi * sv_b + hi * sv_h + t[:, None] * sv_t + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        a, b, c = tl.load(A + hi), tl.load(Bt + hi), tl.load(C + hi)
        n = (t + 1).to(tl.float32)
        cm = tl.cumsum(v, axis=0) / n[:, None]  # C V, float32
        y = b * o + a * v - c * cm
        tl.store(Y + bi * sy_b + hi * sy_h + t[:, None] * sy_t + dd[None, :], y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd(G, O, V, DO, DV, A, Bt, C, PA, PB, PC, H, T, DH, sg_b, sg_t, sg_h, so_b, so_t, so_h,
             sv_b, sv_t, sv_h, sy_b, sy_t, sy_h, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        pid, pd = tl.program_id(0), tl.program_id(1)
        bi, hi = pid // H, pid % H
        t = tl.arange(0, BLOCK_T)
        dd = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = (t[:, None] < T) & (dd[None, :] < DH)
        g = tl.load(G + bi * sg_b + hi * sg_h + t[:, None] * sg_t + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        o = tl.load(O + bi * so_b + hi * so_h + t[:, None] * so_t + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + bi * sv_b + hi * sv_h + t[:, None] * sv_t + dd[None, :], mask=mask, other=0.0).to(tl.float32)
        a, b, c = tl.load(A + hi), tl.load(Bt + hi), tl.load(C + hi)
        n = (t + 1).to(tl.float32)
        x = g / n[:, None]
        ctg = tl.sum(x, axis=0)[None, :] - tl.cumsum(x, axis=0) + x  # (C^T g)_s = sum_{t >= s} g_t / t
        out = bi * sy_b + hi * sy_h + t[:, None] * sy_t + dd[None, :]
        tl.store(DO + out, (b * g).to(DO.dtype.element_ty), mask=mask)
        tl.store(DV + out, (a * g - c * ctg).to(DV.dtype.element_ty), mask=mask)
        cm = tl.cumsum(v, axis=0) / n[:, None]
        p = pid * tl.num_programs(1) + pd
        tl.store(PA + p, tl.sum(tl.sum(g * v, axis=1), axis=0))
        tl.store(PB + p, tl.sum(tl.sum(g * o, axis=1), axis=0))
        tl.store(PC + p, -tl.sum(tl.sum(g * cm, axis=1), axis=0))

    def _launch_shape(v):
        B, T, H, dh = v.shape
        block_d = min(triton.next_power_of_2(dh), 32)
        return B, T, H, dh, triton.next_power_of_2(T), block_d, (B * H, triton.cdiv(dh, block_d))

    def _last_dim_contiguous(x):
        return x if x.stride(-1) == 1 else x.contiguous()

    @torch.library.custom_op("nano_simple_block::shaped_epilogue", mutates_args=())
    def shaped_epilogue(o: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                        c: torch.Tensor) -> torch.Tensor:
        o, v = _last_dim_contiguous(o), _last_dim_contiguous(v)
        B, T, H, dh, BT, BD, grid = _launch_shape(v)
        y = torch.empty((B, T, H, dh), dtype=v.dtype, device=v.device)
        _fwd[grid](o, v, y, a, b, c, H, T, dh, o.stride(0), o.stride(1), o.stride(2), v.stride(0), v.stride(1),
                   v.stride(2), y.stride(0), y.stride(1), y.stride(2), BLOCK_T=BT, BLOCK_D=BD, num_warps=4)
        return y

    @shaped_epilogue.register_fake
    def _(o, v, a, b, c):
        return torch.empty(v.shape, dtype=v.dtype, device=v.device)

    @torch.library.custom_op("nano_simple_block::shaped_epilogue_bwd", mutates_args=())
    def shaped_epilogue_bwd(g: torch.Tensor, o: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:
        g, o, v = _last_dim_contiguous(g), _last_dim_contiguous(o), _last_dim_contiguous(v)
        B, T, H, dh, BT, BD, grid = _launch_shape(v)
        do = torch.empty((B, T, H, dh), dtype=o.dtype, device=v.device)
        dv = torch.empty((B, T, H, dh), dtype=v.dtype, device=v.device)
        parts = torch.empty(3, grid[0] * grid[1], dtype=torch.float32, device=v.device)
        _bwd[grid](g, o, v, do, dv, a, b, c, parts[0], parts[1], parts[2], H, T, dh, g.stride(0), g.stride(1),
                   g.stride(2), o.stride(0), o.stride(1), o.stride(2), v.stride(0), v.stride(1), v.stride(2),
                   do.stride(0), do.stride(1), do.stride(2), BLOCK_T=BT, BLOCK_D=BD, num_warps=8)
        da, db, dc = (parts[i].view(B, H, grid[1]).sum(dim=(0, 2)).to(x.dtype) for i, x in enumerate((a, b, c)))
        return do, dv, da, db, dc  # (a custom op's outputs may not alias each other: three separate sums)

    @shaped_epilogue_bwd.register_fake
    def _(g, o, v, a, b, c):
        return (torch.empty(v.shape, dtype=o.dtype, device=v.device), torch.empty(v.shape, dtype=v.dtype,
                device=v.device), torch.empty_like(a), torch.empty_like(b), torch.empty_like(c))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, g):
        o, v, a, b, c = ctx.saved_tensors
        return shaped_epilogue_bwd(g, o, v, a, b, c)

    shaped_epilogue.register_autograd(backward, setup_context=setup_context)
    _EPILOGUE_OPS["op"] = shaped_epilogue
    return shaped_epilogue


class Attention(nn.Module):
    """Multi-head attention in all the paper's flavours.

    matrix: "softmax" (Eq. 2, Pre-LN / parallel), "shaped" (Eq. 5), "vskip" (Eq. 4).
    values: "matrix" (a trainable W^V), "identity" (no W^V: the head split of the input is V),
            "first" (W_1^V = alpha_V I + beta_V dW, the first block of SAS / SAS-P).
    W^P is kept for preln / parallel / vskip and removed (= I) in sas / sasp / sasp_nonorm."""

    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        d, H = cfg.n_embd, cfg.n_head
        self.n_head, self.d = H, d
        self.attn_impl, self.cummean_how = cfg.attn_impl, cfg.cummean
        self.epilogue = triton_epilogue_ops() if cfg.epilogue == "triton" else None
        if cfg.epilogue == "triton" and self.epilogue is None:
            raise RuntimeError("--epilogue triton needs Triton and torch.library.custom_op (torch >= 2.4)")
        self.epilogue_on_cpu = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)
        shaped = cfg.block in SHAPED_BLOCKS
        self.matrix = "softmax" if not shaped else cfg.attn_matrix
        if cfg.block in ("preln", "parallel", "vskip"):
            self.values, self.has_proj = "matrix", True
        else:
            self.values = "first" if (layer_idx == 0 and cfg.first_value) else "identity"
            self.has_proj = False
        # W^Q and W^K fused, with biases (the only biases in the model, as in the official code)
        self.c_qk = nn.Linear(d, 2 * d, bias=True)
        if self.values == "matrix":
            self.c_v = nn.Linear(d, d, bias=False)  # W^V
        if self.values == "first":
            # Eq. 6 for the first value matrix: W_1^V = alpha_V I + beta_V dW, dW = 0 at init, alpha_V = beta_V = 1
            self.dW_v = nn.Parameter(torch.zeros(d, d))
            _gain(self, "alpha_v", torch.tensor(1.0), cfg.trainable_gains)
            _gain(self, "beta_v", torch.tensor(1.0), cfg.trainable_gains)
            self.register_buffer("eye", torch.eye(d), persistent=False)
        if self.has_proj:
            self.c_proj = nn.Linear(d, d, bias=False)  # W^P
        if shaped:
            n = H if cfg.gains == "head" else 1
            # Eq. 5 / Eq. 4: head-wise alpha_h, beta_h (, gamma_h), trainable, no weight decay
            _gain(self, "alpha", torch.ones(n), cfg.trainable_gains)
            _gain(self, "beta", torch.ones(n) if self.matrix == "shaped" else torch.zeros(n), cfg.trainable_gains)
            if self.matrix == "shaped":
                _gain(self, "gamma", torch.ones(n), cfg.trainable_gains)

    def in_weights(self):
        """The matrices that multiply the block's normalised input h: [W^Q; W^K] and, if any, W^V."""
        ws = [self.c_qk.weight]  # (2d, d)
        if self.values == "matrix":
            ws.append(self.c_v.weight)  # (d, d)
        elif self.values == "first":
            # W_1^V = alpha_V I + beta_V dW  (Sec. 4.2, fn. 6): one (d, d) matrix, so still a single GEMM
            ws.append(self.alpha_v * self.eye + self.beta_v * self.dW_v)
        return ws

    def n_in(self):
        return 3 * self.d if self.values != "identity" else 2 * self.d

    def forward(self, h, scale=None):  # (B, T, d) -> (B, T, d)
        z = F.linear(h, torch.cat(self.in_weights()))  # (B, T, 2d or 3d)
        return self.from_projections(z, h, scale)

    def from_projections(self, z, h, scale=None):
        """z = h @ [W^Q; W^K; (W^V)]^T, h the normalised input (B, T, d). scale: a branch gain (beta_SA) folded
        into the per-head coefficients, so it costs no pass over the activations."""
        B, T, d = h.shape
        H, dh = self.n_head, d // self.n_head
        bias = self.c_qk.bias.to(z.dtype)  # (bf16 under autocast: a float32 bias would promote q, k to float32)
        q = (z[..., :d] + bias[:d]).view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        k = (z[..., d:2 * d] + bias[d:]).view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        # SAS: no W^V, the values are the head split of the normalised input itself (Eq. 13)
        v = z[..., 2 * d:3 * d] if self.values != "identity" else h.to(z.dtype)
        v = v.reshape(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        if self.matrix == "softmax":
            y = self.softmax_attention(q, k, v)
        else:
            y = self.shaped_attention(q, k, v, scale)
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d): concat heads
        if self.has_proj:
            y = self.c_proj(y)  # W^P (Eq. 3)
        return y

    def softmax_attention(self, q, k, v):
        if self.attn_impl == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # Eq. 2: A = softmax(Q K^T / sqrt(d_h) + M), then A V
        return self.softmax_matrix(q, k) @ v

    @staticmethod
    def softmax_matrix(q, k):  # (B, H, T, T)
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return att.masked_fill(~causal, float("-inf")).softmax(-1)

    def coefficients(self, scale=None):
        """(alpha, beta, gamma) as (H or 1, 1, 1) tensors, times the branch gain if given."""
        H = self.alpha.numel()
        a, b = self.alpha, self.beta
        c = self.gamma if self.matrix == "shaped" else torch.zeros_like(a)
        if scale is not None:
            a, b, c = a * scale, b * scale, c * scale
        return a.view(H, 1, 1), b.view(H, 1, 1), c.view(H, 1, 1)

    def shaped_attention(self, q, k, v, scale=None):
        a, b, c = self.coefficients(scale)
        if self.attn_impl == "explicit":
            # Eq. 5 as the official code computes it: A = alpha I + beta softmax(QK^T/sqrt(d_h) + M) - gamma C
            T = q.size(-2)
            eye = torch.eye(T, device=q.device, dtype=q.dtype)
            A = b * self.softmax_matrix(q, k) + a * eye - c * causal_uniform(T, q.device, q.dtype)  # (B, H, T, T)
            return A @ v
        # (alpha I + beta A - gamma C) V = beta SDPA(Q, K, V) + alpha V - gamma cummean(V); no T x T matrix.
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, dh)
        if self.epilogue is not None and self.matrix == "shaped" and (v.is_cuda or self.epilogue_on_cpu) \
                and q.size(-2) <= 512:
            # optional hand-written kernel: the same three terms, forward and backward in one pass each
            gains = [g.reshape(-1).expand(self.n_head).contiguous().float() for g in (a, b, c)]  # (H,) each
            return self.epilogue(o.transpose(1, 2), v.transpose(1, 2), *gains).transpose(1, 2)  # (B, H, T, dh)
        # The three terms are combined in float32 and rounded once; torch.compile fuses them (and their gradients).
        acc = torch.promote_types(v.dtype, torch.float32)
        y = b * o.to(acc) + a * v.to(acc)
        if self.matrix == "shaped":
            y = y - c * cummean(v, self.cummean_how)
        return y.to(v.dtype)


class MLP(nn.Module):
    """MLP(x) = ReLU(x W_in) W_out, no biases, hidden 4d (paper, CodeParrot)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=False)

    def out_weight(self, scale=None):
        # beta_FF * (r W_out) = r (beta_FF W_out): the gain multiplies the (d, 4d) weight, not the (B, T, d) output;
        # the same function and gradients, but the gain's gradient is a weight-sized reduction.
        return self.c_proj.weight if scale is None else scale * self.c_proj.weight

    def forward(self, h, scale=None):  # (B, T, d) -> (B, T, d)
        return F.linear(F.relu(self.c_fc(h)), self.out_weight(scale))


def _gain(module, name, init, trainable):
    """Register a scalar gain: a parameter (no weight decay: it is < 2-D) or, when frozen, a buffer."""
    if trainable:
        setattr(module, name, nn.Parameter(init.clone()))
    else:
        module.register_buffer(name, init.clone())


def default_beta_ff(cfg):
    return cfg.beta_ff if cfg.beta_ff >= 0 else 0.1 * math.sqrt(18 / cfg.n_layer)


class Block(nn.Module):
    """One transformer block of type cfg.block (paper Sec. 3-4)."""

    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.kind = cfg.block
        d = cfg.n_embd
        use_norm = cfg.block != "sasp_nonorm" or layer_idx == 0  # no-norm keeps a norm in front of block 1 (code)
        self.norm1 = RMSNorm(d, cfg.norm_eps) if use_norm else nn.Identity()
        if cfg.block in ("preln", "vskip", "sas"):
            self.norm2 = RMSNorm(d, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.mlp_skip = cfg.mlp_skip
        if cfg.block in SHAPED_BLOCKS:
            _gain(self, "beta_sa", torch.tensor(float(cfg.beta_sa)), cfg.trainable_gains)
            _gain(self, "beta_ff", torch.tensor(float(default_beta_ff(cfg))), cfg.trainable_gains)
            if cfg.block in ("vskip", "sas") and cfg.mlp_skip:
                _gain(self, "alpha_ff", torch.tensor(1.0), cfg.trainable_gains)  # trainable in the official code

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        if self.kind == "preln":
            # Eq. 1 with alpha = beta = 1: X_hat = X + MHA(Norm(X)), X_out = X_hat + MLP(Norm(X_hat))
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        if self.kind in ("sas", "vskip"):
            # Eq. 12-13: X_hat = beta_SA MHA~(Norm_1(X))   (no attention skip; beta_SA folded into alpha_h, beta_h, gamma_h)
            x_hat = self.attn(self.norm1(x), scale=self.beta_sa)
            # X_out = alpha_FF X_hat + beta_FF MLP(Norm_2(X_hat))
            m = self.mlp(self.norm2(x_hat), scale=self.beta_ff)
            return self.alpha_ff * x_hat + m if self.mlp_skip else m
        # parallel blocks: one norm, and one GEMM computes both branches' inputs (PaLM's fusion)
        h = self.norm1(x)  # (B, T, d)
        n_in = self.attn.n_in()
        z = F.linear(h, torch.cat(self.attn.in_weights() + [self.mlp.c_fc.weight]))  # (B, T, n_in + 4d)
        r = F.relu(z[..., n_in:])  # (B, T, 4d)
        if self.kind == "parallel":
            # Eq. 7 with alpha_comb = beta_SA = beta_FF = 1: X_out = X + MHA(Norm(X)) + MLP(Norm(X))
            return x + self.attn.from_projections(z[..., :n_in], h) + F.linear(r, self.mlp.out_weight())
        # SAS-P, Eq. 7 with alpha_comb = 0: X_out = beta_SA MHA~(Norm(X)) + beta_FF MLP(Norm(X))
        y = self.attn.from_projections(z[..., :n_in], h, scale=self.beta_sa)  # (B, T, d)
        B, T, d = y.shape
        # the sum is done by the GEMM itself: out = y + r (beta_FF W_out)^T
        out = torch.addmm(y.reshape(B * T, d), r.reshape(B * T, -1), self.mlp.out_weight(self.beta_ff).t())
        return out.view(B, T, d)


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
                # W^Q = 0: logits are 0, softmax = C, and the shaped matrix alpha I + beta C - gamma C = I (Sec. 4.1)
                nn.init.zeros_(att.c_qk.weight[:d])
            if cfg.block == "vskip":
                # He et al. 2023: independent random-orthogonal, trainable W^V and W^P
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


def count_params(model):
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def param_formula(cfg: Config, block: str) -> int:
    """Trainable parameters of GPT(cfg with block), from the table of Sec. 1.11 (tested against the real model)."""
    d, L, H, V, T, f = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size, cfg.block_size, cfg.mlp_ratio
    g = 1 if cfg.trainable_gains else 0
    total = V * d + T * d + d  # tied embedding, positions, final norm
    for i in range(L):
        n = 2 * d * d + 2 * d + 2 * f * d * d  # W^Q, W^K, Q/K biases, W_in, W_out
        if block == "preln":
            n += 2 * d * d + 2 * d  # W^V, W^P, 2 norms
        elif block == "parallel":
            n += 2 * d * d + d  # W^V, W^P, 1 norm
        else:
            heads = H if cfg.gains == "head" else 1
            n += g * heads * (3 if cfg.attn_matrix == "shaped" else 2)  # alpha_h, beta_h (, gamma_h)
            n += g * 2  # beta_SA, beta_FF
            if block == "vskip":
                n += 2 * d * d + 2 * d + g * cfg.mlp_skip  # orthogonal W^V, W^P, 2 norms, alpha_FF
            else:
                if block == "sas":
                    n += 2 * d + g * cfg.mlp_skip  # 2 norms, alpha_FF
                elif block == "sasp" or i == 0:
                    n += d  # 1 norm (sasp_nonorm: only in front of block 1)
                if i == 0 and cfg.first_value:
                    n += d * d + 2 * g  # dW, alpha_V, beta_V
        total += n
    return total


def param_table(cfg: Config):
    base = param_formula(cfg, "preln")
    rows = []
    for b in BLOCKS:
        n = param_formula(cfg, b)
        rows.append({"block": b, "params": n, "reduction_vs_preln": 1 - n / base})
    return rows


def format_param_table(rows):
    lines = ["| block | params | vs Pre-LN |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['params'] / 1e6:.3f}M | {-100 * r['reduction_vs_preln']:+.1f}% |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Training


def make_optimizer(model, cfg, device_type):
    # weight decay only on matrices and embeddings; gains, norms and biases (all < 2-D) get none
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {}
    if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        extra["fused"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, **extra)


def get_lr(step, cfg):
    """Paper: linear warmup over 5% of the steps, then linear decay (to min_lr)."""
    warmup = warmup_iters(cfg)
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    frac = min(1.0, (step - warmup) / max(1, cfg.max_iters - warmup))
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)
    return cfg.lr + frac * (cfg.min_lr - cfg.lr)


def warmup_iters(cfg):
    return cfg.warmup_iters if cfg.warmup_iters >= 0 else int(0.05 * cfg.max_iters)


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
             "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12, "A6000": 155e12,
             "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16.items():
        if key in name:
            return val
    return None


def flops_per_token(model, cfg):
    """6N (matmuls, forward + backward) + the attention scores, as in nanoGPT / PaLM Appendix B."""
    N = count_params(model) - model.wpe.weight.numel()
    return 6 * N + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def resolve_device(cfg):
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg, device):
    if cfg.dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def autocast_ctx(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def maybe_compile(model, cfg, device):
    use = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if not use:
        return model, False
    if not hasattr(torch, "compile") or device.type == "mps":
        print("notice: torch.compile is not available on this platform; running eagerly", file=sys.stderr)
        return model, False
    return torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode), True


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except Exception:
        return None


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


LOG_COLUMNS = ["step", "tokens", "elapsed_s", "train_s", "lr", "train_loss", "val_loss", "tokens_per_s", "mfu",
               "block", "beta_sa_mean", "beta_ff_mean"]


def gain_means(model):
    """Mean of beta_SA and beta_FF over blocks (they are learned; nan for blocks without them)."""
    out = {}
    for name in ("beta_sa", "beta_ff"):
        vals = [float(getattr(b, name).detach()) for b in model.blocks if hasattr(b, name)]
        out[name + "_mean"] = sum(vals) / len(vals) if vals else float("nan")
    return out


@torch.no_grad()
def estimate_loss(model, ds, cfg, device, dtype, rank, world):
    """Mean loss over eval_iters batches of each split; the same batches at every eval (fixed generator)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        losses = torch.zeros(cfg.eval_iters, device=device)
        for i in range(cfg.eval_iters):
            x, y = ds.get_batch(split, cfg.batch_size, cfg.block_size, device=device, generator=gen,
                                rank=rank, world_size=world)
            with autocast_ctx(device, dtype):
                _, loss = model(x, y)
            losses[i] = loss.float()
        if world > 1:
            torch.distributed.all_reduce(losses)
            losses /= world
        out[split] = losses.mean().item()
    model.train()
    return out


def train(cfg: Config, ds, device, ddp=(0, 1), verbose=True):
    """Train GPT(cfg) on ds; writes config.json, log.csv, results.json, ckpt.pt, plots to cfg.out_dir."""
    from tqdm.auto import tqdm

    rank, world = ddp
    master = rank == 0
    dtype = resolve_dtype(cfg, device)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    optimizer = make_optimizer(model, cfg, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    gen = torch.Generator().manual_seed(cfg.seed)  # data order (saved in the checkpoint)
    step, rows, train_s = 0, [], 0.0
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        gen.set_state(ck["rng"]["data"])
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
        step, rows, train_s = ck["step"], ck["log"], ck["train_s"]
    n_params = count_params(model)
    raw_model = model
    cmodel, compiled = maybe_compile(model, cfg, device)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        cmodel = DDP(cmodel, device_ids=[device.index] if device.type == "cuda" else None)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    fpt, peak = flops_per_token(raw_model, cfg), peak_flops(device)
    if master:
        meta = {"config": dataclasses.asdict(cfg), "torch": torch.__version__, "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                "dtype": str(dtype), "compiled": compiled, "world_size": world, "git_commit": git_commit(),
                "params": n_params, "dataset": ds.name, "tokenizer": ds.tokenizer, "data_notes": list(ds.notes)}
        write_json(meta, os.path.join(cfg.out_dir, "config.json"))
        if verbose:
            print(f"{cfg.block}: {n_params / 1e6:.3f}M parameters, {tokens_per_step} tokens/step, device {device}, "
                  f"dtype {dtype}, compile {compiled}")
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not (master and verbose and cfg.progress), dynamic_ncols=True,
               desc=cfg.block)
    t_start = time.time() - (rows[-1]["elapsed_s"] if rows else 0.0)
    t_mark, tokens_mark, loss = time.time(), step * tokens_per_step, None
    while True:
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            if not (cfg.resume and rows and rows[-1]["step"] == step):
                interval = now - t_mark
                train_s += interval
                losses = estimate_loss(cmodel if world == 1 else cmodel.module, ds, cfg, device, dtype, rank, world)
                tps = (step * tokens_per_step - tokens_mark) / interval if step > 0 and interval > 0 else float("nan")
                row = {"step": step, "tokens": step * tokens_per_step, "elapsed_s": round(now - t_start, 3),
                       "train_s": round(train_s, 3), "lr": lr, "train_loss": losses["train"],
                       "val_loss": losses["val"], "tokens_per_s": tps,
                       "mfu": tps * fpt / peak if peak and tps == tps else float("nan"), "block": cfg.block,
                       **gain_means(raw_model)}
                rows.append(row)
                if master:
                    if verbose:
                        bar.write(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f}, "
                                  f"lr {lr:.2e}, {tps:,.0f} tok/s")
                    write_log(rows, os.path.join(cfg.out_dir, "log.csv"))
                    if step > 0 or cfg.max_iters == 0:
                        atomic_save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scaler": scaler.state_dict(), "config": dataclasses.asdict(cfg), "step": step,
                                     "log": rows, "train_s": train_s,
                                     "rng": {"data": gen.get_state(), "torch": torch.get_rng_state(),
                                             "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}},
                                    ckpt_path)
            t_mark, tokens_mark = time.time(), step * tokens_per_step
        if step >= cfg.max_iters or (cfg.halt_at and step >= cfg.halt_at):
            break
        for micro in range(cfg.grad_accum):
            x, y = ds.get_batch("train", cfg.batch_size, cfg.block_size, device=device, generator=gen,
                                rank=rank, world_size=world)
            sync = contextlib.nullcontext()
            if world > 1 and micro < cfg.grad_accum - 1:
                sync = cmodel.no_sync()
            with sync, autocast_ctx(device, dtype):
                _, loss = cmodel(x, y)
            scaler.scale(loss / cfg.grad_accum).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.log_interval == 0 and master and verbose:
            el = max(time.time() - t_mark, 1e-9)  # .item() syncs only every log_interval steps
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{(step * tokens_per_step - tokens_mark) / el:,.0f}")
    bar.close()
    last = rows[-1]
    final = {"train_loss": last["train_loss"], "val_loss": last["val_loss"], "val_ppl": math.exp(last["val_loss"]),
             "tokens_per_s": _mean_tps(rows), "params": n_params, "elapsed_s": last["elapsed_s"],
             "train_s": last["train_s"], "step": last["step"]}
    results = {"script": "nano_simple_block.py", "config": dataclasses.asdict(cfg), "final": final,
               "param_table": param_table(cfg), "paper": PAPER_NUMBERS, "gains": learned_gains(raw_model)}
    if master:
        write_json(results, os.path.join(cfg.out_dir, "results.json"))
        plot_runs({cfg.block: rows}, cfg.out_dir, prefix="loss")
        if cfg.sample_tokens > 0 and verbose:
            prompt = "def " if "pycode" in ds.name else "\n"
            idx = torch.tensor([ds.encode(prompt)], dtype=torch.long, device=device)
            with autocast_ctx(device, dtype):
                text = ds.decode(raw_model.generate(idx, cfg.sample_tokens, ds.vocab_size)[0].tolist())
            print("---- sample ----\n" + text + "\n----------------")
    return results, rows


def _mean_tps(rows):
    """Tokens/s over the run (excluding step 0's interval, which holds compilation)."""
    vals = [r["tokens_per_s"] for r in rows[2:] if r["tokens_per_s"] == r["tokens_per_s"]]
    if not vals:
        vals = [r["tokens_per_s"] for r in rows if r["tokens_per_s"] == r["tokens_per_s"]]
    return sum(vals) / len(vals) if vals else float("nan")


def learned_gains(model):
    """The learned scalars per block (what the paper plots in Figs. 4, 16-20)."""
    out = []
    for b in model.blocks:
        row = {}
        for name in ("beta_sa", "beta_ff", "alpha_ff"):
            if hasattr(b, name):
                row[name] = float(getattr(b, name).detach())
        for name in ("alpha", "beta", "gamma", "alpha_v", "beta_v"):
            if hasattr(b.attn, name):
                row[name] = getattr(b.attn, name).detach().float().cpu().tolist()
        out.append(row)
    return out


def write_log(rows, path):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


PAPER_NUMBERS = {
    "codeparrot_params_M": {"preln": 167, "sas": 146, "reduction": 0.13},
    "bert_speed_vs_preln": {"preln": 1.00, "parallel": 1.05, "vskip": 0.95, "sas": 1.09, "sasp": 1.16,
                            "sasp_nonorm": 1.20},
    "codeparrot_eval_loss_40k": {"preln": 1.155, "sasp_nonorm": 1.245},
    "note": "paper: SAS/SAS-P match Pre-LN per step on CodeParrot (plots only); speeds are Crammed BERT on an RTX 2080Ti",
}


# ----------------------------------------------------------------------------------------------------------------------
# Plots


def plot_runs(runs, out_dir, prefix="loss"):
    """The paper's two plots: validation loss against step and against (training) wall-clock time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for xkey, xlabel, name in (("step", "step", "step"), ("train_s", "training time (s)", "time")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, rows in runs.items():
            pts = [(r[xkey], r["val_loss"]) for r in rows if r["step"] > 0]
            if pts:
                ax.plot(*zip(*pts), label=label, marker=".")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_title(f"validation loss vs {name}")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{prefix}_vs_{name}.png"), dpi=120)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# Comparison and speed benchmark


def run_compare(cfg, ds, device, ddp):
    """Train each block with the same seed and data order; plots + table."""
    runs, table = {}, []
    for b in cfg.compare.split(","):
        sub = dataclasses.replace(cfg, block=b, out_dir=os.path.join(cfg.out_dir, b), compare="")
        os.makedirs(sub.out_dir, exist_ok=True)
        res, rows = train(sub, ds, device, ddp)
        runs[b] = rows
        table.append({"block": b, "params": res["final"]["params"], "tokens_per_s": res["final"]["tokens_per_s"],
                      "train_loss": res["final"]["train_loss"], "val_loss": res["final"]["val_loss"],
                      "train_s": res["final"]["train_s"]})
    if ddp[0] != 0:
        return
    base = next((r for r in table if r["block"] == "preln"), table[0])
    lines = [f"| block | params | vs {base['block']} | tokens/s | speed vs {base['block']} | final train loss | "
             f"final val loss |", "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['block']} | {r['params'] / 1e6:.3f}M | {100 * (r['params'] / base['params'] - 1):+.1f}% | "
                     f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                     f"{r['train_loss']:.4f} | {r['val_loss']:.4f} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(cfg.out_dir, "compare.md"), "w") as f:
        f.write(text + "\n")
    write_json({"script": "nano_simple_block.py", "config": dataclasses.asdict(cfg), "table": table,
                "paper": PAPER_NUMBERS}, os.path.join(cfg.out_dir, "compare.json"))
    plot_runs(runs, cfg.out_dir, prefix="compare_loss")


def parse_bench_entry(entry, cfg):
    """'sasp:cummean=matmul:gains=layer' -> (label, Config)."""
    parts = entry.split(":")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    over = {"block": parts[0]}
    for p in parts[1:]:
        k, _, v = p.partition("=")
        if k not in fields or not v:
            raise ValueError(f"bad bench entry {entry!r}: use block[:field=value...] with a Config field")
        over[k] = _convert(fields[k], v)
    return entry, dataclasses.replace(cfg, **over)


def _convert(f, v):
    typ = type(f.default) if f.default is not None else bool
    if typ is bool:
        if v.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{f.name} takes true/false, got {v!r}")
        return v.lower() in ("1", "true", "yes")
    return typ(v)


def run_bench(cfg, device):
    """Time full training steps (forward, backward, clip, AdamW) of each block in one process, interleaved rounds."""
    dtype = resolve_dtype(cfg, device)
    entries = [parse_bench_entry(e, cfg) for e in cfg.bench.split(",")]
    if hasattr(torch, "_dynamo"):
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    gen = torch.Generator().manual_seed(cfg.seed)
    B, T = cfg.batch_size, cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen).to(device)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(step, n):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return 1000 * (time.perf_counter() - t0) / n

    models = {}
    if cfg.profile and os.path.exists(os.path.join(cfg.out_dir, "profile.txt")):
        os.remove(os.path.join(cfg.out_dir, "profile.txt"))
    for label, c in entries:
        try:
            models[label] = bench_model(c, label, x, y, device, dtype, cfg, timed)
        except Exception as e:  # one failing variant (e.g. a missing Triton) must not cost the others' timings
            print(f"bench {label} failed: {e!r}", file=sys.stderr, flush=True)
    if not models:
        return []
    for r in range(cfg.bench_rounds):  # interleaved rounds: clock drift hits every block alike
        for m in models.values():
            m["ms"].append(timed(m["step"], cfg.bench_iters))
        print(f"round {r}: " + ", ".join(f"{lab} {m['ms'][-1]:.2f} ms" for lab, m in models.items()), flush=True)
        table = write_bench_table(cfg, entries, models, device, dtype)
    print(open(os.path.join(cfg.out_dir, "bench.md")).read())
    for label, m in models.items() if cfg.profile else ():
        try:
            profile_steps(m["step"], label, cfg.out_dir, device)
        except Exception as e:  # the profiler is a diagnostic: never lose the timings to it
            print(f"profile of {label} failed: {e!r}", file=sys.stderr)
    return table


def bench_model(c, label, x, y, device, dtype, cfg, timed):
    """Build, compile and warm up one model; returns its training-step closure and metadata."""
    torch.manual_seed(cfg.seed)
    model = GPT(c).to(device)
    opt = make_optimizer(model, c, device.type)
    cmodel, compiled = maybe_compile(model, c, device)

    def step():
        with autocast_ctx(device, dtype):
            _, loss = cmodel(x, y)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.time()
    for _ in range(cfg.bench_warmup):
        step()
    timed(lambda: None, 1)  # synchronise
    m = {"step": step, "params": count_params(model), "warmup_s": time.time() - t0, "compiled": compiled, "ms": [],
         "fpt": flops_per_token(model, c)}
    print(f"bench {label}: {m['params'] / 1e6:.2f}M params, warm-up {m['warmup_s']:.1f}s, "
          f"first timing {timed(step, cfg.bench_iters):.2f} ms/step", flush=True)
    return m


def write_bench_table(cfg, entries, models, device, dtype):
    """bench.md / bench.json: ms/step (best round), tokens/s, speed and parameters relative to the first preln."""
    B, T = cfg.batch_size, cfg.block_size
    base_label = "preln" if "preln" in models else next(iter(models))
    peak = peak_flops(device)
    table = []
    for label, m in models.items():
        ms = min(m["ms"])
        tps = B * T / (ms / 1000)
        table.append({"block": label, "params": m["params"], "ms_per_step": ms, "ms_rounds": m["ms"],
                      "tokens_per_s": tps, "mfu": tps * m["fpt"] / peak if peak else None,
                      "warmup_s": m["warmup_s"], "compiled": m["compiled"]})
    base = next(r for r in table if r["block"] == base_label)
    for r in table:
        r["speed_vs_base"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["params_vs_base"] = r["params"] / base["params"] - 1
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    head = (f"device {dev_name}, torch {torch.__version__}, dtype {dtype}, compile {table[0]['compiled']} "
            f"({cfg.compile_mode}), L {cfg.n_layer}, d {cfg.n_embd}, H {cfg.n_head}, T {T}, B {B}, "
            f"vocab {cfg.vocab_size}; best of {len(table[0]['ms_rounds'])} rounds x {cfg.bench_iters} steps")
    lines = [head, "", f"| block | params | vs {base_label} | ms/step | tokens/s | speed vs {base_label} | MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        lines.append(f"| {r['block']} | {r['params'] / 1e6:.2f}M | {100 * r['params_vs_base']:+.1f}% | "
                     f"{r['ms_per_step']:.2f} | {r['tokens_per_s']:,.0f} | {r['speed_vs_base']:.3f}x | {mfu} |")
    with open(os.path.join(cfg.out_dir, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_json({"script": "nano_simple_block.py", "header": head, "config": dataclasses.asdict(cfg),
                "table": table}, os.path.join(cfg.out_dir, "bench.json"))
    return table


def profile_steps(step, label, out_dir, device, n=3):
    """Where the time goes: kernel time by category, and the top kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    cats, total = {}, 0.0
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0.0)
        if not t or ev.key.startswith(("ProfilerStep", "Optimizer.")) or getattr(ev, "is_user_annotation", False):
            continue  # user annotations (e.g. Optimizer.step#AdamW.step) would count their kernels twice
        if str(ev.device_type).endswith("CPU"):
            continue
        k = ev.key.lower()
        if k.startswith("triton_poi"):  # inductor's kernels first: their names mention the ops they fused
            cat = "triton pointwise"
        elif k.startswith("triton_red") or k.startswith("triton_per"):
            cat = "triton reductions (norms, gain grads, loss)"
        elif k.startswith("triton"):
            cat = "triton other (scans, templates)"
        elif "flash" in k or "fmha" in k or "sdpa" in k or "attention" in k:
            cat = "attention (flash / cuDNN)"
        elif any(s in k for s in ("gemm", "cutlass", "nvjet", "sm90_", "sm80_", "xmma", "matmul")):
            cat = "matmul"
        elif "adam" in k or "foreach" in k or "multi_tensor" in k:
            cat = "optimizer / grad clip"
        else:
            cat = "other"
        cats[cat] = cats.get(cat, 0.0) + t
        total += t
        rows.append((t, ev.count, ev.key[:110]))
    rows.sort(reverse=True)
    lines = [f"profile of {label}: {n} training steps, device time {total / 1000 / n:.2f} ms/step", ""]
    for c, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        lines.append(f"{c:42s} {t / 1000 / n:8.2f} ms/step  {100 * t / total:5.1f}%")
    lines += ["", "top kernels (ms/step, calls/step, name):"]
    for t, cnt, key in rows[:30]:
        lines.append(f"{t / 1000 / n:8.3f} {cnt / n:6.0f}  {key}")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out_dir, "profile.txt"), "a") as f:  # one file, a section per block
        f.write(text + "\n\n")


# ----------------------------------------------------------------------------------------------------------------------
# Command line


class UsageError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (problem + fix) and exit status 2."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser(suppress_defaults=False):
    """argparse generated from Config: every field is a flag (booleans as --x/--no-x), with its default."""
    p = OneLineParser(description="Simplifying Transformer Blocks (He & Hofmann, ICLR 2024) in one file.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                add_help=not suppress_defaults)
    for f in dataclasses.fields(Config):
        default = argparse.SUPPRESS if suppress_defaults else f.default
        help_ = f.metadata.get("help", "").replace("%", "%%")
        if f.name == "compile" or isinstance(f.default, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=default, choices=f.metadata.get("choices"),
                           help=help_)
    return p


def parse_config(argv=None):
    """Config = defaults, then the preset, then the flags given explicitly."""
    args = build_parser().parse_args(argv)  # validates choices and types, handles --help
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))  # only the flags actually given
    preset = args.preset
    if preset == "auto":
        preset = "gpu" if (args.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu"
    values = {f.name: f.default for f in dataclasses.fields(Config)}
    if preset != "none":
        values.update(PRESETS[preset])
    values.update(explicit)
    values["preset"] = preset
    return Config(**values)


def validate(cfg: Config):
    """Every check that can fail before anything is written."""
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_interval",
                 "eval_iters", "mlp_ratio", "log_interval", "bench_rounds", "bench_iters"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name} must be positive (got {getattr(cfg, name)})")
    if cfg.max_iters < 0:
        raise UsageError("--max_iters must be >= 0")
    if cfg.n_embd % cfg.n_head:
        raise UsageError(f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}; pick a multiple")
    if cfg.compare and cfg.bench:
        raise UsageError("--compare and --bench are separate modes; give one of them")
    blocks = [cfg.block]
    if cfg.compare:
        blocks = cfg.compare.split(",")
    if cfg.bench:
        try:
            blocks = [parse_bench_entry(e, cfg)[1].block for e in cfg.bench.split(",")]
            for _, c in (parse_bench_entry(e, cfg) for e in cfg.bench.split(",")):
                if c.n_embd % c.n_head:
                    raise ValueError(f"n_embd {c.n_embd} not divisible by n_head {c.n_head}")
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
    for b in blocks:
        if b not in BLOCKS:
            raise UsageError(f"unknown block {b!r}; choose from {', '.join(BLOCKS)}")
    if not cfg.compare and not cfg.bench:
        if cfg.block not in SHAPED_BLOCKS and (cfg.attn_matrix != "shaped" or cfg.gains != "head"):
            raise UsageError(f"--attn_matrix/--gains change shaped attention, which --block {cfg.block} does not have; "
                             f"use one of {', '.join(SHAPED_BLOCKS)}")
        if not cfg.mlp_skip and cfg.block not in ("sas", "vskip"):
            raise UsageError("--no-mlp_skip (skipless MLP ablation) applies to --block sas or vskip only")
    if cfg.epilogue == "triton" and not cfg.bench:
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise UsageError("--epilogue triton needs the triton package (it ships with CUDA builds of torch); "
                             "use --epilogue torch")
    if cfg.halt_at < 0:
        raise UsageError("--halt_at must be >= 0")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available; use --device cpu")
    if cfg.device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps requested but MPS is not available; use --device cpu")
    if cfg.resume:
        if cfg.compare or cfg.bench:
            raise UsageError("--resume works for a single training run, not with --compare/--bench")
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        if not os.path.isfile(path):
            raise UsageError(f"--resume: no checkpoint at {path}; run without --resume first")
        ck = torch.load(path, map_location="cpu", weights_only=False)
        for k in ARCH_FIELDS:
            if ck["config"].get(k) != getattr(cfg, k):
                raise UsageError(f"--resume: checkpoint has {k}={ck['config'].get(k)!r} but this run has "
                                 f"{getattr(cfg, k)!r}; use the same model flags")


def load_data(cfg):
    try:
        import data
    except ImportError:
        raise UsageError("the repository's data/ package is missing; run from the repository root") from None
    try:
        ds = data.load_dataset(name=cfg.dataset, tokenizer=cfg.tokenizer, data_dir=cfg.data_dir or None)
        ds.check_block_size(cfg.block_size)
    except data.DataError as e:
        raise UsageError(str(e)) from None
    return ds


def setup_ddp(cfg):
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return resolve_device(cfg), (0, 1)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(cfg)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev, (rank, dist.get_world_size())


def main(argv=None):
    cfg = parse_config(argv)
    try:
        validate(cfg)
        if cfg.bench:
            ds = None
            if cfg.vocab_size == 0:
                cfg = dataclasses.replace(cfg, vocab_size=50257)
        else:
            ds = load_data(cfg)
            if cfg.vocab_size == 0 or cfg.vocab_size < ds.vocab_size:
                cfg = dataclasses.replace(cfg, vocab_size=ds.vocab_size)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    cfg = dataclasses.replace(cfg, vocab_size=64 * math.ceil(cfg.vocab_size / 64))  # pad to a multiple of 64
    device, ddp = setup_ddp(cfg)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    master = ddp[0] == 0
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        table = param_table(cfg)
        print(f"trainable parameters at L={cfg.n_layer}, d={cfg.n_embd}, H={cfg.n_head}, vocab={cfg.vocab_size}:")
        print(format_param_table(table))
        write_json({"config": {k: getattr(cfg, k) for k in ARCH_FIELDS + ("vocab_size",)}, "table": table},
                   os.path.join(cfg.out_dir, "params.json"))
    if cfg.bench:
        if master:
            run_bench(cfg, device)
    elif cfg.compare:
        run_compare(cfg, ds, device, ddp)
    else:
        train(cfg, ds, device, ddp)
    if ddp[1] > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
