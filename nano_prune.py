"""nano_prune.py -- which attention heads and FFNs does in-context learning need?

Paper: H. Bansal, K. Gopalakrishnan, S. Dingliwal, S. Bodapati, K. Kirchhoff, D. Roth, "Rethinking
the Role of Scale for In-Context Learning: An Interpretability-based Case Study at 66 Billion
Scale", ACL 2023, arXiv 2212.09095. Builds on Michel et al. 2019 ("Are Sixteen Heads Really Better
than One?", arXiv 1905.10650) and Olsson et al. 2022 ("In-context Learning and Induction Heads").

How much of OPT-66B does in-context learning (learning a task from demonstrations in the prompt)
use? Score every head by its gradient importance and every FFN by knocking it out, prune the least
important, and measure accuracy at 0, 1 and 5 shots: ~70% of the heads and ~20% of the FFNs can
go; the important heads overlap across tasks and shots; many are induction heads (attend to the
token after an earlier copy of the current token, and copy it). We redo the study on a small GPT
trained on in-context tasks generated here (copy, successor, associative recall, in-context
cluster classification, and repeated random sequences so that induction heads form), with the
controls the paper lacks: random and reverse orders, FFN scores on dev prompts kept apart from
the test prompts.

Key equations
-------------
A gate xi_h on every head's output, before W_O (Sec. 2.2; Michel Eq. 1), 1 = keep, 0 = pruned:
    MHA(x) = sum_h xi_h A_h(x) W_O^h,   A_h(x) = softmax(q_h k_h^T / sqrt(d_h)) v_h     (T x d_h)
Head importance (Sec. 2.3.2, Eq. 8), the loss on the answer tokens only (Eq. 9):
    IS_h = E_(x,y) |A_h^T dL(y|x)/dA_h| = E_(x,y) |dL(y|x)/d xi_h|    (at xi = 1)
    (|.| per token as in the official code: --abs_per token, our default; Eq. 8: per example)
Task aggregate (Eq. 10): the mean of the per-task score matrices, per shot.
FFN importance (Sec. 2.3.1, Eq. 7), an oracle; the whole sublayer goes, its LayerNorm too:
    IS_FFN_l = acc(model) - acc(model without FFN l)
Induction heads (Sec. 6.3, App. A.4 Alg. 1-2): prefix matching = attention from a token of a
repeated random sequence to the tokens that followed its earlier copies; copying = how much a
head's output raises the logit of the token it attends to.

    [BOS][TASK] x1 y1 ... xk yk x_q -> y_q    (+ repeated random sequences [BOS][REP] s s s s)
            |  train a GPT with gates xi_h (heads) and xi_l (FFNs), all = 1
            v
    accuracy per task x shot --> IS_h per (task, shot) --> aggregate --> prune 0..90% of heads
            |                    (task / aggregate / random / reverse order)
            +--> FFN oracle on dev prompts --> cumulative FFN pruning --> heads x FFNs grid
            +--> Spearman + top-30% overlap across tasks and shots; cross-task transfer
            +--> prefix matching + copying --> induction heads --> retained capacity
            v
    physical pruning (slice W_qkv, W_O, drop FFNs) == the masked model; measured speed-up

Run
---
    python nano_prune.py                     # cpu preset: ~3 min training + ~1 min analysis
    python nano_prune.py --preset gpu        # 6 layers x 8 heads, d 256 (default with CUDA)
    python nano_prune.py --skip_train --ckpt out_prune/ckpt.pt --out_dir out2   # analyse only
    python nano_prune.py --skip_train --ckpt out_prune/ckpt.pt --bench 50,70,90  # speed test
    torchrun --standalone --nproc_per_node 2 nano_prune.py --preset gpu        # DDP training
    python -m pytest -q tests/test_prune.py  # CPU, under a minute

Reading map: Config -> ICLTasks (the tasks, Sec. 3) -> GPT with head and FFN gates (Sec. 2) ->
head_importance (Eq. 8-10), ffn_oracle (Eq. 7) -> pruning orders, agreement -> induction heads ->
the experiment (Study; one function per section or figure; analyse; plots; --compare) -> making
it fast (physically_prune, --bench) -> skeleton (BadInput ... train, checkpoints, main).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data

SCRIPT, TITLE = "nano_prune", ("Bansal et al. 2023 in miniature: head/FFN importance, pruning "
                 "curves and induction heads (defaults: the cpu preset's).")
TASKS = ("copy", "succ", "recall", "cluster")


def _f(default, help, choices=None):
    """A Config field with its --help text (and allowed values): the parser is built from these."""
    return field(default=default, metadata=dict(help=help, choices=choices))


@dataclass
class Config:
    # --- the paper
    shots: str = _f("0,1,5", "numbers of demonstrations k to evaluate and score")
    n_eval: int = _f(400, "evaluation prompts per (task, shot)")
    n_imp: int = _f(256, "importance prompts per (task, shot), disjoint from the eval prompts")
    n_dev: int = _f(300, "dev prompts per (task, shot) for the FFN oracle, disjoint from eval")
    abs_per: str = _f("token", "|.| in IS_h per token (official code) | per example (Eq. 8)",
                      ("token", "example"))
    imp_norm: str = _f("example", "normaliser of IS_h: example (mean over prompts) | official "
                       "(n*T tokens; last layer: answer tokens)", ("example", "official"))
    layer_norm_imp: bool = _f(False, "Michel et al.'s per-layer L2 normalisation of head scores")
    agg_norm: str = _f("mean", "task aggregate: mean (Eq. 10) | sum1 (each task's sum 1 first)",
                       ("mean", "sum1"))
    n_random: int = _f(3, "seeds of the random-order control")
    n_prefix_seq: int = _f(50, "random sequences for the prefix-matching and copying scores")
    prefix_len: int = _f(25, "length L of the repeated segment (capped so 2 + 4L fits)")
    copy_impl: str = _f("olsson", "copying score shown in the figures (both are saved)",
                        ("olsson", "official"))
    analysis_batch: int = _f(256, "prompts per forward pass in the analysis")
    speed_batch: int = _f(64, "full-length sequences per forward in the physical-pruning timing")
    # --- model
    n_layer: int = _f(4, "transformer blocks")
    n_head: int = _f(4, "attention heads per block")
    n_embd: int = _f(64, "residual width d_model")
    block_size: int = _f(64, "context length T")
    # --- data
    n_content: int = _f(32, "content tokens the tasks draw from (chance = 1/n_content)")
    n_labels: int = _f(8, "label tokens of the cluster task (chance = 1/n_labels)")
    n_clusters: int = _f(4, "fixed latent clusters of content tokens in the cluster task")
    task_seed: int = _f(0, "seed of the fixed task definitions (the cluster partition)")
    rep_frac: float = _f(0.25, "fraction of each batch that is repeated random sequences")
    rep_frac_early: float = _f(0.8, "that fraction during the first rep_early of training")
    rep_early: float = _f(0.3, "fraction of max_iters that uses rep_frac_early (0 = off)")
    text_frac: float = _f(0.1, "fraction of each batch that is natural text (with --dataset)")
    dataset: str = _f("none", "text mixed into training: none|shakespeare|pycode|pycode_all|FILE")
    tokenizer: str = _f("char", "tokenizer of the natural text", ("char", "gpt2"))
    data_dir: str = _f("", "where the data loader looks for files (empty: $NANO_DATA_DIR, data/)")
    # --- training
    batch_size: int = _f(32, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_iters: int = _f(2500, "optimizer steps")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-4, "final learning rate of the cosine schedule")
    warmup_iters: int = _f(100, "linear warmup steps")
    weight_decay: float = _f(0.1, "AdamW weight decay (matrices and embeddings only)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm (0 = off)")
    eval_interval: int = _f(250, "steps between evaluations (val loss, accuracies) and checkpoints")
    eval_iters: int = _f(4, "validation batches per evaluation")
    # --- system
    device: str = _f("auto", "auto (cuda > mps > cpu) | cpu | cuda | mps",
                     ("auto", "cpu", "cuda", "mps"))
    dtype: str = _f("auto", "auto (bf16 on CUDA, else fp32) | float32 | bfloat16 | float16",
                    ("auto", "float32", "bfloat16", "float16"))
    compile: bool | None = _f(None, "torch.compile the training model (default: on for CUDA)")
    seed: int = _f(1337, "seed for init, batches and the analysis prompts")
    out_dir: str = _f("out_prune", "where config.json, log.csv, results.json, ckpt.pt, PNGs go")
    resume: bool = _f(False, "continue training from out_dir/ckpt.pt")
    stop_at: int = _f(0, "stop with a checkpoint after this step, keeping the schedule (0 = off)")
    progress: bool = _f(True, "tqdm progress bars (--no-progress for logs redirected to a file)")
    # --- modes
    preset: str = _f("auto", "cpu (laptop, minutes) | gpu (one large GPU) | auto (gpu if CUDA)",
                     ("auto", "cpu", "gpu"))
    compare: str = _f("", "score variants side by side, e.g. abs_per=example,layer_norm_imp")
    bench: str = _f("", "physical-pruning speed test at heads % (p or p:n_ffn), e.g. 50,70:1")
    analysis: bool = _f(True, "run the pruning / induction analysis after training")
    skip_train: bool = _f(False, "do not train; load --ckpt and only analyse")
    ckpt: str = _f("", "checkpoint to analyse with --skip_train (default: out_dir/ckpt.pt)")


PRESETS = {
    "cpu": {},  # the defaults: 4 layers x 4 heads, d 64, T 64, ~3 minutes of training on a laptop
    "gpu": dict(n_layer=6, n_head=8, n_embd=256, block_size=128, n_content=96, batch_size=256,
                max_iters=5000, lr=1e-3, min_lr=1e-4, warmup_iters=200, eval_interval=500,
                eval_iters=8, n_eval=1000, n_imp=1024, n_dev=500, n_random=5,
                analysis_batch=512, speed_batch=256),
}
# what defines the trained model and its tasks: taken from the checkpoint with --skip_train/--resume
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "n_content", "n_labels",
                "n_clusters", "task_seed", "dataset", "tokenizer")


# ---- The in-context tasks (Sec. 3 uses 14 lm-eval tasks; we generate exactly scorable ones) ----
class ICLTasks:
    """Vocabulary and episode generators.

    Token ids: PAD=0, BOS=1, REP=2 (template of repeated sequences), one template token per task,
    then n_content content tokens c0.., then n_labels label tokens L0.., then any text tokens.
    Episode:  [BOS][TASK] x1 y1 x2 y2 ... xk yk x_q  -> the model must predict y_q at x_q.
      copy:    y = x                    (rule in the weights; the template token suffices)
      succ:    y = x + 1 mod n_content  (rule in the weights)
      recall:  per-episode random key -> value map; the query key is a demo key (induction)
      cluster: n_clusters fixed latent clusters of content tokens, a per-episode random
               cluster -> label map; the query is a *new* token whose cluster is in the demos
    """
    PAD, BOS, REP = 0, 1, 2
    MAX_KEYS = 8  # a training recall episode uses 1..MAX_KEYS distinct keys

    def __init__(self, n_content: int, n_labels: int, n_clusters: int, task_seed: int,
                 text_vocab: int = 0):
        self.N, self.n_labels, self.n_clusters = n_content, n_labels, n_clusters
        self.template = {t: 3 + i for i, t in enumerate(TASKS)}
        self.C0 = 3 + len(TASKS)  # first content token
        self.L0 = self.C0 + n_content  # first label token
        self.T0 = self.L0 + n_labels  # first natural-text token
        self.vocab_size = self.T0 + text_vocab
        g = torch.Generator().manual_seed(task_seed)
        self.cluster_of = torch.randperm(n_content, generator=g) % n_clusters  # (N,) balanced

    def candidates(self, task: str) -> torch.Tensor:
        """Token ids the answer is chosen from (accuracy = argmax over these, like lm-eval)."""
        first, n = (self.L0, self.n_labels) if task == "cluster" else (self.C0, self.N)
        return torch.arange(first, first + n)

    @staticmethod
    def _seen_before(a: torch.Tensor) -> torch.Tensor:
        """(B, k) -> (B, k) bool: does a[b, i] occur among a[b, :i]?"""
        k = a.shape[1]
        eq = a[:, :, None] == a[:, None, :]  # (B, k, k)
        return (eq & torch.ones(k, k, dtype=torch.bool).tril(-1)).any(2)

    def pairs(self, task: str, B: int, npairs: int, g: torch.Generator, query: bool):
        """Content pairs (x, y) of B episodes as token ids, and a mask of answerable y's.

        query=False: training episodes (x_i i.i.d.; recall keys repeat so later ones are
        answerable). query=True: npairs-1 demonstrations + one query they determine."""
        N, C0 = self.N, self.C0
        if task in ("copy", "succ"):
            x = torch.randint(N, (B, npairs), generator=g)
            y = x if task == "copy" else (x + 1) % N
            return x + C0, y + C0, torch.ones(B, npairs, dtype=torch.bool)
        perm = torch.rand(B, N, generator=g).argsort(1)  # (B, N) a random order of the content
        k = npairs - 1
        if task == "recall":
            value_of = torch.randint(N, (B, N), generator=g)  # per-episode key -> value map
            if query:
                keys = perm[:, :npairs].clone()  # k distinct demo keys (+1 spare)
                if k >= 1:  # the query key is one of the demo keys
                    keys[:, k] = perm.gather(1, torch.randint(k, (B, 1), generator=g))[:, 0]
            else:
                m = torch.randint(1, min(self.MAX_KEYS, N) + 1, (B, 1), generator=g)  # keys
                idx = (torch.rand(B, npairs, generator=g) * m).long()
                keys = perm.gather(1, idx)
            return keys + C0, value_of.gather(1, keys) + C0, self._seen_before(keys)
        # cluster: a per-episode cluster -> label map
        label_of = torch.rand(B, self.n_labels, generator=g).argsort(1)[:, :self.n_clusters]
        x = torch.randint(N, (B, npairs), generator=g)
        if query and k >= 1:  # a new token from the cluster of a random demonstration
            j = torch.randint(k, (B, 1), generator=g)
            c = self.cluster_of[x[:, :k].gather(1, j)]  # (B, 1)
            in_demo = torch.zeros(B, N, dtype=torch.bool).scatter_(1, x[:, :k], True)
            same = (self.cluster_of[None, :] == c).float()
            w = same * (~in_demo).float()
            w = torch.where(w.sum(1, keepdim=True) > 0, w, same)
            x[:, k] = torch.multinomial(w, 1, generator=g)[:, 0]
        cl = self.cluster_of[x]
        return x + C0, label_of.gather(1, cl) + self.L0, self._seen_before(cl)

    def prompts(self, task: str, k: int, n: int, g: torch.Generator):
        """n test prompts with k demonstrations: X (n, 3+2k) ending in x_q, Y (n,) the answer."""
        x, y, _ = self.pairs(task, n, k + 1, g, query=True)
        seq = self.episode(self.template[task], x, y)  # (n, 2k+4): BOS TASK x1 y1 ... xq yq
        return seq[:, :-1], seq[:, -1].clone()

    def episode(self, template: int, x: torch.Tensor, y: torch.Tensor | None = None):
        """[BOS][template] x1 y1 x2 y2 ... (B, 2 + 2n) from pairs (B, n); or [BOS][template] x."""
        body = x if y is None else torch.stack([x, y], 2).flatten(1)
        return torch.cat([torch.tensor([self.BOS, template]).expand(len(x), 2), body], 1)

    def train_rows(self, task: str, B: int, T: int, g: torch.Generator):
        """B training sequences filling the context: inputs (B, T), targets (B, T), -100 off the
        answers (Eq. 9: the loss is L(y|x), on the answerable y's only)."""
        npairs = (T + 1 - 2) // 2
        x, y, ok = self.pairs(task, B, npairs, g, query=False)
        seq = self.episode(self.template[task], x, y)
        tgt = torch.full_like(seq, -100)
        tgt[:, 3::2] = torch.where(ok, y, -100)
        pad = (0, T + 1 - seq.shape[1])  # to T + 1 tokens (the pad is >= 0)
        return F.pad(seq, pad, value=self.PAD)[:, :T], F.pad(tgt, pad, value=-100)[:, 1:]

    def repeat_rows(self, B: int, T: int, g: torch.Generator, lo: int = 5, hi: int = 30):
        """[BOS][REP] s s s ... with s a random segment of unique tokens; loss on the repeats."""
        hi = max(lo, min(hi, self.N, (T - 1) // 2))
        Ls = torch.randint(lo, hi + 1, (B, 1), generator=g)
        perm = torch.rand(B, self.N, generator=g).argsort(1)
        p = torch.arange(T - 1)[None, :]  # positions after [BOS][REP]
        seq = self.episode(self.REP, perm.gather(1, p % Ls) + self.C0)  # (B, T+1)
        tgt = seq[:, 1:].clone()
        tgt[torch.arange(T)[None, :].expand(B, T) < 1 + Ls] = -100  # repeats start at 2+Ls
        return seq[:, :T], tgt

    def repeated_sequences(self, n: int, L: int, g: torch.Generator, reps: int = 4):
        """[BOS][REP] + s x reps, s of L unique content tokens (paper Alg. 1 input)."""
        perm = torch.rand(n, self.N, generator=g).argsort(1)[:, :L] + self.C0
        return self.episode(self.REP, perm.repeat(1, reps))


class Batcher:
    """Training mixture: equal shares of the four tasks, rep_frac repeated sequences, text; and
    the quick ICL evaluation's prompts (128 per task and shot, the same at every eval)."""

    def __init__(self, tasks: ICLTasks, cfg: Config, text_ds=None):
        self.tasks, self.cfg, self.text_ds = tasks, cfg, text_ds
        g = torch.Generator().manual_seed(cfg.seed + 7)
        self.quick = {(t, k): tasks.prompts(t, k, 128, g)
                      for t in TASKS for k in parse_shots(cfg.shots)}

    def get(self, B: int, g: torch.Generator, split: str = "train", it: int | None = None):
        cfg, T = self.cfg, self.cfg.block_size
        early = it is not None and it < cfg.rep_early * cfg.max_iters
        n_rep = int(round(B * (cfg.rep_frac_early if early else cfg.rep_frac)))
        n_text = int(round(B * cfg.text_frac)) if self.text_ds is not None else 0
        n_task, nt = B - n_rep - n_text, len(TASKS)
        rows = [self.tasks.train_rows(t, n, T, g) for i, t in enumerate(TASKS)
                if (n := n_task // nt + (i < n_task % nt))]
        if n_rep:
            rows.append(self.tasks.repeat_rows(n_rep, T, g))
        if n_text:
            x, y = self.text_ds.get_batch(split, n_text, T, generator=g)
            rows.append((x.cpu() + self.tasks.T0, y.cpu() + self.tasks.T0))
        return torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])


# ---- The model (Sec. 2.2-2.3): nanoGPT with a gate xi_h on every head (before W_O) and every FFN
def gated_attention(q, k, v, gate):
    """xi_h * A_h for every head, written out (Sec. 2.2; Michel Eq. 1), the probabilities in hand:
        A_h = softmax(q_h k_h^T / sqrt(d_h) + causal mask) v_h,   out_h = xi_h * A_h
    q, k, v: (B, H, T, d_h); gate: (H,) the xi_h (1 = keep, 0 = pruned; any real value works, it
    is differentiable). -> out (B, H, T, d_h) (what W_O sees), att (B, H, T, T) (rows sum to 1)."""
    # BEGIN EXERCISE prune_head_gate: causal softmax(q k^T / sqrt(d_h)) v, times each head's gate
    T, hs = q.shape[-2], q.shape[-1]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf")).softmax(-1)
    y = att @ v  # (B, H, T, hs) = A_h
    return y * gate.view(1, -1, 1, 1).to(y.dtype), att
    # END EXERCISE prune_head_gate


class CausalSelfAttention(nn.Module):
    """Multi-head attention with per-head gates. Any n_head (physically pruned layers too)."""

    def __init__(self, n_embd: int, n_head: int, head_size: int):
        super().__init__()
        self.n_head, self.head_size = n_head, head_size
        self.c_attn = nn.Linear(n_embd, 3 * n_head * head_size, bias=False)  # W_Q, W_K, W_V
        self.c_proj = nn.Linear(n_head * head_size, n_embd, bias=False)  # W_O, no bias
        self.register_buffer("head_mask", torch.ones(n_head))  # the gates xi_h (1 = keep)
        self.explicit = False  # True: write the softmax out, keep att and xi_h A_h (and its grad)
        self.att = self.y = None

    def forward(self, x):
        B, T, C = x.shape
        H, hs = self.n_head, self.head_size
        q, k, v = (t.view(B, T, H, hs).transpose(1, 2)  # each (B, H, T, hs)
                   for t in self.c_attn(x).split(H * hs, dim=2))
        if self.explicit:  # analysis path: the same function, with the probabilities in hand
            y, att = gated_attention(q, k, v, self.head_mask)
            self.att, self.y = att.detach(), y
            if y.requires_grad:
                y.retain_grad()  # dL/dA_h, for IS_h = |A_h^T dL/dA_h|
        else:  # training path: the fused kernel, then the same gates
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y * self.head_mask.view(1, H, 1, 1).to(y.dtype)  # xi_h * A_h
        y = y.transpose(1, 2).reshape(B, T, H * hs)  # (B, T, H*hs)
        return self.c_proj(y)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        # FFN(M) = act(LN(M) W1) W2  (paper Eq. 6; GELU as in GPT-2 instead of OPT's ReLU)
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, head_size: int, ffn: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, head_size) if n_head else None
        self.ln_2 = nn.LayerNorm(n_embd) if ffn else None
        self.mlp = MLP(n_embd) if ffn else None
        self.register_buffer("ffn_mask", torch.ones(()))  # gate of the FFN sublayer (LN included)

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(self.ln_1(x))
        if self.mlp is not None:
            # removing an FFN = skipping LN, W1, W2 and the residual add (Sec. 2.3.1, fc_mask)
            x = x + self.ffn_mask.to(x.dtype) * self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, heads: list[int] | None = None,
                 ffns: list[bool] | None = None):
        super().__init__()
        L, C = cfg.n_layer, cfg.n_embd
        self.n_head, self.head_size = cfg.n_head, C // cfg.n_head
        heads, ffns = heads or [cfg.n_head] * L, ffns or [True] * L
        self.vocab_size = ((vocab_size + 63) // 64) * 64  # padded to a multiple of 64
        self.wte = nn.Embedding(self.vocab_size, C)
        self.wpe = nn.Embedding(cfg.block_size, C)
        self.blocks = nn.ModuleList(Block(C, h, self.head_size, f) for h, f in zip(heads, ffns))
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, self.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        for m in self.modules():  # GPT-2's init: N(0, 0.02) ...
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        for n, p in self.named_parameters():
            if n.endswith("c_proj.weight"):  # ... and 0.02 / sqrt(2L) for residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * L))

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))  # (B, T, C)
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # (B, 1, V): only the next-token logits
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_analysis(self, explicit: bool):
        for blk in self.blocks:  # (only the full model is analysed: every block has heads)
            blk.attn.explicit, blk.attn.att, blk.attn.y = explicit, None, None

    def set_masks(self, head_mask=None, ffn_mask=None):
        """head_mask: (L, H) of gates (None = all 1); ffn_mask: (L,) (None = all 1)."""
        L, dev = len(self.blocks), self.wte.weight.device
        hm = torch.ones(L, self.n_head) if head_mask is None else torch.tensor(head_mask)
        fm = torch.ones(L) if ffn_mask is None else torch.tensor(ffn_mask)
        for blk, h, f in zip(self.blocks, hm.float().to(dev), fm.float().to(dev)):
            blk.attn.head_mask, blk.ffn_mask = h, f


@torch.no_grad()
def accuracy(model: GPT, X: torch.Tensor, Y: torch.Tensor, cand: torch.Tensor, device,
             batch: int, ctx) -> float:
    """Fraction of prompts whose answer is the argmax of the next-token logits over the
    candidates (lm-eval's multiple-choice accuracy)."""
    cand, correct = cand.to(device), 0
    for i in range(0, len(X), batch):
        with ctx:
            logits, _ = model(X[i:i + batch].to(device))
        pred = cand[logits[:, -1, :].float()[:, cand].argmax(-1)]
        correct += int((pred == Y[i:i + batch].to(device)).sum())
    return correct / len(X)


# ---- Head importance (Sec. 2.3.2, Eq. 8-10; official calculate_importance), FFN oracle (Eq. 7)
def head_importance(model: GPT, X: torch.Tensor, Y: torch.Tensor, device, batch: int,
                    abs_per: str = "token", imp_norm: str = "example") -> np.ndarray:
    """IS_h of every head, (L, H). X: (n, T) prompts ending at the query, Y: (n,) gold answers.

    The loss is on the answer token only, summed over the batch so that each prompt keeps its own
    gradient. Per token t, <A_h[t], dL/dA_h[t]> is token t's share of dL/dxi_h; |.| is taken per
    token (official code) or after summing over the tokens (paper Eq. 8)."""
    model.set_analysis(explicit=True)
    imp, n = torch.zeros(len(model.blocks), model.n_head, dtype=torch.float64), len(X)
    # per batch: model(xb) -> logits (b, 1, V) at the query; after backward, every block's
    # attn.y (b, H, T, d_h) holds xi_h A_h (gates at 1: A_h) and attn.y.grad holds dL/dA_h;
    # imp[l] (H,) collects the sum over prompts (the normalisers come after the loop)
    # BEGIN EXERCISE prune_head_importance: summed answer loss, backward, imp[l] += |<A_h, dL/dA_h>|
    for i in range(0, n, batch):
        xb, yb = X[i:i + batch].to(device), Y[i:i + batch].to(device)
        logits, _ = model(xb)  # (b, 1, V) at the query position
        # L(y|x) = -log p(y_q | x), one answer token per prompt (Eq. 9), summed over prompts
        loss = F.cross_entropy(logits[:, -1, :].float(), yb, reduction="sum")
        model.zero_grad(set_to_none=True)
        loss.backward()
        for l, blk in enumerate(model.blocks):
            y = blk.attn.y
            dot = (y.detach().double() * y.grad.double()).sum(-1)  # (b, H, T) <A_t, g_t>
            if abs_per == "token":  # official: sum_t |<A_t, g_t>|
                s = dot.abs().sum((0, 2))
            else:  # Eq. 8: |sum_t <A_t, g_t>| = |dL/dxi_h| per example
                s = dot.sum(2).abs().sum(0)
            imp[l] += s.double().cpu()
    # END EXERCISE prune_head_importance
    model.zero_grad(set_to_none=True)
    model.set_analysis(explicit=False)
    if imp_norm == "official":  # every layer but the last: / all n*T tokens (the answer token
        imp[:-1] /= n * X.shape[1]  # counted too, as the official code does); last: / answers
        imp[-1] /= n
    else:  # one normaliser for all layers: the mean over prompts
        imp /= n
    return imp.numpy()


def aggregate(imps: list[np.ndarray], how: str) -> np.ndarray:
    """Task aggregate (Eq. 10): the plain mean over tasks, or the mean of sum-1 matrices."""
    if how == "sum1":
        imps = [m / max(m.sum(), 1e-30) for m in imps]
    return np.mean(imps, 0)


def ffn_oracle(acc_with, L: int) -> np.ndarray:
    """Eq. 7: IS_FFN_l = acc(model) - acc(model without FFN l), (L,). acc_with(ffn_mask) -> acc."""
    base = acc_with(None)
    return np.array([base - acc_with(1 - np.eye(L)[l]) for l in range(L)])


# ---- Pruning (Sec. 5): one global ranking, least important first; and agreement (Sec. 6.1) -------
def order_heads(imp: np.ndarray) -> np.ndarray:
    """Global ranking over all L*H heads, least important first (official: argsort ascending)."""
    return np.argsort(imp.ravel(), kind="stable")


def prune_mask(order, n: int, shape) -> np.ndarray:
    """Gates of the given shape, 1 = keep, with the first n components of `order` set to 0."""
    m = np.ones(int(np.prod(shape)))
    m[np.asarray(order, dtype=int)[:n]] = 0.0
    return m.reshape(shape)


def spearman(a, b) -> float:
    """Spearman rank correlation (Sec. 6.1, Fig. 8, Table 1) of two score arrays of the same size
    (flattened, e.g. two (L, H) importance maps) = the Pearson correlation of their ranks:
        rho = sum_i (ra_i - mean ra)(rb_i - mean rb) / sqrt(sum_i (ra_i - mean ra)^2 sum_i (...)^2)
    Ranks 0..n-1, ties given their average rank ([5, 1, 5] -> [1.5, 0, 1.5]). nan where one side
    is constant (no ranking to compare). -> a float in [-1, 1]."""
    # BEGIN EXERCISE prune_spearman: average-tied ranks of a and b, then the Pearson correlation
    def rankdata(v) -> np.ndarray:
        _, inv, count = np.unique(np.asarray(v, dtype=np.float64).ravel(), return_inverse=True,
                                  return_counts=True)
        first = np.cumsum(count) - count  # rank of the first of each group of equal values
        return (first + 0.5 * (count - 1))[inv]
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")
    # END EXERCISE prune_spearman


def topk_overlap(a, b, frac: float) -> float:
    """|top-frac(a) & top-frac(b)| / |top-frac|, the paper's 'top-30% heads overlap'."""
    k = max(1, int(round(frac * np.size(a))))
    ta, tb = (set(np.argsort(-np.ravel(v), kind="stable")[:k]) for v in (a, b))
    return len(ta & tb) / k


# ---- Induction heads (Sec. 6.3 and App. A.4, Alg. 1-2; Olsson et al. 2022) -----------------------
def induction_targets(ids: torch.Tensor) -> torch.Tensor:
    """Where an induction head at query j should look (Alg. 1): the keys right AFTER the earlier
    occurrences of the current token.  ids: (n, T) -> P: (n, T_query, T_key) bool,
        P[j, i] = True  iff  ids[i - 1] == ids[j]  and  i - 1 < j   (i >= 1)
    e.g. ids = [BOS, REP, a, b, a, b]: P[4] (query a) is True at key 3 (the b after the first a);
    P[5] (query b) at key 4; rows 0..3 are all False (their tokens have not occurred before)."""
    # BEGIN EXERCISE prune_prefix_matching: mark key i where ids[i-1] equals ids[j] and i-1 < j
    n, T = ids.shape
    same = ids[:, :, None] == ids[:, None, :]  # (n, T_query, T_key): ids[j] == ids[m]
    P = torch.zeros(n, T, T, dtype=torch.bool)
    P[:, :, 1:] = same[:, :, :-1]  # key i = m + 1
    j = torch.arange(T)
    P &= (j[None, :] - 1 < j[:, None])[None]  # the earlier occurrence m = i-1 is before j
    return P
    # END EXERCISE prune_prefix_matching


def prefix_matching_score(att: torch.Tensor, ids: torch.Tensor, first_query: int):
    """Alg. 1: att (n, H, T, T), ids (n, T). For every query j >= first_query (repeats 2..4), the
    attention to the tokens right AFTER earlier occurrences of ids[j]; mean over j, n -> (H,)."""
    P = induction_targets(ids.cpu()).to(att.dtype)  # (n, T, T)
    s = (att.cpu() * P[:, None]).sum(-1)  # (n, H, T)
    return s[:, :, first_query:].mean((0, 2))


def copy_ratio(l: torch.Tensor, target: torch.Tensor, visible=None) -> torch.Tensor:
    """Olsson-style copying ratio. l: (..., S) logit (or probability) effects on S tokens;
    target: (...) index 0..S-1 of the attended token, or -1; visible: (..., S) bool, the tokens
    that count (default: all). r = ReLU(l - mean of the visible l), 0 off them;
    ratio = r[target] / sum r (0 where the target is -1 or nothing is raised)."""
    if visible is not None:
        l = l.masked_fill(~visible, float("nan"))
    r = F.relu(torch.nan_to_num(l - l.nanmean(-1, keepdim=True), nan=0.0))
    tot = r.sum(-1)
    hit = r.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ok = (target >= 0) & (tot > 0)
    return torch.where(ok, hit / tot.clamp(min=1e-30), torch.zeros_like(tot))


@torch.no_grad()
def explicit_forward(model: GPT, ids: torch.Tensor, device) -> list[tuple]:
    """One forward pass with the probabilities in hand: per block, att (n, H, T, T) and the head
    outputs xi_h A_h (n, H, T, d_h), both float32."""
    model.set_analysis(explicit=True)
    model(ids.to(device))
    out = [(blk.attn.att.float(), blk.attn.y.float()) for blk in model.blocks]
    model.set_analysis(explicit=False)
    return out


@torch.no_grad()
def copying_score_olsson(model: GPT, ids: torch.Tensor, start: int, device) -> np.ndarray:
    """Olsson et al.: run the model on non-repeated random tokens; push each head's attention-
    weighted output along the direct path through W_O^h and the unembedding; how much does it
    raise the token it attends to most, among the sample's tokens? -> (L, H)."""
    W_U = model.lm_head.weight.float()  # (V, C)
    E_s = W_U[ids[:, start:].to(device)]  # (n, S, C): the sample's S unique content tokens
    out = []
    for blk, (att, y) in zip(model.blocks, explicit_forward(model, ids, device)):
        H, hs = blk.attn.n_head, blk.attn.head_size
        Wo = blk.attn.c_proj.weight.float().view(-1, H, hs).transpose(0, 1)  # (H, C, hs)
        contrib = torch.einsum("nhtd,hcd->nhtc", y, Wo)  # (n, H, T, C) in the residual
        logits_s = torch.einsum("nhtc,nsc->nhts", contrib, E_s)  # (n, H, T, S) logit effects
        tgt = (att.argmax(-1) - start).clamp(min=-1)  # (n, H, T) index in the sample, or -1
        out.append(copy_ratio(logits_s[:, :, start:], tgt[:, :, start:]).mean((0, 2)).cpu())
    return torch.stack(out).numpy()


@torch.no_grad()
def copying_score_official(model: GPT, ids: torch.Tensor, device) -> np.ndarray:
    """The official --copying_score (Alg. 2), re-created: every layer sees the embedding-level
    input LN_1(tok_emb + pos_emb); the head output at j is W_O^h v_j (not attention-weighted),
    then lm_head (no final LN) and a softmax over the vocabulary; r = ReLU(p - mean p) over the
    visible tokens ids[0..j]; score_j = r[argmax_i A[j, i]] / sum r. -> (L, H)."""
    ids = ids.to(device)
    n, T = ids.shape
    h0 = model.wte(ids) + model.wpe(torch.arange(T, device=device))  # (n, T, C)
    W_U = model.lm_head.weight.float()
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    out = []
    for blk in model.blocks:
        a = blk.attn
        H, hs = a.n_head, a.head_size
        q, k, v = a.c_attn(blk.ln_1(h0)).split(H * hs, dim=2)
        q, k, v = (t.view(n, T, H, hs).transpose(1, 2).float() for t in (q, k, v))
        att = gated_attention(q, k, v, torch.ones(H, device=device))[1]  # (n, H, T, T)
        Wo = a.c_proj.weight.float().view(-1, H, hs).transpose(0, 1)  # (H, C, hs)
        o = torch.einsum("nhtd,hcd->nhtc", v, Wo)  # (n, H, T, C): W_O^h v_j
        probs = (o @ W_U.T).softmax(-1)  # (n, H, T, V)
        p_vis = probs.gather(-1, ids[:, None, None, :].expand(n, H, T, T))  # p_j(ids[i])
        score = copy_ratio(p_vis, att.argmax(-1), visible=causal)  # (n, H, T)
        out.append(score[:, :, 1:].mean((0, 2)).cpu())  # query positions 1..T-1 (after BOS)
    return torch.stack(out).numpy()


def retained_capacity(score: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Fig. 11: after pruning the first i heads of `order`, sum(score[rest]) / sum(score)."""
    s = np.clip(score.ravel()[order], 0, None)
    tot = s.sum()
    tail = np.concatenate([np.cumsum(s[::-1])[::-1], [0.0]])
    return tail / tot if tot > 0 else tail


# ---- The experiment: one function per paper section or figure; analyse() runs them in order ------
def parse_shots(s: str) -> list[int]:
    """--shots '0,1,5' -> [0, 1, 5]."""
    try:
        shots = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        shots = []
    need(shots and min(shots) >= 0, f"--shots must be a comma list of integers >= 0, got {s!r}")
    return shots


def fresh_prompts(tasks: ICLTasks, t: str, k: int, n: int, g, seen: set, draws: int):
    """n prompts from up to `draws` draws of g, none of them in `seen` (eval prompts as bytes);
    where the prompt space is too small (under n/4 of the first draw unseen, e.g. 0-shot), the
    first draw as it is. -> X, Y, and that draw's overlap with `seen` (None: disjoint)."""
    Xs, Ys = [], []
    while len(Xs) < draws and sum(map(len, Xs)) < n:
        X, Y = tasks.prompts(t, k, n, g)
        keep = torch.tensor([r.tobytes() not in seen for r in X.numpy()])
        if not Xs and keep.sum() < n // 4:
            return X, Y, 1.0 - float(keep.float().mean())
        Xs.append(X[keep])
        Ys.append(Y[keep])
    return torch.cat(Xs)[:n], torch.cat(Ys)[:n], None


def prompt_sets(tasks: ICLTasks, cfg: Config, shots: list[int]):
    """Per (task, shot): eval prompts, importance prompts and FFN dev prompts (topped up to
    n_dev), the latter two disjoint from eval where the prompt space allows.
    -> sets, {cell: overlap of the dev prompts where it does not}."""
    sets, shared = {}, {}
    for ti, t in enumerate(TASKS):
        for k in shots:
            seed = cfg.seed * 7919 + 1000 * ti + 10 * k
            g_eval, g_imp, g_dev = (torch.Generator().manual_seed(seed + s) for s in (1, 2, 3))
            Xe, Ye = tasks.prompts(t, k, cfg.n_eval, g_eval)
            seen = {r.tobytes() for r in Xe.numpy()}
            Xi, Yi, _ = fresh_prompts(tasks, t, k, cfg.n_imp, g_imp, seen, draws=1)
            Xd, Yd, over = fresh_prompts(tasks, t, k, cfg.n_dev, g_dev, seen, draws=9)
            if over is not None:
                shared[f"{t}/{k}"] = round(over, 3)
            sets[t, k] = dict(eval=(Xe, Ye), imp=(Xi, Yi), dev=(Xd, Yd))
    if shared:
        print("note: too few distinct prompts to keep the FFN dev prompts apart from the eval "
              "prompts; overlap: " + ", ".join(f"{c} {100 * v:.0f}%" for c, v in shared.items()))
    return sets, shared


class Study:
    """What every section needs: the model, its tasks, the prompt sets, one random generator;
    and the results, res, keyed by shot k (results.json: "k") with numpy arrays (lists there)."""

    def __init__(self, model: GPT, tasks: ICLTasks, cfg: Config, device: str, ctx):
        self.model, self.tasks, self.cfg, self.device, self.ctx = model, tasks, cfg, device, ctx
        model.eval()
        self.L, self.H = cfg.n_layer, cfg.n_head
        self.shots = parse_shots(cfg.shots)
        self.sets, shared = prompt_sets(tasks, cfg, self.shots)
        self.rng = np.random.default_rng(cfg.seed)
        self.res = {"tasks": list(TASKS), "shots": self.shots, "layers": self.L,
                    "heads": self.H, "ffn_dev_prompts_overlapping_eval": shared}

    def acc(self, t, k, hm=None, fm=None, split="eval"):
        self.model.set_masks(hm, fm)
        X, Y = self.sets[t, k][split]
        a = accuracy(self.model, X, Y, self.tasks.candidates(t), self.device,
                     self.cfg.analysis_batch, self.ctx)
        self.model.set_masks(None, None)
        return a

    def pruned(self, t, k, order, p, fm=None):
        """Accuracy with the first p% of the heads of `order` pruned (official: p * n // 100)."""
        return self.acc(t, k, prune_mask(order, p * self.L * self.H // 100, (self.L, self.H)), fm)

    def score(self, t, k, abs_per=None, layer_norm=None):
        """IS_h on the importance prompts (Eq. 8); abs_per, layer_norm: None = the config's."""
        c, (X, Y) = self.cfg, self.sets[t, k]["imp"]
        s = head_importance(self.model, X, Y, self.device, c.analysis_batch,
                            abs_per or c.abs_per, c.imp_norm)
        ln = c.layer_norm_imp if layer_norm is None else layer_norm
        # Michel et al.'s optional per-layer normalisation: each layer's row over its L2 norm
        return s / (np.linalg.norm(s, axis=1, keepdims=True) + 1e-20) if ln else s


def sec_full_accuracy(st: Study):
    """Sec. 3: full-model accuracy per task and shot (+- binomial s.e.), printed first, with
    warnings where it is near chance or where few-shot accuracy is below 0.9."""
    n = st.cfg.n_eval
    full = {t: {k: st.acc(t, k) for k in st.shots} for t in TASKS}
    chance = {t: 1.0 / len(st.tasks.candidates(t)) for t in TASKS}
    print(f"\nfull-model accuracy (n={n} per cell, +- binomial s.e.)")
    print("  task     " + "".join(f"{k:>4d}-shot     " for k in st.shots) + "chance")
    for t in TASKS:
        print(f"  {t:8s} " + "".join(f"{a:6.3f}+-{math.sqrt(max(a * (1 - a), 1e-12) / n):.3f}  "
                                     for a in full[t].values()) + f"{chance[t]:.3f}")
    near = [f"{t}/{k}" for t in TASKS for k in st.shots
            if full[t][k] <= chance[t] + max(0.05, 3 * math.sqrt(chance[t] * (1 - chance[t]) / n))]
    low = [f"{t}/{k}" for t in TASKS for k in st.shots if k > 0 and full[t][k] < 0.9]
    for cells, what in ((near, "near chance (maps and correlations there are noise; 0-shot "
                         "recall/cluster are at chance by design)"),
                        (low, "few-shot accuracy below 0.9 (train longer: --max_iters)")):
        if cells:
            print(f"WARNING: {what}: " + ", ".join(cells))
    st.res.update(accuracy_full=full, chance=chance, near_chance=near,
                  **{"few_shot_below_0.9": low})


def fig3_head_importance(st: Study):
    """Fig. 3 (Sec. 4): IS_h per (task, shot) (Eq. 8), the aggregate per shot (Eq. 10), and how
    much the choice of where |.| is taken (Eq. 8 vs the official code) changes the ranking."""
    st.imp = {k: {t: st.score(t, k) for t in TASKS} for k in st.shots}
    st.agg = {k: aggregate([st.imp[k][t] for t in TASKS], st.cfg.agg_norm) for k in st.shots}
    other = "example" if st.cfg.abs_per == "token" else "token"
    agree = {f"{t}/{k}": spearman(st.imp[k][t], st.score(t, k, abs_per=other, layer_norm=False))
             for t in TASKS for k in st.shots}
    st.res.update(head_importance=st.imp, head_importance_aggregate=st.agg,
                  spearman_token_vs_example_abs=agree, importance_mass_per_layer={
                      k: a.sum(1) / max(a.sum(), 1e-30) for k, a in st.agg.items()})
    print(f"head importance done; Spearman of per-token vs per-example |.|: median "
          f"{np.nanmedian(list(agree.values())):.2f}")


def fig4_ffn_importance(st: Study):
    """Fig. 4 (Sec. 4): FFN oracle scores (Eq. 7) on the dev prompts per (task, shot); task mean."""
    st.ffn = {k: {t: ffn_oracle(lambda fm, t=t, k=k: st.acc(t, k, fm=fm, split="dev"), st.L)
                  for t in TASKS} for k in st.shots}
    st.ffn_agg = {k: np.mean([st.ffn[k][t] for t in TASKS], 0) for k in st.shots}
    st.res["ffn_oracle"] = st.ffn


def fig5_head_pruning(st: Study):
    """Fig. 5 (Sec. 5.1): accuracy vs % heads pruned, one global ranking from the unpruned
    model, in task, aggregate, random (n_random seeds) and reverse order."""
    pcts, curves = list(range(0, 100, 10)), {}
    rand_orders = [st.rng.permutation(st.L * st.H) for _ in range(st.cfg.n_random)]
    work = [(t, k) for t in TASKS for k in st.shots]
    for t, k in tqdm(work, desc="pruning curves", dynamic_ncols=True, disable=not st.cfg.progress):
        o_task = order_heads(st.imp[k][t])
        orders = {"task": o_task, "aggregate": order_heads(st.agg[k]), "reverse": o_task[::-1]}
        c = {name: [st.pruned(t, k, o, p) for p in pcts] for name, o in orders.items()}
        c["random"] = [[st.pruned(t, k, o, p) for p in pcts] for o in rand_orders]
        c.update(random_mean=np.mean(c["random"], 0), random_std=np.std(c["random"], 0))
        curves[f"{t}/{k}"] = c
    st.res["head_pruning"] = {"percent": pcts, "curves": curves}


def sec6_cross_task_transfer(st: Study):
    """Sec. 6.1.2: prune task A with task B's ranking, or with the aggregate ranking."""
    tp, out = [10, 30, 50, 70, 90], {}
    for k in st.shots:
        orders = {s: order_heads(st.imp[k][s]) for s in TASKS}
        orders["aggregate"] = order_heads(st.agg[k])
        for t in TASKS:
            out[f"{t}/{k}"] = {s: [st.pruned(t, k, o, p) for p in tp] for s, o in orders.items()}
    st.res["transfer_pruning"] = {"percent": tp, "acc": out}


def fig6_ffn_pruning(st: Study):
    """Fig. 6 (Sec. 5.2): accuracy vs FFNs pruned cumulatively in oracle order, and random order."""
    L, out = st.L, {}
    for t in TASKS:
        for k in st.shots:
            o = np.argsort(st.ffn[k][t], kind="stable")
            oracle = [st.acc(t, k, fm=prune_mask(o, n, L)) for n in range(L + 1)]
            rnd = [[st.acc(t, k, fm=prune_mask(st.rng.permutation(L), n, L))
                    for n in range(L + 1)] for _ in range(st.cfg.n_random)]
            out[f"{t}/{k}"] = {"oracle": oracle, "random_mean": np.mean(rnd, 0),
                               "random_std": np.std(rnd, 0)}
    st.res["ffn_pruning"] = {"n_pruned": list(range(L + 1)), "curves": out,
                             "note": f"{L} FFNs: one step = {100 / L:.0f}% of the FFNs"}


def fig7_combined_pruning(st: Study):
    """Fig. 7 (Sec. 5.3): heads x FFNs grid, shot-specific task-aggregate orders (its caption)."""
    L, gp, grids = st.L, list(range(0, 80, 10)), {}  # 0..70% of the heads
    for k in st.shots:
        oh, of = order_heads(st.agg[k]), np.argsort(st.ffn_agg[k], kind="stable")
        g = np.array([[[st.pruned(t, k, oh, p, prune_mask(of, nf, L)) for nf in range(L + 1)]
                       for p in gp] for t in TASKS])  # (tasks, heads %, FFNs pruned)
        grids[k] = {"per_task": g, "mean": g.mean(0)}
    st.res["combined_grid"] = {"head_percent": gp, "ffn_pruned": list(range(L + 1)),
                               "grids": grids}


def fig8_agreement(st: Study):
    """Fig. 8 (Sec. 6.1): cross-task Spearman and top-30% overlap; cross-shot Spearman (Table 1)."""
    names = list(TASKS) + ["aggregate"]
    v = {k: [st.imp[k][t] for t in TASKS] + [st.agg[k]] for k in st.shots}  # in names' order
    mats = {k: {"spearman": [[spearman(a, b) for b in v[k]] for a in v[k]],
                "top_overlap": [[topk_overlap(a, b, 0.3) for b in v[k]] for a in v[k]]}
            for k in st.shots}
    cross = {t: {f"{a}-{b}": spearman(v[a][i], v[b][i])
                 for j, a in enumerate(st.shots) for b in st.shots[j + 1:]}
             for i, t in enumerate(names)}
    st.res["agreement"] = {"names": names, "per_shot": mats, "cross_shot_spearman": cross,
                           "topk_frac": 0.3}


def fig10_induction_heads(st: Study):
    """Fig. 10 (Sec. 6.3): prefix matching (Alg. 1, with the score of uniform attention as a
    floor, and a previous-token score) and copying (Olsson-style, and Alg. 2 as the official code
    computes it); heads in the top 10% of both are induction heads."""
    cfg, tasks, L, H = st.cfg, st.tasks, st.L, st.H
    Lp = min(cfg.prefix_len, (cfg.block_size - 2) // 4, tasks.N)
    gi = torch.Generator().manual_seed(cfg.seed + 4242)
    rep = tasks.repeated_sequences(cfg.n_prefix_seq, Lp, gi)  # (n, T = 2 + 4Lp)
    att = torch.stack([a.cpu() for a, _ in explicit_forward(st.model, rep, st.device)], 1)
    prefix = torch.stack([prefix_matching_score(att[:, l], rep, 2 + Lp) for l in range(L)])
    prefix, T = prefix.numpy(), rep.shape[1]  # att: (n, L, H, T, T), prefix (L, H)
    uni = (torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None])[None, None]  # row j: 1/(j+1)
    floor = float(prefix_matching_score(uni.expand(len(rep), 1, T, T), rep, 2 + Lp)[0])
    prev = att[:, :, :, torch.arange(2, T), torch.arange(1, T - 1)].mean((0, 3)).numpy()  # j->j-1
    Lc = min(25, tasks.N, cfg.block_size - 2)  # one non-repeated segment for the copying scores
    uniq = tasks.repeated_sequences(cfg.n_prefix_seq, Lc, gi, reps=1)
    copying = {"olsson": copying_score_olsson(st.model, uniq, 2, st.device),
               "official": copying_score_official(st.model, uniq, st.device)}
    st.prefix, st.copy = prefix, copying[cfg.copy_impl]
    tp, tc = np.quantile(prefix, 0.9), np.quantile(st.copy, 0.9)
    ind = [(l, h) for l, h in np.ndindex(L, H) if prefix[l, h] >= tp and st.copy[l, h] >= tc]
    st.res["induction"] = {
        "prefix_matching": prefix, "prefix_floor_uniform_attention": floor,
        "previous_token": prev, "prefix_len": Lp, "copying": copying,
        "copy_impl_shown": cfg.copy_impl, "induction_heads_top10pct_both": ind,
        "spearman_copying_variants": {"olsson-official": spearman(*copying.values())}}
    top = np.argsort(-prefix.ravel(), kind="stable")[:5]
    print("top prefix-matching heads: " + ", ".join(f"L{i // H}H{i % H}={prefix.ravel()[i]:.2f}"
                                                    for i in top) + f" (uniform floor {floor:.3f})")


def fig11_retained_capacity(st: Study):
    """Fig. 11 (Sec. 6.3): prefix-matching and copying capacity left, aggregate-order pruning."""
    floor = st.res["induction"]["prefix_floor_uniform_attention"]
    cap = {}
    for k in st.shots:
        o = order_heads(st.agg[k])
        cap[k] = {"prefix": retained_capacity(st.prefix, o),
                  "prefix_minus_floor": retained_capacity(st.prefix - floor, o),
                  "copying": retained_capacity(st.copy, o)}
    st.res["capacity"] = {"n_pruned": list(range(st.L * st.H + 1)), "curves": cap}


def analyse(model: GPT, tasks: ICLTasks, cfg: Config, device: str, ctx) -> dict:
    """The whole study on the trained model, in the paper's order. -> the results dict."""
    t0 = time.time()
    st = Study(model, tasks, cfg, device, ctx)
    for section in (sec_full_accuracy, fig3_head_importance, fig4_ffn_importance,
                    fig5_head_pruning, sec6_cross_task_transfer, fig6_ffn_pruning,
                    fig7_combined_pruning, fig8_agreement, fig10_induction_heads,
                    fig11_retained_capacity):
        section(st)
    L = cfg.n_layer
    st.res["physical_pruning"] = bench_physical_pruning(
        st, [(50, 0), (70, 0), (70, max(1, L // 3)), (90, L // 2)])
    st.res["analysis_elapsed_s"] = time.time() - t0
    print(f"analysis done in {time.time() - t0:.0f}s")
    return st.res


def _figure(out_dir: str, name: str, rows: list[list], draw, w: float, h: float) -> str:
    """Panels, one per item of `rows` (a list of rows), draw(ax, item) fills one; -> name."""
    import matplotlib.pyplot as plt
    plt.switch_backend("Agg")
    plt.rcParams.update({"axes.titlesize": 9, "legend.fontsize": 7})
    fig, axes = plt.subplots(len(rows), len(rows[0]), figsize=(w * len(rows[0]), h * len(rows)),
                             squeeze=False, constrained_layout=True)
    for ax, item in zip(axes.flat, [item for row in rows for item in row]):
        draw(ax, item)
    fig.savefig(os.path.join(out_dir, name), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def _heatmap(ax, m, xt, yt, title, vmin=0, vmax=1, cmap="RdYlGn", fs=7, **kw):
    """An annotated matrix (the value in every cell) with its colour bar."""
    m = np.asarray(m)
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto", **kw)
    for a, b in np.ndindex(*m.shape):
        ax.text(b, a, f"{m[a, b]:.2f}", ha="center", va="center", fontsize=fs)
    ax.set_xticks(range(len(xt)), xt, fontsize=7, rotation=60 if len(xt) > 4 else 0)
    ax.set_yticks(range(len(yt)), yt, fontsize=7)
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


def plot_fig3_fig10_maps(res, out_dir):
    """log10 aggregate IS_h per shot next to prefix matching and copying (Figs. 3 and 10)."""
    ind, shown = res["induction"], res["induction"]["copy_impl_shown"]
    maps = [(f"log10 aggregate IS_h, {k}-shot", "viridis",
             np.log10(np.array(res["head_importance_aggregate"][k]) + 1e-12))
            for k in res["shots"]]
    maps += [("prefix matching", "magma", ind["prefix_matching"]),
             (f"copying ({shown})", "magma", ind["copying"][shown])]

    def draw(ax, item):
        title, cmap, m = item
        ax.figure.colorbar(ax.imshow(m, aspect="auto", cmap=cmap), ax=ax, fraction=0.046)
        ax.set(title=title, xlabel="head", ylabel="layer", xticks=range(res["heads"]),
               yticks=range(res["layers"]))
    return _figure(out_dir, "importance.png", [maps], draw, 3.2, 2.8)


def plot_fig5_head_pruning(res, out_dir):
    """Accuracy vs % heads pruned per task (and their mean) and shot, with the controls (Fig. 5)."""
    hp, pc = res["head_pruning"], res["head_pruning"]["percent"]

    def draw(ax, tk):
        t, k = tk
        cs = [hp["curves"][f"{u}/{k}"] for u in (TASKS if t == "mean" else [t])]
        m = {key: np.mean([c[key] for c in cs], 0) for key in cs[0] if key != "random"}
        for key, fmt in (("task", "o-"), ("aggregate", "s-"), ("reverse", "x:")):
            ax.plot(pc, m[key], fmt, ms=3, label=key + " order")
        rm, rs = m["random_mean"], m["random_std"]
        ax.plot(pc, rm, color="gray", label="random (mean +- sd)")
        ax.fill_between(pc, rm - rs, rm + rs, color="gray", alpha=0.25)
        if t != "mean":
            ax.axhline(res["chance"][t], color="k", lw=0.6, ls="--")
        ax.set(title=f"{t}, {k}-shot", xlabel="% heads pruned", ylabel="accuracy",
               ylim=(-0.03, 1.03))
        if tk == (TASKS[0], res["shots"][0]):
            ax.legend()
    rows = [[(t, k) for t in TASKS + ("mean",)] for k in res["shots"]]
    return _figure(out_dir, "head_pruning.png", rows, draw, 3, 2.5)


def plot_fig4_fig6_ffn(res, out_dir):
    """FFN oracle scores per layer (Fig. 4, top row) and cumulative FFN pruning (Fig. 6)."""
    L, w = res["layers"], 0.8 / len(TASKS)

    def draw(ax, item):
        kind, k = item
        if kind == "oracle":
            for j, t in enumerate(TASKS):
                ax.bar(np.arange(L) + j * w, res["ffn_oracle"][k][t], w, label=t)
            ax.set(title=f"FFN oracle score, {k}-shot (dev prompts)", xlabel="layer",
                   ylabel="acc - acc without FFN")
        else:
            for t in TASKS:
                c = res["ffn_pruning"]["curves"][f"{t}/{k}"]
                line, = ax.plot(range(L + 1), c["oracle"], "o-", ms=3, label=f"{t}, oracle order")
                ax.plot(range(L + 1), c["random_mean"], ":", color=line.get_color())
            ax.set(title=f"cumulative FFN pruning, {k}-shot (dotted: random order)",
                   xlabel=f"FFNs pruned (of {L}; 1 step = {100 / L:.0f}%)", ylabel="accuracy",
                   ylim=(-0.03, 1.03))
        ax.legend(fontsize=6)
    rows = [[(kind, k) for k in res["shots"]] for kind in ("oracle", "pruning")]
    return _figure(out_dir, "ffn.png", rows, draw, 4, 3)


def plot_fig7_grid(res, out_dir):
    """Mean accuracy over tasks, heads % x FFNs pruned, per shot (Fig. 7)."""
    cg = res["combined_grid"]

    def draw(ax, k):
        _heatmap(ax, cg["grids"][k]["mean"], cg["ffn_pruned"], cg["head_percent"],
                 f"mean accuracy, {k}-shot", fs=6, origin="lower")
        ax.set(xlabel="FFNs pruned", ylabel="% heads pruned")
    return _figure(out_dir, "grid.png", [res["shots"]], draw, 3.6, 3.2)


def plot_sec6_transfer(res, out_dir):
    """Accuracy of each task with 70% of the heads pruned by another ranking (Sec. 6.1.2)."""
    tr, srcs = res["transfer_pruning"], list(TASKS) + ["aggregate"]

    def draw(ax, k):
        m = [[tr["acc"][f"{t}/{k}"][s][tr["percent"].index(70)] for s in srcs] for t in TASKS]
        _heatmap(ax, m, srcs, TASKS, f"accuracy at 70% heads pruned, {k}-shot")
        ax.set(xlabel="ranking taken from", ylabel="task evaluated")
    return _figure(out_dir, "transfer.png", [res["shots"]], draw, 3.8, 3.2)


def plot_fig8_spearman(res, out_dir):
    """Spearman across tasks per shot (Fig. 8) and across shots (Table 1)."""
    ag = res["agreement"]
    names, cross = ag["names"], ag["cross_shot_spearman"]
    pairs = list(cross[names[0]])

    def draw(ax, k):
        if k == "shots":
            m = [[cross[t][p] for p in pairs] for t in names]
            _heatmap(ax, m, [p + " shot" for p in pairs], names, "Spearman across shots", -1, 1,
                     "coolwarm")
        else:
            _heatmap(ax, ag["per_shot"][k]["spearman"], names, names,
                     f"Spearman across tasks, {k}-shot", -1, 1, "coolwarm", fs=6)
    return _figure(out_dir, "spearman.png", [res["shots"] + ["shots"]], draw, 3.6, 3.4)


def plot_fig10_fig11_induction(res, out_dir):
    """Prefix matching vs copying, coloured by importance (Fig. 10); retained capacity (Fig. 11)."""
    ind, H, kk, cap = res["induction"], res["heads"], res["shots"][-1], res["capacity"]
    pm, cp = np.ravel(ind["prefix_matching"]), np.ravel(ind["copying"][ind["copy_impl_shown"]])

    def scatter(ax):
        col = np.log10(np.ravel(res["head_importance_aggregate"][kk]) + 1e-12)
        ax.figure.colorbar(ax.scatter(pm, cp, c=col, cmap="viridis", s=25), ax=ax,
                           label=f"log10 aggregate IS_h ({kk}-shot)")
        marked = [tuple(v) for v in ind["induction_heads_top10pct_both"]]
        for i in range(len(pm)):
            if (i // H, i % H) in marked or pm[i] > 0.3:
                ax.annotate(f"L{i // H}H{i % H}", (pm[i], cp[i]), fontsize=7)
        ax.axvline(np.quantile(pm, 0.9), color="gray", ls=":", lw=0.8)
        ax.axhline(np.quantile(cp, 0.9), color="gray", ls=":", lw=0.8)
        ax.set(xlabel="prefix-matching score", ylabel=f"copying ({ind['copy_impl_shown']})",
               title="induction heads: top 10% on both (dotted lines)")

    def capacity(ax):
        x = 100 * np.array(cap["n_pruned"]) / (res["layers"] * H)
        for k in res["shots"]:
            c = cap["curves"][k]
            line, = ax.plot(x, c["prefix"], label=f"prefix, {k}-shot order")
            ax.plot(x, c["prefix_minus_floor"], ":", color=line.get_color())
            ax.plot(x, c["copying"], "--", color=line.get_color(), alpha=0.7)
        ax.set(xlabel="% heads pruned (least aggregate-important first)",
               ylabel="retained capacity",
               title="solid: prefix; dotted: prefix minus uniform floor; dashed: copying")
        ax.legend()
    return _figure(out_dir, "induction.png", [[scatter, capacity]], lambda ax, f: f(ax), 5, 3.8)


def plot_all(res: dict, out_dir: str):
    print("figures: " + ", ".join(f(res, out_dir) for f in (
        plot_fig3_fig10_maps, plot_fig5_head_pruning, plot_fig4_fig6_ffn, plot_fig7_grid,
        plot_sec6_transfer, plot_fig8_spearman, plot_fig10_fig11_induction)))


SCORE_VARIANTS = {f.name: f.metadata["choices"] or (True, False) for f in dataclasses.fields(Config)
                  if f.name in ("abs_per", "imp_norm", "layer_norm_imp", "agg_norm")}  # --compare


def parse_compare(spec: str) -> list[dict]:
    """'abs_per=example,layer_norm_imp' -> [{'abs_per': 'example'}, {'layer_norm_imp': True}]."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        key, _, val = item.partition("=")
        val = {"": True, "true": True, "false": False}.get(val, val)
        if val not in SCORE_VARIANTS.get(key, ()):
            raise BadInput(f"unknown --compare item {item!r}; use field=value with: " + ", ".join(
                f"{k}={'|'.join(map(str, v))}" for k, v in SCORE_VARIANTS.items()))
        out.append({key: val})
    return out


def run_compare(model: GPT, tasks: ICLTasks, cfg: Config, device: str, ctx) -> dict:
    """--compare: head-score variants side by side on one model: the Spearman of each variant's
    aggregate with the default's, and the mean accuracy over tasks at 50/70/90% heads pruned."""
    out, st = {}, Study(model, tasks, cfg, device, ctx)
    for var in [{}] + parse_compare(cfg.compare):
        st.cfg = dataclasses.replace(cfg, **var)
        fig3_head_importance(st)
        name = ",".join(f"{k}={v}" for k, v in var.items()) or "default"
        out[name] = {}
        for k in st.shots:
            rho = spearman(st.agg[k], out["default"][k]["aggregate"]) if var else 1.0
            accs = [float(np.mean([st.pruned(t, k, order_heads(st.agg[k]), p) for t in TASKS]))
                    for p in (50, 70, 90)]
            out[name][k] = {"spearman_vs_default": rho, "aggregate": st.agg[k],
                            "mean_acc_50_70_90pct": accs}
            print(f"compare {name:>24s} {k}-shot: Spearman vs default {rho:5.2f}; mean accuracy"
                  f" at 50/70/90% heads pruned " + " / ".join(f"{a:.3f}" for a in accs))
    return out


# ---- Making it fast: physical pruning (slice the weights), tested against the gates -------------
def physically_prune(model: GPT, cfg: Config, head_mask, ffn_mask) -> GPT:
    """Slice the pruned heads (rows of W_Q/W_K/W_V, columns of W_O) and the pruned FFNs out of
    the weights: a smaller GPT computing what `model` computes with these gates (a layer with no
    heads left loses its attention sublayer; a pruned FFN loses LN_2, W1 and W2).
    head_mask: (L, H) of 0/1, ffn_mask: (L,) of 0/1."""
    hm, fm = torch.as_tensor(head_mask).bool().cpu(), torch.as_tensor(ffn_mask).bool().cpu()
    small = GPT(cfg, model.wte.num_embeddings, heads=hm.sum(1).tolist(), ffns=fm.tolist())
    small.to(next(model.parameters()).device, next(model.parameters()).dtype)
    H, hs = cfg.n_head, model.head_size
    with torch.no_grad():
        for name in ("wte", "wpe", "ln_f"):
            getattr(small, name).load_state_dict(getattr(model, name).state_dict())
        for l, (big, sb) in enumerate(zip(model.blocks, small.blocks)):
            # big.attn.c_attn.weight (3*H*hs, C) = [W_Q; W_K; W_V], head h in rows h*hs..h*hs+hs-1
            # of each third; big.attn.c_proj.weight (C, H*hs) = W_O, head h in those columns;
            # sb (the small block): attn None if no head is kept, else h = hm[l].sum() heads
            # BEGIN EXERCISE prune_physical: kept heads: W_Q/W_K/W_V rows, W_O columns, gates; ln_1
            keep = hm[l].nonzero().flatten()
            if sb.attn is not None:
                sb.ln_1.load_state_dict(big.ln_1.state_dict())
                rows = ((keep * hs)[:, None] + torch.arange(hs)[None, :]).flatten()  # kept slices
                W = big.attn.c_attn.weight  # (3*H*hs, C) = [W_Q; W_K; W_V]
                sb.attn.c_attn.weight.copy_(torch.cat([W[i * H * hs:(i + 1) * H * hs][rows]
                                                       for i in range(3)]))
                sb.attn.c_proj.weight.copy_(big.attn.c_proj.weight[:, rows])  # (C, h*hs)
                sb.attn.head_mask.copy_(big.attn.head_mask[keep])
            # END EXERCISE prune_physical
            if sb.mlp is not None:
                sb.ln_2.load_state_dict(big.ln_2.state_dict())
                sb.mlp.load_state_dict(big.mlp.state_dict())
                sb.ffn_mask.copy_(big.ffn_mask)
    return small


def forward_flops_per_token(m: GPT, T: int) -> float:
    """Matmul FLOPs per token of m's forward pass (2 per multiply-add): the ideal speed-up."""
    C, hs = m.wte.embedding_dim, m.head_size
    f = 2 * C * m.vocab_size  # lm_head
    for blk in m.blocks:
        h = blk.attn.n_head if blk.attn is not None else 0
        f += 2 * C * 3 * h * hs + 2 * h * hs * C + 2 * 2 * h * hs * T  # qkv, W_O, QK^T and AV
        f += 2 * 2 * C * 4 * C if blk.mlp is not None else 0
    return float(f)


@torch.no_grad()
def bench_physical_pruning(st: Study, settings) -> list:
    """For each (heads %, FFNs pruned), heads ranked by the aggregate IS_h and FFNs by the oracle
    at the last shot: max |logit difference| between the gated and the physically pruned model,
    and the forward speed-up: the median over rounds in which the two take turns (a change of
    machine load hits both alike), next to the ideal FLOP ratio."""
    model, cfg, k = st.model, st.cfg, st.shots[-1]
    head_order, ffn_order = order_heads(st.agg[k]), np.argsort(st.ffn_agg[k], kind="stable")
    L, H, T = cfg.n_layer, cfg.n_head, cfg.block_size
    g = torch.Generator().manual_seed(cfg.seed + 5)
    x = torch.randint(model.vocab_size, (cfg.speed_batch, T), generator=g).to(st.device)

    def seconds(m):
        t0 = time.perf_counter()
        m(x)
        sync(x.device.type)
        return time.perf_counter() - t0
    rounds, out = 15 if "cuda" in st.device else 7, []
    for p, nf in settings:
        hm, fm = prune_mask(head_order, p * L * H // 100, (L, H)), prune_mask(ffn_order, nf, L)
        small = physically_prune(model, cfg, hm, fm).eval()
        model.set_masks(hm, fm)
        diff = float((model(x[:8])[0].float() - small(x[:8])[0].float()).abs().max())
        model.set_masks(None, None)
        with st.ctx:  # 3 warm-up rounds left out
            t = np.array([[seconds(model), seconds(small)] for _ in range(3 + rounds)])[3:]
        speed, (t_full, t_pruned) = float(np.median(t[:, 0] / t[:, 1])), np.median(t, 0)
        ideal = forward_flops_per_token(model, T) / forward_flops_per_token(small, T)
        out.append({"heads_pruned_pct": p, "ffns_pruned": nf, "params_full": model.num_params(),
                    "params_pruned": small.num_params(), "max_abs_logit_diff": diff,
                    "time_full_s": t_full, "time_pruned_s": t_pruned, "speedup_measured": speed,
                    "speedup_ideal_flops": ideal})
        print(f"physical pruning {p}% heads + {nf} FFNs: params {model.num_params():,} -> "
              f"{small.num_params():,}, max|dlogit| {diff:.1e}, speed-up measured {speed:.2f}x "
              f"(median of {len(t)}) vs ideal {ideal:.2f}x")
    return out


def run_bench(model: GPT, tasks: ICLTasks, cfg: Config, device: str, ctx) -> list:
    """--bench p[:n_ffn],...: the physical-pruning speed test alone (scores at the last shot)."""
    last = str(parse_shots(cfg.shots)[-1])
    st = Study(model, tasks, dataclasses.replace(cfg, shots=last), device, ctx)
    fig3_head_importance(st)
    fig4_ffn_importance(st)
    return bench_physical_pruning(st, parse_bench(cfg.bench, cfg.n_layer))


def parse_bench(spec: str, L: int) -> list[tuple[int, int]]:
    """'50,70:1' -> [(50, 0), (70, 1)]: head-prune percentages, optionally with FFNs pruned."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        m = re.fullmatch(r"(\d+)(?::(\d+))?", item)  # p or p:n_ffn
        p, nf = (int(m[1]), int(m[2] or 0)) if m else (-1, 0)
        need(0 <= p <= 100 and 0 <= nf <= L, f"bad --bench item {item!r}: use p or p:n_ffn with "
             f"0 <= p <= 100 (heads %) and 0 <= n_ffn <= n_layer ({L})")
        out.append((p, nf))
    need(out or not spec.strip(), "--bench is empty; give head-prune percentages, e.g. 50,70,90")
    return out


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
    ok = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if cfg.device == "auto":
        return next(d for d, have in ok.items() if have)
    need(ok[cfg.device], f"--device {cfg.device} is not available here; use --device cpu or auto")
    return cfg.device


RULES = (  # (flags, what each must be, the test)
    (("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_interval",
      "eval_iters", "n_eval", "n_imp", "n_dev", "n_random", "n_prefix_seq", "prefix_len",
      "analysis_batch", "speed_batch", "n_labels", "n_clusters"), "an integer >= 1",
     lambda v: v >= 1),
    (("max_iters", "warmup_iters", "stop_at", "weight_decay", "grad_clip"),
     "a finite number >= 0", lambda v: 0 <= v < math.inf),
    (("lr",), "a finite number > 0", lambda v: 0 < v < math.inf),
    (("beta1", "beta2", "rep_frac", "rep_frac_early", "text_frac"), "in [0, 1)",
     lambda v: 0 <= v < 1),
    (("rep_early",), "in [0, 1]", lambda v: 0 <= v <= 1),
    (("seed", "task_seed"), "in [0, 2**32)", lambda v: 0 <= v < 2 ** 32),
)


def validate(cfg: Config, device: str = "cpu") -> Config:
    """Reject bad settings (BadInput) before anything is read or written."""
    for names, want, ok in RULES:
        for n in names:
            need(ok(getattr(cfg, n)), f"--{n} must be {want} (got {getattr(cfg, n)})")
    need(0 <= cfg.min_lr <= cfg.lr, f"--min_lr must be in [0, lr={cfg.lr}] (got {cfg.min_lr})")
    need(cfg.max_iters >= 1 or cfg.skip_train, "--max_iters must be >= 1 (or use --skip_train)")
    k, text = max(parse_shots(cfg.shots)), cfg.text_frac if cfg.dataset != "none" else 0.0
    need(max(cfg.rep_frac, cfg.rep_frac_early) + text < 1, f"--rep_frac {cfg.rep_frac} and "
         f"--rep_frac_early {cfg.rep_frac_early} plus --text_frac {text} must each stay below 1")
    parse_compare(cfg.compare)
    parse_bench(cfg.bench, cfg.n_layer)
    need(not (cfg.bench and cfg.compare), "--bench and --compare each replace the analysis")
    need(not (cfg.skip_train and cfg.resume), "--skip_train and --resume contradict each other")
    need(cfg.n_embd % cfg.n_head == 0, f"--n_head {cfg.n_head} does not divide --n_embd")
    need(cfg.n_labels >= cfg.n_clusters, "--n_labels must be >= --n_clusters")
    need(cfg.block_size >= max(3 + 2 * k, 18), f"--block_size {cfg.block_size} is too short: a "
         f"{k}-shot prompt needs {3 + 2 * k} tokens, prefix matching 18; raise it or lower --shots")
    n_content = max(2 * cfg.n_clusters, 8, 2 * k + 2)
    need(cfg.n_content >= n_content, f"--n_content {cfg.n_content} is too small for "
         f"{cfg.n_clusters} clusters and {k} shots; use at least {n_content}")
    need(cfg.dtype != "float16" or device in ("cuda", "mps"),
         "float16 needs CUDA or MPS; use float32 or bfloat16")
    parent = os.path.abspath(cfg.out_dir)   # out_dir: a file, under a file, not writable?
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    need(os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK),
         f"--out_dir {cfg.out_dir}: {parent} is not a writable directory")
    need(not (cfg.skip_train or cfg.resume) or os.path.isfile(ckpt_path(cfg)),
         f"checkpoint {ckpt_path(cfg)} not found; train first, or give --skip_train a --ckpt PATH")
    return cfg


def ckpt_path(cfg: Config) -> str:
    return cfg.ckpt if cfg.skip_train and cfg.ckpt else os.path.join(cfg.out_dir, "ckpt.pt")


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
    """Mean CE on fixed val batches (the same at every eval) + accuracy on the quick prompts."""
    raw.eval()
    egen = torch.Generator().manual_seed(cfg.seed + 99)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = ds.get(cfg.batch_size, egen, split="val")
        with run.autocast:
            losses.append(raw(x.to(run.dev), y.to(run.dev))[1].item())
    accs = {f"acc_{t}_{k}": accuracy(raw, X, Y, ds.tasks.candidates(t), run.dev, 256, run.autocast)
            for (t, k), (X, Y) in ds.quick.items()}
    raw.train()
    return float(np.mean(losses)), accs


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
    if use_compile and device != "cuda":
        print(f"note: torch.compile is not used on {device} here; running eagerly")
        use_compile = False
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
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
    raw = GPT(cfg, ds.tasks.vocab_size).to(run.dev)
    st = SimpleNamespace(raw=raw, opt=make_optimizer(raw, cfg, run.device), step=0, log=[],
                         elapsed=0.0, path=ckpt_path(cfg),
                         kept="no checkpoint yet", scaler=torch.amp.GradScaler(
                             enabled=run.dtype == torch.half and run.device == "cuda"),
                         gen=torch.Generator().manual_seed(cfg.seed + 1000 * run.rank))  # data
    if ck is not None:
        restore(ck, st, run.device)
    return st


def train(cfg: Config, ds, device, ck=None):
    """Train one model (nanoGPT's loop; with --skip_train, only load it); then finish_run."""
    run = setup_run(cfg, device)
    st = init_state(cfg, ds, run, ck)
    if run.master:
        write_run_info(cfg, ds, run, st.raw)
    model = torch.compile(st.raw) if run.compile else st.raw
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[run.dev.index] if device == "cuda" else None)
    first, t0 = st.step, time.time()
    st.mark, st.tps = (t0, first), float("nan")  # start of the timed interval: (time, step)
    bad = torch.zeros(2, dtype=torch.bool, device=run.dev)   # [loss, grad norm] non-finite
    pbar = tqdm(total=cfg.max_iters, initial=first, dynamic_ncols=True, desc="train",
                disable=not (run.master and cfg.progress) or cfg.skip_train)
    try:
        while True:
            stop = cfg.skip_train or st.step >= cfg.max_iters or 0 < cfg.stop_at <= st.step
            if (st.step % cfg.eval_interval == 0 or stop) and st.step > first:
                check_finite(bad, st)                                      # never save bad weights
                log_eval(cfg, ds, run, st, time.time() - t0)
                st.mark = (time.time(), st.step)
            if stop:
                break
            train_step(model, ds, cfg, run, st, bad)
            if device != "cuda" or st.step % 10 == 0:  # CPU: every step; CUDA: with the loss sync
                check_finite(bad, st)
                pbar.set_postfix(loss=f"{float(st.loss):.3f}")
            if st.step - first == 3:                   # compile and warm-up done: restart the clock
                sync(device)
                st.mark = (time.time(), st.step)
            pbar.update(1)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted at step {st.step}; {st.kept}") from None
    st.elapsed += time.time() - t0
    pbar.close()
    return finish_run(cfg, ds, run, st)


def train_step(model, ds, cfg, run, st, bad):
    """One optimizer step (grad_accum micro-steps); flags a non-finite loss / grad norm in bad."""
    for group in st.opt.param_groups:
        group["lr"] = get_lr(st.step, cfg)
    st.loss = 0.0
    for micro in range(cfg.grad_accum):
        x, y = ds.get(cfg.batch_size, st.gen, it=st.step)
        x, y = x.to(run.dev, non_blocking=True), y.to(run.dev, non_blocking=True)
        if run.ddp:
            model.require_backward_grad_sync = micro == cfg.grad_accum - 1
        with run.autocast:
            loss = model(x, y)[1] / cfg.grad_accum
        st.loss += loss.detach()
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
    st.step += 1


def check_finite(bad, st):
    if bool(bad.any()):
        what = "loss" if bool(bad[0]) else "grad norm"
        raise Diverged(f"step {st.step}: {what} is not finite; {st.kept}")


PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12,
             "V100": 125e12}   # dense bf16 FLOP/s, for MFU; first match of the device name wins


def device_name(device):
    return torch.cuda.get_device_name(device) if str(device).startswith("cuda") else str(device)


def log_eval(cfg, ds, run, st, elapsed):
    """Tokens/s since st.mark; evaluate, append a row to log.csv, print it, checkpoint."""
    sync(run.device)
    tps = st.tps = ((st.step - st.mark[1]) * run.tokens / (time.time() - st.mark[0])
                    if st.step > st.mark[1] else st.tps)   # (else: the last interval's)
    val_loss, accs = evaluate(st.raw, ds, cfg, run)
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name(run.device)), None)
    fwd = forward_flops_per_token(st.raw, cfg.block_size)
    st.log.append(dict(step=st.step, tokens=st.step * run.tokens,
                       elapsed_s=round(st.elapsed + elapsed, 3), lr=get_lr(st.step - 1, cfg),
                       train_loss=float(st.loss), val_loss=val_loss, tokens_per_s=tps,
                       mfu=tps * 3 * fwd / peak if peak and tps == tps else None, **accs))
    if not run.master:
        return
    write_csv(os.path.join(cfg.out_dir, "log.csv"), st.log)
    tqdm.write(f"step {st.step}: train {float(st.loss):.4f} val {val_loss:.4f} | " + " ".join(
        f"{t[:4]}{k}={accs[f'acc_{t}_{k}']:.2f}" for t, k in ds.quick))
    save_checkpoint(st, cfg, run.device, st.elapsed + elapsed)


def finish_run(cfg, ds, run, st):
    """results.json; after a full run the paper's analysis and figures (or --bench, --compare)."""
    if not run.master:
        return None
    if not all(torch.isfinite(v).all() for v in st.raw.state_dict().values()):
        raise Diverged(f"{st.path} has non-finite weights (step {st.step}); nothing to analyse")
    f, t0 = st.log[-1], time.time()
    final = dict(train_loss=f["train_loss"], val_loss=f["val_loss"],
                 val_ppl=math.exp(min(f["val_loss"], 700)), tokens_per_s=f["tokens_per_s"],
                 mfu=f["mfu"], params=st.raw.num_params(), steps=st.step, elapsed_s=st.elapsed)
    res = dict(script=SCRIPT + ".py", config=asdict(cfg), final=final,
               device=str(run.dev), torch=torch.__version__)
    args = (st.raw, ds.tasks, cfg, str(run.dev), run.autocast)
    if 0 < cfg.stop_at <= st.step < cfg.max_iters and not cfg.skip_train:
        print(f"stopped at step {st.step} (--stop_at); continue with --resume")
    elif cfg.bench:
        res["bench"] = run_bench(*args)
    elif cfg.compare:
        res["compare"] = run_compare(*args)
    elif cfg.analysis:
        res.update(analyse(*args))
        plot_all(res, cfg.out_dir)
    res["total_elapsed_s"] = st.elapsed + time.time() - t0
    write_json(os.path.join(cfg.out_dir, "results.json"), res)
    print(f"done in {res['total_elapsed_s']:.0f}s; results in {cfg.out_dir}/results.json")
    return res


# ---- checkpoints and files
def save_checkpoint(st, cfg, device, elapsed):
    """Model, optimizer, config, step, log, RNG states: to ckpt.pt.tmp, then renamed (atomic)."""
    ck = dict(script=SCRIPT, model=st.raw.state_dict(), optimizer=st.opt.state_dict(),
              config=asdict(cfg), step=st.step, log_rows=st.log, elapsed_s=elapsed,
              rng=dict(data=st.gen.get_state(), torch=torch.get_rng_state(),
                       cuda=torch.cuda.get_rng_state() if device == "cuda" else None))
    write_file(st.path, lambda f: torch.save(ck, f), "wb")
    st.kept = f"kept {st.path} (step {st.step})"


def load_checkpoint(path, cfg):
    """Read and check a checkpoint; its MODEL_FIELDS replace the config's (a field given on the
    command line must agree with it)."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if not (isinstance(ck, dict) and {"script", "model", "optimizer", "step", "config",
                                          "log_rows"} <= set(ck)):
            raise ValueError("not a training checkpoint of these scripts")
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInput(f"cannot read checkpoint {path}: {msg}; train again or pass another --ckpt")
    need(ck["script"] == SCRIPT, f"{path} was written by {ck['script']}.py, not {SCRIPT}.py")
    for k in MODEL_FIELDS:
        need(k not in cfg.explicit or ck["config"].get(k) == getattr(cfg, k),
             f"checkpoint has {k}={ck['config'].get(k)} but --{k} {getattr(cfg, k)} was given")
        setattr(cfg, k, ck["config"][k])
    return ck


def restore(ck, st, device):
    try:
        st.raw.load_state_dict(ck["model"])
        st.opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # (the last line names a tensor)
        raise BadInput(f"checkpoint {st.path} does not fit this model: "
                       f"{str(e).strip().splitlines()[-1].strip()}") from None
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


def write_run_info(cfg, ds, run, raw):
    """config.json, and the model in one line."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    print(f"model: {cfg.n_layer} layers x {cfg.n_head} heads, d {cfg.n_embd}, T "
          f"{cfg.block_size}, {raw.num_params():,} parameters, vocab {ds.tasks.vocab_size}; "
          f"device {run.dev}, dtype {str(run.dtype)[6:]}, preset {cfg.preset}")
    write_json(os.path.join(cfg.out_dir, "config.json"), dict(
        config=asdict(cfg), torch=torch.__version__, device=run.device,
        device_name=device_name(run.device), git_commit=git_commit(), world_size=run.world))


def main(argv=None):
    created = None  # the out_dir this run created: removed again if it fails on bad input
    try:
        cfg = parse_config(argv)
        device = resolve_device(cfg)
        validate(cfg, device)
        ck = None
        if cfg.resume or cfg.skip_train:
            ck = load_checkpoint(ckpt_path(cfg), cfg)
            validate(cfg, device)
        text = None
        if cfg.dataset != "none":
            try:
                text = data.load_dataset(name=cfg.dataset, tokenizer=cfg.tokenizer,
                                         data_dir=cfg.data_dir or None)
                text.check_block_size(cfg.block_size)
            except data.DataError as e:  # only here: later ones must not remove a run's files
                raise BadInput(str(e)) from None
        created = None if os.path.exists(cfg.out_dir) else cfg.out_dir
        os.makedirs(cfg.out_dir, exist_ok=True)
        try:
            tasks = ICLTasks(cfg.n_content, cfg.n_labels, cfg.n_clusters, cfg.task_seed,
                             text.vocab_size if text is not None else 0)
            return train(cfg, Batcher(tasks, cfg, text), device, ck)
        except RuntimeError as e:  # (torch.cuda.OutOfMemoryError is one)
            if not isinstance(e, torch.cuda.OutOfMemoryError) and "allocate memory" not in str(e):
                raise
            raise BadInput(f"out of memory at batch_size {cfg.batch_size}, block_size "
                           f"{cfg.block_size}, n_embd {cfg.n_embd}, n_layer {cfg.n_layer}; "
                           "lower them (or raise --grad_accum); in the analysis, lower "
                           "--analysis_batch") from None
    except (BadInput, Diverged, KeyboardInterrupt) as e:  # one line; exit 2, 3 or 130
        code, what = {BadInput: (2, "error: "), Diverged: (3, "diverged: ")}.get(type(e), (130, ""))
        if code == 2 and created and not any("ckpt.pt" in f for _, _, f in os.walk(created)):
            shutil.rmtree(created, ignore_errors=True)  # (a run with a checkpoint is kept)
        print(f"{SCRIPT}.py: {what}{str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(code)
    finally:  # torchrun: destroy the process group once
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
