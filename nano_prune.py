"""
nano_prune.py -- which attention heads and FFNs does in-context learning need?

Paper: Hritik Bansal, Karthik Gopalakrishnan, Saket Dingliwal, Sravan Bodapati,
Katrin Kirchhoff, Dan Roth. "Rethinking the Role of Scale for In-Context
Learning: An Interpretability-based Case Study at 66 Billion Scale".
ACL 2023, arXiv 2212.09095. Builds on Michel, Levy & Neubig 2019 ("Are Sixteen
Heads Really Better than One?", arXiv 1905.10650) and Olsson et al. 2022
("In-context Learning and Induction Heads").

The story
---------
Bansal et al. ask how much of OPT-66B is actually used when it learns a task
from a few demonstrations in its prompt (in-context learning, ICL). They give
every attention head a gradient importance score, every FFN an oracle
(knock-out) score, prune the least important components and measure accuracy
at 0, 1 and 5 shots. About 70% of the heads and 20% of the FFNs can go with
little loss, the important heads overlap across tasks and shots, and many of
them look like *induction heads* (attend to the token after an earlier copy of
the current token, then copy it).

This file redoes the whole study in miniature on a small GPT that we train on
in-context tasks generated right here (copy, successor, associative recall,
in-context cluster classification, plus repeated random sequences so that
induction heads form), and adds the controls the paper lacks: random and
reverse pruning orders, FFN pruning on a separate dev split, and an ablation
of the top induction heads against random heads. (One training choice is ours,
not the paper's, which studies a pretrained model: repeated random sequences fill
80% of each batch for the first 30% of training, so that induction heads form
within a few CPU minutes; see --rep_frac_early.)

Key equations
-------------
Gate every head's output with xi_h (1 = keep, 0 = pruned), before W_O:

    MHA(x) = sum_h  xi_h * A_h(x) W_O^h ,   A_h(x) = softmax(q_h k_h^T / sqrt(d_h)) v_h   (N x d_h)

Head importance (paper Eq. 8; Michel et al. 2019 Eq. 2):

    IS_h = E_(x,y) | A_h^T dL(y|x)/dA_h |  =  E_(x,y) | dL(y|x)/d xi_h |   (at xi = 1)
    L(y|x) = -(1/T_y) sum_j log p(y_j | x, y_<j)        (paper Eq. 9, answer tokens only)

where A^T dL/dA is the Frobenius inner product over all positions and d_h.
The official code takes |.| per token, sum_t |<A_t, g_t>| (our default,
--abs_per token); the paper's equation takes it per example (--abs_per example).
Task aggregate (paper Eq. 10): mean of the per-task score matrices, per shot.

FFN importance (paper Eq. 7), an oracle knock-out on a dev split:

    IS_FFN_l = acc(model) - acc(model without FFN l)      (the whole sublayer, its LayerNorm included)

Induction heads (paper Alg. 1-2, App. A.4): prefix-matching score = mean
attention from a token in a repeated random sequence to the tokens that
*followed* its earlier occurrences; copying score = how much a head's output
raises the logit of the token it attends to.

Pipeline
--------
    synthetic ICL episodes  [BOS][TASK] x1 y1 ... xk yk x_q -> y_q   (+ repeated random sequences)
            |
            v
    train GPT (gates xi_h on heads, xi_l on FFNs, all = 1)      or  --skip_train --ckpt PATH
            |
            v
    full-model accuracy per task x shot (0/1/5), warn near chance
            |
            +--> head importance per (task, shot) on separate prompts --> aggregate per shot
            |        |                       |
            |        v                       v
            |    Spearman / top-30% overlap   pruning curves: task / aggregate / random / reverse order
            |                                 (one global ranking from the unpruned model; --rescore)
            +--> FFN oracle on dev split --> cumulative FFN pruning --> heads x FFNs grid
            |
            +--> prefix-matching + copying scores --> induction heads --> retained capacity
            |                                          and top-n induction vs n random ablation
            v
    physical pruning (slice W_qkv, W_O, drop FFNs) == masked model; measured vs ideal speed-up
            |
            v
    results.json + PNG figures in --out_dir

Run
---
    python nano_prune.py                         # laptop CPU preset: ~3 min training + ~1 min analysis, one core
    python nano_prune.py --preset gpu            # 6 layers x 8 heads, d 256 (default with CUDA); ~2.5 min on an H100
    python nano_prune.py --skip_train --ckpt out_prune/ckpt.pt --out_dir out_prune2   # analyse only
    torchrun --nproc_per_node 2 nano_prune.py --preset gpu                           # DDP training
    python -m pytest -q tests/test_prune.py      # CPU, under a minute
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TASKS = ("copy", "succ", "recall", "cluster")
COPY_IMPLS = ("olsson", "official", "eigen")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class Config:
    # --- run ---
    preset: str = "auto"  # named config: cpu (laptop, minutes) | gpu (one large GPU) | auto (gpu if CUDA else cpu)
    device: str = "auto"  # auto | cpu | cuda | mps (auto: cuda > mps > cpu)
    dtype: str = "auto"  # auto (bf16 on CUDA, else fp32) | float32 | bfloat16 | float16
    compile: bool | None = None  # torch.compile the training model (default: on for CUDA, off elsewhere)
    seed: int = 1337  # seed for init, batches and the analysis prompts
    out_dir: str = "out_prune"  # where config.json, log.csv, results.json, ckpt.pt and the PNGs go
    resume: bool = False  # continue training from out_dir/ckpt.pt
    progress: bool = True  # tqdm progress bars (--no-progress for logs redirected to a file)
    ckpt: str = ""  # checkpoint to analyse with --skip_train (default: out_dir/ckpt.pt)
    skip_train: bool = False  # do not train; load --ckpt and only run the analysis
    analysis: bool = True  # run the pruning / induction analysis after training
    stop_iter: int = 0  # stop (and checkpoint) after this iteration, keeping the max_iters schedule; 0 = off
    # --- data: synthetic in-context tasks (always) + optional natural text ---
    dataset: str = "none"  # optional natural text in training: none | shakespeare | pycode | pycode_all | a file
    tokenizer: str = "char"  # tokenizer of the optional natural text: char | gpt2
    data_dir: str = ""  # where the data loader looks for source files (empty: $NANO_DATA_DIR or data/)
    text_frac: float = 0.2  # fraction of each batch that is natural text (only with --dataset)
    n_content: int = 32  # number of content tokens the tasks draw from (chance for copy/succ/recall = 1/n_content)
    n_labels: int = 8  # label tokens of the cluster task (chance = 1/n_labels)
    n_clusters: int = 4  # fixed latent clusters of content tokens in the cluster task
    task_seed: int = 0  # seed of the fixed task definitions (the cluster partition)
    rep_frac: float = 0.25  # fraction of each batch that is repeated random sequences (makes induction heads)
    rep_frac_early: float = 0.8  # that fraction during the first rep_early of training (induction heads form sooner)
    rep_early: float = 0.3  # fraction of max_iters that uses rep_frac_early (0 = off)
    recall_max_keys: int = 8  # a training recall episode uses 1..this many distinct keys
    # --- model ---
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 64  # residual width d_model
    block_size: int = 64  # context length T
    dropout: float = 0.0  # dropout (training only)
    # --- training ---
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 2500  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # final learning rate of the cosine schedule
    warmup_iters: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay (matrices and embeddings only)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    eval_interval: int = 250  # steps between evaluations (val loss + accuracies) and checkpoints
    eval_iters: int = 4  # validation batches per evaluation
    # --- analysis ---
    shots: str = "0,1,5"  # numbers of demonstrations k to evaluate and score
    n_eval: int = 400  # evaluation prompts per (task, shot)
    n_imp: int = 256  # importance prompts per (task, shot), drawn separately from the eval prompts
    n_dev: int = 300  # dev prompts per (task, shot) for the FFN oracle scores
    abs_per: str = "token"  # where |.| is taken in IS_h: token (official code) | example (paper Eq. 8)
    imp_norm: str = "example"  # normaliser: example (mean over prompts) | official (tokens; last layer: answer tokens)
    layer_norm_imp: bool = False  # Michel et al.'s per-layer L2 normalisation of head scores
    agg_norm: str = "mean"  # task aggregation: mean (paper Eq. 10) | sum1 (each task's scores normalised to sum 1)
    n_random: int = 3  # seeds of the random-order control
    rescore: bool = False  # recompute task importance after every pruning step (Michel's exact_pruning)
    grid_max_heads: int = 70  # largest head-pruning percentage in the heads x FFNs grid
    topk_frac: float = 0.3  # top fraction of heads compared in the overlap analysis
    n_prefix_seq: int = 50  # random sequences for the prefix-matching and copying scores
    prefix_len: int = 25  # length L of the repeated segment (capped so 2 + 4L fits the context)
    copy_impl: str = "olsson"  # copying score shown in the figures: olsson | official | eigen (all are saved)
    ablate_n: str = "1,2,4,8"  # numbers of top prefix-matching heads (vs as many random heads) to remove
    analysis_batch: int = 256  # prompts per forward pass in the analysis
    speed_batch: int = 64  # batch of full-length sequences for the physical-pruning speed test


PRESETS = {
    "cpu": {},  # the dataclass defaults: 4 layers x 4 heads, d 64, T 64, ~4 minutes of training on a laptop
    "gpu": dict(n_layer=6, n_head=8, n_embd=256, block_size=128, n_content=96, batch_size=256,
                max_iters=5000, lr=1e-3, min_lr=1e-4, warmup_iters=200, eval_interval=500, eval_iters=8,
                n_eval=1000, n_imp=1024, n_dev=500, n_random=5, analysis_batch=512, speed_batch=256),
}
CHOICES = dict(preset=("auto", "cpu", "gpu"), device=("auto", "cpu", "cuda", "mps"),
               dtype=("auto", "float32", "bfloat16", "float16"), tokenizer=("char", "gpt2"),
               abs_per=("token", "example"), imp_norm=("example", "official"), agg_norm=("mean", "sum1"),
               copy_impl=COPY_IMPLS)
# fields that define the trained model and its tasks: taken from the checkpoint with --skip_train/--resume
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "n_content", "n_labels", "n_clusters",
                "task_seed", "dataset", "tokenizer")


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr and exit status 2, instead of the usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """argparse generated from the dataclass: every field is a flag, --help shows the defaults."""
    p = _OneLineParser(description="Bansal et al. 2023 in miniature: head/FFN importance, "
                                "pruning curves and induction heads. Defaults shown are the cpu preset's.")
    comments = _field_comments()
    for f in dataclasses.fields(Config):
        helptext = comments.get(f.name, "") + f" (default: {f.default})"
        if f.type in ("bool", "bool | None"):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(f"--{f.name}", type=typ, default=None, choices=CHOICES.get(f.name), help=helptext)
    return p


def _field_comments() -> dict:
    """The one-line comments of the Config fields, reused as --help texts."""
    import inspect
    out = {}
    try:
        src = inspect.getsource(Config)
    except (OSError, TypeError):
        return out
    for line in src.splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith("#"):
            name = line.split(":")[0].strip()
            out[name] = line.split("#", 1)[1].strip().replace("%", "%%")
    return out


def parse_config(argv=None) -> tuple[Config, set]:
    """defaults <- preset <- explicit flags. Returns the config and the names given explicitly."""
    parser = build_parser()

    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    cfg = Config()
    preset = given.get("preset", "auto")
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() else "cpu"
    for k, v in PRESETS[preset].items():
        setattr(cfg, k, v)
    for k, v in given.items():
        setattr(cfg, k, v)
    cfg.preset = preset
    return cfg, set(given)


def parse_ints(s: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip() != ""]
    except ValueError:
        raise UsageError(f"--{name} must be a comma-separated list of integers, got {s!r}")
    if not vals or min(vals) < 0:
        raise UsageError(f"--{name} needs at least one non-negative integer, got {s!r}")
    return vals


# ----------------------------------------------------------------------------------------------
# In-context tasks (paper Sec. 3 uses 14 lm-eval tasks; we generate exactly scorable ones)
# ----------------------------------------------------------------------------------------------
class ICLTasks:
    """Vocabulary and episode generators.

    Token ids: PAD=0, BOS=1, REP=2 (template of repeated sequences), one template token per task,
    then n_content content tokens c0.., then n_labels label tokens L0.., then (optional) text tokens.
    Episode:  [BOS][TASK] x1 y1 x2 y2 ... xk yk x_q  -> the model must predict y_q at x_q.
      copy:    y = x                          (rule in the weights; the template token suffices)
      succ:    y = x + 1 mod n_content        (rule in the weights)
      recall:  per-episode random key -> value map, the query key is one of the demo keys (induction)
      cluster: n_clusters fixed latent clusters of content tokens, per-episode random cluster -> label map;
               the query is a *new* token whose cluster appears in the demos (latent-concept ICL)
    """
    PAD, BOS, REP = 0, 1, 2

    def __init__(self, n_content: int, n_labels: int, n_clusters: int, task_seed: int, text_vocab: int = 0,
                 max_keys: int = 8):
        self.N, self.n_labels, self.n_clusters, self.max_keys = n_content, n_labels, n_clusters, max_keys
        self.template = {t: 3 + i for i, t in enumerate(TASKS)}
        self.C0 = 3 + len(TASKS)  # first content token
        self.L0 = self.C0 + n_content  # first label token
        self.T0 = self.L0 + n_labels  # first natural-text token
        self.vocab_size = self.T0 + text_vocab
        g = torch.Generator().manual_seed(task_seed)
        self.cluster_of = torch.randperm(n_content, generator=g) % n_clusters  # (N,) balanced partition

    def candidates(self, task: str) -> torch.Tensor:
        """Token ids the answer is chosen from (accuracy = argmax over these, like lm-eval's multiple choice)."""
        if task == "cluster":
            return torch.arange(self.L0, self.L0 + self.n_labels)
        return torch.arange(self.C0, self.C0 + self.N)

    def chance(self, task: str) -> float:
        return 1.0 / len(self.candidates(task))

    @staticmethod
    def _seen_before(a: torch.Tensor) -> torch.Tensor:
        """(B, k) -> (B, k) bool: does a[b, i] occur among a[b, :i]?"""
        k = a.shape[1]
        eq = a[:, :, None] == a[:, None, :]  # (B, k, k)
        return (eq & torch.ones(k, k, dtype=torch.bool).tril(-1)).any(2)

    def pairs(self, task: str, B: int, npairs: int, g: torch.Generator, query: bool):
        """Content-level pairs (x, y) of B episodes, as token ids, and a mask of answerable y's.

        query=False: training episodes (x_i i.i.d.; recall keys repeat so later ones are answerable).
        query=True: npairs-1 demonstrations + one query that the demonstrations determine (if any)."""
        N, C0 = self.N, self.C0
        if task in ("copy", "succ"):
            x = torch.randint(N, (B, npairs), generator=g)
            y = x if task == "copy" else (x + 1) % N
            return x + C0, y + C0, torch.ones(B, npairs, dtype=torch.bool)
        perm = torch.rand(B, N, generator=g).argsort(1)  # (B, N) a random order of the content tokens
        k = npairs - 1
        if task == "recall":
            value_of = torch.randint(N, (B, N), generator=g)  # per-episode key -> value map
            if query:
                keys = perm[:, :npairs].clone()  # k distinct demo keys (+1 spare)
                if k >= 1:  # the query key is one of the demo keys
                    keys[:, k] = perm.gather(1, torch.randint(k, (B, 1), generator=g))[:, 0]
            else:
                m = torch.randint(1, min(self.max_keys, N) + 1, (B, 1), generator=g)  # keys per episode
                idx = (torch.rand(B, npairs, generator=g) * m).long()
                keys = perm.gather(1, idx)
            vals = value_of.gather(1, keys)
            return keys + C0, vals + C0, self._seen_before(keys)
        if task == "cluster":
            label_of = torch.rand(B, self.n_labels, generator=g).argsort(1)[:, :self.n_clusters]  # cluster -> label
            x = torch.randint(N, (B, npairs), generator=g)
            if query and k >= 1:  # a new token from the cluster of a random demonstration
                j = torch.randint(k, (B, 1), generator=g)
                c = self.cluster_of[x[:, :k].gather(1, j)]  # (B, 1)
                in_demo = torch.zeros(B, N, dtype=torch.bool).scatter_(1, x[:, :k], True)
                w = ((self.cluster_of[None, :] == c) & ~in_demo).float()
                w = torch.where(w.sum(1, keepdim=True) > 0, w, (self.cluster_of[None, :] == c).float())
                x[:, k] = torch.multinomial(w, 1, generator=g)[:, 0]
            cl = self.cluster_of[x]
            y = label_of.gather(1, cl)
            return x + C0, y + self.L0, self._seen_before(cl)
        raise ValueError(task)

    def prompts(self, task: str, k: int, n: int, g: torch.Generator):
        """n evaluation prompts with k demonstrations: X (n, 3+2k) ending in x_q, Y (n,) the answer y_q."""
        x, y, _ = self.pairs(task, n, k + 1, g, query=True)
        seq = torch.stack([x, y], 2).flatten(1)  # (n, 2k+2): x1 y1 ... xq yq
        head = torch.tensor([self.BOS, self.template[task]]).expand(n, 2)
        X = torch.cat([head, seq[:, :-1]], 1)
        return X, seq[:, -1].clone()

    def train_rows(self, task: str, B: int, T: int, g: torch.Generator):
        """B training sequences filling the context: inputs (B, T), targets (B, T) with -100 off the answers."""
        npairs = (T + 1 - 2) // 2
        x, y, ok = self.pairs(task, B, npairs, g, query=False)
        seq = torch.stack([x, y], 2).flatten(1)
        seq = torch.cat([torch.tensor([self.BOS, self.template[task]]).expand(B, 2), seq], 1)
        tgt = torch.full_like(seq, -100)
        tgt[:, 3::2] = torch.where(ok, y, torch.full_like(y, -100))  # L(y|x): loss only on answerable y's
        pad = T + 1 - seq.shape[1]
        if pad > 0:
            seq = F.pad(seq, (0, pad), value=self.PAD)
            tgt = F.pad(tgt, (0, pad), value=-100)
        return seq[:, :T], tgt[:, 1:T + 1]

    def repeat_rows(self, B: int, T: int, g: torch.Generator, lo: int = 5, hi: int = 30):
        """[BOS][REP] s s s ... with s a random segment of unique tokens; loss on the repeats only."""
        hi = max(lo, min(hi, self.N, (T - 1) // 2))
        Ls = torch.randint(lo, hi + 1, (B, 1), generator=g)
        perm = torch.rand(B, self.N, generator=g).argsort(1)
        p = torch.arange(T - 1)[None, :]  # positions after [BOS][REP]
        body = perm.gather(1, p % Ls) + self.C0
        seq = torch.cat([torch.tensor([self.BOS, self.REP]).expand(B, 2), body], 1)  # (B, T+1)
        tgt = seq[:, 1:].clone()
        tgt[torch.arange(T)[None, :].expand(B, T) < 1 + Ls] = -100  # i predicts seq[i+1]; repeats start at 2+Ls
        return seq[:, :T], tgt

    def repeated_sequences(self, n: int, L: int, g: torch.Generator, reps: int = 4):
        """[BOS][REP] + s x reps, s of L unique content tokens (paper Alg. 1 input, BOS + template)."""
        perm = torch.rand(n, self.N, generator=g).argsort(1)[:, :L] + self.C0
        head = torch.tensor([self.BOS, self.REP]).expand(n, 2)
        return torch.cat([head, perm.repeat(1, reps)], 1)

    def decode(self, ids, text_decode=None) -> str:
        out = []
        for i in (int(v) for v in ids):
            if i < 3:
                out.append(["<pad>", "<bos>", "<rep>"][i])
            elif i < self.C0:
                out.append(f"<{TASKS[i - 3]}>")
            elif i < self.L0:
                out.append(f"c{i - self.C0}")
            elif i < self.T0:
                out.append(f"L{i - self.L0}")
            else:
                out.append(repr(text_decode([i - self.T0])) if text_decode else f"t{i - self.T0}")
        return " ".join(out)


# ----------------------------------------------------------------------------------------------
# Model: nanoGPT with a gate xi_h per head (before W_O) and a gate per FFN sublayer
# ----------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head attention with per-head gates. n_head may be any number (physically pruned layers)."""

    def __init__(self, n_embd: int, n_head: int, head_size: int, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.head_size, self.dropout = n_head, head_size, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_head * head_size, bias=False)  # W_Q, W_K, W_V of all heads
        self.c_proj = nn.Linear(n_head * head_size, n_embd, bias=False)  # W_O (no bias: a pruned head adds nothing)
        self.register_buffer("head_mask", torch.ones(n_head))  # the gates xi_h (1 = keep, 0 = pruned)
        self.explicit = False  # True: write the softmax out (exposes the attention probabilities)
        self.keep = False  # True: stash att and the gated head outputs (with their gradient) for analysis
        self.att = self.y = None

    def forward(self, x):
        B, T, C = x.shape
        H, hs = self.n_head, self.head_size
        q, k, v = self.c_attn(x).split(H * hs, dim=2)
        q = q.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        k = k.view(B, T, H, hs).transpose(1, 2)
        v = v.view(B, T, H, hs).transpose(1, 2)
        att = None
        if self.explicit:  # analysis path: the same function, with the probabilities in hand
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, H, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            y = att @ v  # (B, H, T, hs) = A_h
        else:  # training path: fused kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        # xi_h * A_h, the gate multiplied into the head output before W_O (paper Sec. 2.2; Michel Eq. 1)
        y = y * self.head_mask.view(1, H, 1, 1).to(y.dtype)
        if self.keep:
            self.att = att.detach() if att is not None else None
            self.y = y
            if y.requires_grad:
                y.retain_grad()  # dL/dA_h, for IS_h = |A_h^T dL/dA_h|
        y = y.transpose(1, 2).reshape(B, T, H * hs)  # (B, T, H*hs)
        return self.c_proj(y)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float = 0.0):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        # FFN(M) = act(LN(M) W1) W2  (paper Eq. 6; GELU as in GPT-2 instead of OPT's ReLU)
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, head_size: int, ffn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, head_size, dropout) if n_head > 0 else None
        self.ln_2 = nn.LayerNorm(n_embd) if ffn else None
        self.mlp = MLP(n_embd, dropout) if ffn else None
        self.register_buffer("ffn_mask", torch.ones(()))  # gate of the whole FFN sublayer (LN included)

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(self.ln_1(x))
        if self.mlp is not None:
            # removing an FFN = skipping LN, W1, W2 and the residual add (paper Sec. 2.3.1, official fc_mask)
            x = x + self.ffn_mask.to(x.dtype) * self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int, heads: list[int] | None = None,
                 ffns: list[bool] | None = None):
        super().__init__()
        L, C = cfg.n_layer, cfg.n_embd
        self.n_layer, self.n_head, self.block_size = L, cfg.n_head, cfg.block_size
        self.head_size = C // cfg.n_head
        heads = heads if heads is not None else [cfg.n_head] * L
        ffns = ffns if ffns is not None else [True] * L
        self.vocab_size = ((vocab_size + 63) // 64) * 64  # pad the vocabulary to a multiple of 64
        self.wte = nn.Embedding(self.vocab_size, C)
        self.wpe = nn.Embedding(cfg.block_size, C)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(C, h, self.head_size, f, cfg.dropout) for h, f in zip(heads, ffns))
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, self.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        self.apply(self._init_weights)
        for n, p in self.named_parameters():
            if n.endswith("c_proj.weight"):  # residual projections: 0.02 / sqrt(2L) (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * L))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
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

    # --- analysis switches ---
    def set_analysis(self, explicit: bool, keep: bool = False):
        for blk in self.blocks:
            if blk.attn is not None:
                blk.attn.explicit, blk.attn.keep = explicit, keep
                if not keep:
                    blk.attn.att = blk.attn.y = None

    def set_masks(self, head_mask=None, ffn_mask=None):
        """head_mask: (L, H) of gates (None = all 1); ffn_mask: (L,) (None = all 1)."""
        for l, blk in enumerate(self.blocks):
            if blk.attn is not None:
                hm = torch.ones(blk.attn.n_head) if head_mask is None else torch.as_tensor(head_mask[l])
                blk.attn.head_mask = hm.to(blk.attn.head_mask.device, torch.float32).clone()
            fm = 1.0 if ffn_mask is None else float(ffn_mask[l])
            blk.ffn_mask = torch.tensor(fm, device=blk.ffn_mask.device)


def physically_prune(model: GPT, cfg: Config, head_mask, ffn_mask) -> GPT:
    """Slice the pruned heads (rows of W_Q/W_K/W_V, columns of W_O) and the pruned FFNs out of the weights.

    Returns a genuinely smaller GPT computing the same function as `model` with these gates (the
    pruned heads of a layer with no heads left drop the whole attention sublayer; pruned FFNs drop
    LN_2, W1 and W2). head_mask: (L, H) of 0/1, ffn_mask: (L,) of 0/1."""
    hm = torch.as_tensor(head_mask).bool().cpu()
    fm = torch.as_tensor(ffn_mask).bool().cpu()
    heads = [int(hm[l].sum()) for l in range(cfg.n_layer)]
    small = GPT(cfg, model.wte.num_embeddings, heads=heads, ffns=[bool(f) for f in fm])
    small.to(next(model.parameters()).device, next(model.parameters()).dtype)
    sd = model.state_dict()
    with torch.no_grad():
        small.wte.weight.copy_(sd["wte.weight"])
        small.wpe.weight.copy_(sd["wpe.weight"])
        small.ln_f.load_state_dict(model.ln_f.state_dict())
        H, hs, C = cfg.n_head, model.head_size, cfg.n_embd
        for l, (big, sb) in enumerate(zip(model.blocks, small.blocks)):
            keep = hm[l].nonzero().flatten()
            if sb.attn is not None:
                sb.ln_1.load_state_dict(big.ln_1.state_dict())
                rows = torch.cat([(keep * hs)[:, None] + torch.arange(hs)[None, :]]).flatten()  # one head's slice
                W = big.attn.c_attn.weight  # (3*H*hs, C) = [W_Q; W_K; W_V]
                sb.attn.c_attn.weight.copy_(torch.cat([W[i * H * hs:(i + 1) * H * hs][rows] for i in range(3)]))
                sb.attn.c_proj.weight.copy_(big.attn.c_proj.weight[:, rows])  # (C, H*hs) -> (C, h*hs)
                sb.attn.head_mask.copy_(big.attn.head_mask[keep])
            if sb.mlp is not None:
                sb.ln_2.load_state_dict(big.ln_2.state_dict())
                sb.mlp.load_state_dict(big.mlp.state_dict())
                sb.ffn_mask.copy_(big.ffn_mask)
    return small


def forward_flops_per_token(heads: list[int], ffns: list[bool], C: int, hs: int, T: int, V: int) -> float:
    """Matmul FLOPs per token of a forward pass (2 per multiply-add), for the ideal speed-up."""
    f = 2 * C * V  # lm_head
    for h, keep in zip(heads, ffns):
        f += 2 * C * 3 * h * hs + 2 * h * hs * C + 2 * 2 * h * hs * T  # qkv, W_O, QK^T and AV
        f += 2 * 2 * C * 4 * C if keep else 0
    return float(f)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
PEAK_FLOPS = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("A10", 125e12),
              ("L4", 121e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]


def peak_flops(device_type: str) -> float | None:
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, val in PEAK_FLOPS:
        if key in name:
            return val
    return None


def get_lr(it: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to min_lr."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.max_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


class Batcher:
    """Training mixture: equal shares of the four tasks, rep_frac repeated sequences, text_frac text."""

    def __init__(self, tasks: ICLTasks, cfg: Config, text_ds=None):
        self.tasks, self.cfg, self.text_ds = tasks, cfg, text_ds

    def get(self, B: int, g: torch.Generator, split: str = "train", it: int | None = None):
        cfg, T = self.cfg, self.cfg.block_size
        early = it is not None and it < cfg.rep_early * cfg.max_iters
        n_rep = int(round(B * (cfg.rep_frac_early if early else cfg.rep_frac)))
        n_text = int(round(B * cfg.text_frac)) if self.text_ds is not None else 0
        n_task = B - n_rep - n_text
        xs, ys = [], []
        for i, t in enumerate(TASKS):
            n = n_task // len(TASKS) + (1 if i < n_task % len(TASKS) else 0)
            if n:
                x, y = self.tasks.train_rows(t, n, T, g)
                xs.append(x), ys.append(y)
        if n_rep:
            x, y = self.tasks.repeat_rows(n_rep, T, g)
            xs.append(x), ys.append(y)
        if n_text:
            x, y = self.text_ds.get_batch(split, n_text, T, generator=g)
            xs.append(x.cpu() + self.tasks.T0), ys.append(y.cpu() + self.tasks.T0)
        return torch.cat(xs), torch.cat(ys)


def configure_optimizer(model: nn.Module, cfg: Config, device_type: str):
    """AdamW; weight decay only on matrices and embeddings (>= 2-D), not on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


@torch.no_grad()
def accuracy(model: GPT, X: torch.Tensor, Y: torch.Tensor, cand: torch.Tensor, device, batch: int,
             ctx=contextlib.nullcontext()) -> float:
    """Fraction of prompts whose answer is the argmax of the next-token logits over the candidates."""
    was = model.training
    model.eval()
    correct = 0
    cand_d = cand.to(device)
    for i in range(0, len(X), batch):
        xb, yb = X[i:i + batch].to(device), Y[i:i + batch].to(device)
        with ctx:
            logits, _ = model(xb)
        pred = cand_d[logits[:, -1, :].float()[:, cand_d].argmax(-1)]
        correct += int((pred == yb).sum())
    model.train(was)
    return correct / len(X)


def save_checkpoint(path: str, raw_model: GPT, optimizer, cfg: Config, step: int, gen: torch.Generator,
                    extra: dict | None = None):
    obj = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
           "config": dataclasses.asdict(cfg), "step": step, "gen_state": gen.get_state(),
           "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
           "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    obj.update(extra or {})
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a broken checkpoint


def train(cfg: Config, model: GPT, tasks: ICLTasks, batcher: Batcher, device: str, ptdtype, out_dir: str,
          ddp: dict, text_ds=None) -> dict:
    """nanoGPT-style loop: AdamW, warmup + cosine, clipping, accumulation, autocast, compile, DDP."""
    master = ddp["rank"] == 0
    device_type = "cuda" if "cuda" in device else ("mps" if "mps" in device else "cpu")
    ctx = (torch.autocast(device_type=device_type, dtype=ptdtype)
           if ptdtype != torch.float32 else contextlib.nullcontext())
    scaler = torch.amp.GradScaler("cuda", enabled=(ptdtype == torch.float16))
    optimizer = configure_optimizer(model, cfg, device_type)
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * ddp["rank"])  # batch generator (its state is checkpointed)
    step, t_elapsed0 = 0, 0.0
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    log_path = os.path.join(out_dir, "log.csv")
    if cfg.resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        step = ck["step"]
        gen.set_state(ck["gen_state"])
        torch.set_rng_state(ck["torch_rng"])
        np.random.set_state(ck["numpy_rng"])
        if ck.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        t_elapsed0 = ck.get("elapsed_s", 0.0)
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp["world"] > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[ddp["local_rank"]] if device_type == "cuda" else None)

    # small fixed evaluation sets for the periodic accuracy columns of log.csv
    shots = parse_ints(cfg.shots, "shots")
    geval = torch.Generator().manual_seed(cfg.seed + 7)
    quick = {(t, k): tasks.prompts(t, k, 128, geval) for t in TASKS for k in shots}
    cols = ["step", "tokens", "elapsed_s", "lr", "train_loss", "val_loss", "tokens_per_s", "mfu"] + \
           [f"acc_{t}_{k}" for t in TASKS for k in shots]
    if master and not (cfg.resume and os.path.exists(log_path)):
        with open(log_path, "w") as f:
            f.write(",".join(cols) + "\n")

    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum * ddp["world"]
    fpt = 6 * raw_model.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size  # PaLM/nanoGPT estimate
    peak = peak_flops(device_type)

    @torch.no_grad()
    def evaluate():
        model.eval()
        gv = torch.Generator().manual_seed(cfg.seed + 99)  # same validation batches every time
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = batcher.get(cfg.batch_size, gv, split="val")
            with ctx:
                _, loss = raw_model(x.to(device), y.to(device))
            losses.append(loss.item())
        accs = {f"acc_{t}_{k}": accuracy(raw_model, X, Y, tasks.candidates(t), device, 256, ctx)
                for (t, k), (X, Y) in quick.items()}
        model.train()
        return float(np.mean(losses)), accs

    end = cfg.max_iters if cfg.stop_iter <= 0 else min(cfg.max_iters, cfg.stop_iter)
    model.train()
    t0 = time.time()
    last_loss, tok_s, mfu = float("nan"), 0.0, None
    val_loss, accs = float("nan"), {}
    bar = _progress(range(step, end), initial=step, total=end, disable=not (master and cfg.progress), dynamic_ncols=True,
                    desc="train")
    t_last, step_last = time.time(), step
    for it in bar:
        lr = get_lr(it, cfg)
        for grp in optimizer.param_groups:
            grp["lr"] = lr
        loss_acc = 0.0
        for micro in range(cfg.grad_accum):
            x, y = batcher.get(cfg.batch_size, gen, it=it)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = (ddp["world"] == 1 or micro == cfg.grad_accum - 1)
            with (contextlib.nullcontext() if sync else model.no_sync()):
                with ctx:
                    _, loss = model(x, y)
                    loss = loss / cfg.grad_accum
                scaler.scale(loss).backward()
            loss_acc += loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step = it + 1
        if step % 10 == 0 or step == end or step % cfg.eval_interval == 0:
            last_loss = float(loss_acc)  # a host sync, so only every 10 steps
            now = time.time()
            tok_s = tokens_per_iter * (step - step_last) / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            mfu = fpt * tok_s / peak if peak else None
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}",
                            mfu=f"{100 * mfu:.1f}%" if mfu is not None else "n/a")
        if master and (step % cfg.eval_interval == 0 or step == end):
            val_loss, accs = evaluate()
            row = dict(step=step, tokens=step * tokens_per_iter, elapsed_s=t_elapsed0 + time.time() - t0, lr=lr,
                       train_loss=last_loss, val_loss=val_loss, tokens_per_s=tok_s,
                       mfu=mfu if mfu is not None else "n/a", **accs)
            with open(log_path, "a") as f:
                f.write(",".join(_fmt(row[c]) for c in cols) + "\n")
            _write(f"step {step}: train {last_loss:.4f} val {val_loss:.4f} | " +
                   " ".join(f"{t[:4]}{k}={accs[f'acc_{t}_{k}']:.2f}" for t in TASKS for k in shots))
            save_checkpoint(ckpt_path, raw_model, optimizer, cfg, step, gen,
                            {"elapsed_s": t_elapsed0 + time.time() - t0})
            t_last = time.time()  # tokens/s counts training time only
    bar.close()
    elapsed = t_elapsed0 + time.time() - t0
    if master and not math.isfinite(val_loss):
        val_loss, accs = evaluate()
    return {"train_loss": last_loss, "val_loss": val_loss,
            "val_ppl": math.exp(val_loss) if math.isfinite(val_loss) else float("nan"),
            "tokens_per_s": tok_s, "params": raw_model.num_params(), "elapsed_s": elapsed,
            "mfu": mfu, "steps": step}


def _progress(iterable, **kw):
    """tqdm if installed, else a silent stand-in (the loop still prints its evaluations)."""
    try:
        from tqdm import tqdm
        return tqdm(iterable, **kw)
    except ImportError:
        class _Bar(list):
            def set_postfix(self, **_):
                pass

            def close(self):
                pass
        return _Bar(iterable)


def _write(msg: str):
    try:
        from tqdm import tqdm
        tqdm.write(msg)
    except ImportError:
        print(msg, flush=True)


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------
# Head importance (paper Sec. 2.3.2, Eq. 8-10; official lm_eval/base.py::calculate_importance)
# ----------------------------------------------------------------------------------------------
def head_importance(model: GPT, X: torch.Tensor, Y: torch.Tensor, device, batch: int,
                    abs_per: str = "token", imp_norm: str = "example") -> np.ndarray:
    """IS_h for every head, (L, H). X: (n, T) prompts ending at the query, Y: (n,) gold answers.

    Loss on the answer token only, summed over the batch so each prompt keeps its own gradient.
    Per token t, <A_h[t], dL/dA_h[t]> is token t's share of dL/dxi_h; |.| is taken per token
    (official code) or after summing over tokens (paper Eq. 8)."""
    was = model.training
    model.eval()
    model.set_analysis(explicit=True, keep=True)
    L, H = len(model.blocks), model.n_head
    imp = torch.zeros(L, H, dtype=torch.float64)
    n = len(X)
    for i in range(0, n, batch):
        xb, yb = X[i:i + batch].to(device), Y[i:i + batch].to(device)
        logits, _ = model(xb)  # (b, 1, V) at the query position
        # L(y|x) = -log p(y_q | x), one answer token per prompt (Eq. 9), summed over prompts
        loss = F.cross_entropy(logits[:, -1, :].float(), yb, reduction="sum")
        model.zero_grad(set_to_none=True)
        loss.backward()
        for l, blk in enumerate(model.blocks):
            y = blk.attn.y
            # per-token contribution to dL/dxi_h: <A_h[t], dL/dA_h[t]>   (b, H, T)
            dot = (y.detach().double() * y.grad.double()).sum(-1)
            if abs_per == "token":  # official: sum_t |<A_t, g_t>|
                s = dot.abs().sum((0, 2))
            else:  # paper Eq. 8: |sum_t <A_t, g_t>| = |dL/dxi_h| per example
                s = dot.sum(2).abs().sum(0)
            imp[l] += s.double().cpu()
    model.zero_grad(set_to_none=True)
    model.set_analysis(explicit=False, keep=False)
    model.train(was)
    if imp_norm == "official":  # all but the last layer: / non-pad tokens minus 1 per prompt; last: / answer tokens
        imp[:-1] /= n * (X.shape[1] - 1)
        imp[-1] /= n
    else:  # one normaliser for all layers: the mean over prompts
        imp /= n
    return imp.numpy()


def layer_l2_normalise(imp: np.ndarray) -> np.ndarray:
    """Michel et al.'s optional per-layer normalisation: each layer's row divided by its L2 norm."""
    return imp / (np.linalg.norm(imp, axis=1, keepdims=True) + 1e-20)


def aggregate(imps: list[np.ndarray], how: str) -> np.ndarray:
    """Task aggregate (paper Eq. 10): plain mean over tasks, or mean of sum-normalised matrices."""
    if how == "sum1":
        imps = [m / max(m.sum(), 1e-30) for m in imps]
    return np.mean(imps, 0)


def order_heads(imp: np.ndarray) -> np.ndarray:
    """Global ranking over all L*H heads, least important first (official: argsort ascending)."""
    return np.argsort(imp.ravel(), kind="stable")


def mask_from_order(order: np.ndarray, n_prune: int, L: int, H: int) -> np.ndarray:
    m = np.ones(L * H)
    m[order[:n_prune]] = 0.0
    return m.reshape(L, H)


def rankdata(a) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank."""
    a = np.asarray(a, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    sa = a[order]
    ranks = np.empty(len(a))
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sa[j + 1] == sa[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j)
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation = Pearson correlation of the (average-tied) ranks."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def topk_overlap(a, b, frac: float) -> float:
    """|top-frac(a) and top-frac(b)| / |top-frac|, the paper's 'top-30% heads overlap'."""
    k = max(1, int(round(frac * np.size(a))))
    ta = set(np.argsort(-np.asarray(a).ravel(), kind="stable")[:k])
    tb = set(np.argsort(-np.asarray(b).ravel(), kind="stable")[:k])
    return len(ta & tb) / k


# ----------------------------------------------------------------------------------------------
# Induction heads (paper Sec. 6.3 and App. A.4, Alg. 1-2; Olsson et al. 2022)
# ----------------------------------------------------------------------------------------------
def induction_targets(ids: torch.Tensor) -> torch.Tensor:
    """(n, T) -> (n, T, T) bool P[j, i]: key i follows an earlier occurrence (i-1 < j) of token ids[j]."""
    n, T = ids.shape
    same = ids[:, :, None] == ids[:, None, :]  # (n, T_query, T_key-1): ids[j] == ids[m]
    P = torch.zeros(n, T, T, dtype=torch.bool)
    P[:, :, 1:] = same[:, :, :-1]  # key i = m + 1
    j = torch.arange(T)
    P &= (j[None, :] - 1 < j[:, None])[None]  # the earlier occurrence m = i-1 must be before the query j
    return P


def prefix_matching_score(att: torch.Tensor, ids: torch.Tensor, first_query: int) -> torch.Tensor:
    """Paper Alg. 1: att (n, H, T, T), ids (n, T). For every query j >= first_query (repeats 2..4),
    sum the attention to the tokens right AFTER earlier occurrences of ids[j]; mean over j and n -> (H,)."""
    P = induction_targets(ids.cpu()).to(att.dtype)  # (n, T, T)
    s = (att.cpu() * P[:, None]).sum(-1)  # (n, H, T)
    return s[:, :, first_query:].mean((0, 2))


def copy_ratio(logits_s: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Olsson-style copying ratio. logits_s: (..., S) logit effects on the sample's S tokens, target:
    (...) index in 0..S-1 of the attended token, or -1. r = ReLU(l - mean l); ratio = r[target] / sum r
    (0 where the target is -1 or nothing is raised)."""
    r = F.relu(logits_s - logits_s.mean(-1, keepdim=True))
    tot = r.sum(-1)
    hit = r.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ok = (target >= 0) & (tot > 0)
    return torch.where(ok, hit / tot.clamp(min=1e-30), torch.zeros_like(tot))


@torch.no_grad()
def copying_score_olsson(model: GPT, ids: torch.Tensor, start: int, device) -> np.ndarray:
    """Olsson et al.: run the real model on non-repeated random tokens; take each head's
    attention-weighted output, push it along the direct path through W_O^h and the unembedding,
    and ask how much it raises the token it attends to most, among the sample's tokens. -> (L, H)."""
    model.eval()
    model.set_analysis(explicit=True, keep=True)
    model(ids.to(device))
    W_U = model.lm_head.weight.float()  # (V, C)
    sample = ids[:, start:].to(device)  # (n, S) the sample's unique content tokens
    E_s = W_U[sample]  # (n, S, C)
    out = []
    for blk in model.blocks:
        a = blk.attn
        H, hs = a.n_head, a.head_size
        Wo = a.c_proj.weight.float().view(-1, H, hs).transpose(0, 1)  # (H, C, hs)
        contrib = torch.einsum("nhtd,hcd->nhtc", a.y.float(), Wo)  # (n, H, T, C) head output in the residual
        logits_s = torch.einsum("nhtc,nsc->nhts", contrib, E_s)  # (n, H, T, S) direct-path logit effects
        tgt = a.att.argmax(-1) - start  # (n, H, T) attended position -> index in the sample (or < 0)
        tgt = torch.where(tgt >= 0, tgt, torch.full_like(tgt, -1))
        out.append(copy_ratio(logits_s[:, :, start:], tgt[:, :, start:]).mean((0, 2)).cpu())
    model.set_analysis(explicit=False, keep=False)
    return torch.stack(out).numpy()


@torch.no_grad()
def copying_score_official(model: GPT, ids: torch.Tensor, device) -> np.ndarray:
    """The official prefix_matching_copying.py --copying_score, re-created: every layer sees the
    embedding-level input LN_1(tok_emb + pos_emb) (never updated across layers); head output at j is
    W_O^h v_j (not attention-weighted), then lm_head (no final LN) and a softmax over the vocabulary;
    r = ReLU(p - mean p) over the visible tokens ids[0..j]; score_j = r[argmax_i A[j, i]] / sum r."""
    model.eval()
    ids = ids.to(device)
    n, T = ids.shape
    h0 = model.wte(ids) + model.wpe(torch.arange(T, device=device))  # (n, T, C)
    W_U = model.lm_head.weight.float()
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    out = []
    for blk in model.blocks:
        a = blk.attn
        H, hs = a.n_head, a.head_size
        x = blk.ln_1(h0)
        q, k, v = a.c_attn(x).split(H * hs, dim=2)
        q, k, v = (t.view(n, T, H, hs).transpose(1, 2).float() for t in (q, k, v))
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(hs)).masked_fill(~causal, float("-inf")).softmax(-1)
        Wo = a.c_proj.weight.float().view(-1, H, hs).transpose(0, 1)  # (H, C, hs)
        o = torch.einsum("nhtd,hcd->nhtc", v, Wo)  # (n, H, T, C): W_O^h v_j
        probs = (o @ W_U.T).softmax(-1)  # (n, H, T, V)
        p_vis = probs.gather(-1, ids[:, None, None, :].expand(n, H, T, T))  # (n, H, T_j, T_i): p_j(ids[i])
        p_vis = p_vis.masked_fill(~causal, float("nan"))
        mean = torch.nanmean(p_vis, -1, keepdim=True)
        r = F.relu(torch.nan_to_num(p_vis - mean, nan=0.0))
        tot = r.sum(-1)
        hit = r.gather(-1, att.argmax(-1, keepdim=True)).squeeze(-1)
        score = torch.where(tot > 0, hit / tot.clamp(min=1e-30), torch.zeros_like(tot))
        out.append(score[:, :, 1:].mean((0, 2)).cpu())  # query positions 1..T-1 (after BOS)
    return torch.stack(out).numpy()


@torch.no_grad()
def copying_score_eigen(model: GPT, tasks: ICLTasks) -> np.ndarray:
    """Elhage et al. 2021 style: eigenvalues lambda of the OV circuit W_U W_O^h W_V^h W_E over content
    tokens; score = sum(lambda) / sum(|lambda|) (1 = pure copying, -1 = anti-copying). -> (L, H)."""
    E = model.wte.weight.float()[tasks.C0:tasks.C0 + tasks.N]  # (N, C)
    out = []
    for blk in model.blocks:
        a = blk.attn
        H, hs = a.n_head, a.head_size
        Wv = a.c_attn.weight.float()[2 * H * hs:].view(H, hs, -1)  # (H, hs, C)
        Wo = a.c_proj.weight.float().view(-1, H, hs).transpose(0, 1)  # (H, C, hs)
        row = []
        for h in range(H):
            M = E @ Wv[h].T @ Wo[h].T @ E.T  # (N, N): token -> its direct-path logit effects (tied W_U = W_E)
            ev = torch.linalg.eigvals(M.double().cpu())
            row.append(float(ev.real.sum() / ev.abs().sum().clamp(min=1e-30)))
        out.append(row)
    return np.array(out)


@torch.no_grad()
def attention_maps(model: GPT, ids: torch.Tensor, device) -> torch.Tensor:
    """Attention probabilities of every head: (n, L, H, T, T)."""
    model.eval()
    model.set_analysis(explicit=True, keep=True)
    model(ids.to(device))
    att = torch.stack([blk.attn.att.float().cpu() for blk in model.blocks], 1)
    model.set_analysis(explicit=False, keep=False)
    return att


def retained_capacity(score: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Paper Fig. 11: after pruning the first i heads of `order`, sum(score[rest]) / sum(score), i = 0..LH."""
    s = np.clip(score.ravel()[order], 0, None)
    tot = s.sum()
    tail = np.concatenate([np.cumsum(s[::-1])[::-1], [0.0]])
    return tail / tot if tot > 0 else tail


# ----------------------------------------------------------------------------------------------
# The analysis: importance, pruning curves, agreement, induction heads, physical pruning
# ----------------------------------------------------------------------------------------------
def analyse(model: GPT, tasks: ICLTasks, cfg: Config, device: str, ctx, out_dir: str) -> dict:
    t_start = time.time()
    model.eval()
    L, H = cfg.n_layer, cfg.n_head
    LH = L * H
    shots = parse_ints(cfg.shots, "shots")
    B = cfg.analysis_batch
    res: dict = {"tasks": list(TASKS), "shots": shots, "layers": L, "heads": H}

    # --- prompt sets: evaluation, importance (separate draws, exact duplicates of eval prompts removed), dev
    sets = {}
    overlap_removed = {}
    for ti, t in enumerate(TASKS):
        for k in shots:
            g = lambda s: torch.Generator().manual_seed(cfg.seed * 7919 + 1000 * ti + 10 * k + s)
            Xe, Ye = tasks.prompts(t, k, cfg.n_eval, g(1))
            Xi, Yi = tasks.prompts(t, k, cfg.n_imp, g(2))
            Xd, Yd = tasks.prompts(t, k, cfg.n_dev, g(3))
            seen = {r.tobytes() for r in Xe.numpy()}
            keep = torch.tensor([r.tobytes() not in seen for r in Xi.numpy()])
            if keep.sum() >= len(Xi) // 4:  # disjoint when the prompt space allows it (not e.g. 0-shot copy)
                overlap_removed[f"{t}/{k}"] = int((~keep).sum())
                Xi, Yi = Xi[keep], Yi[keep]
            else:
                overlap_removed[f"{t}/{k}"] = f"not removed: only {int(keep.sum())} of {len(Xi)} unseen"
            sets[t, k] = dict(eval=(Xe, Ye), imp=(Xi, Yi), dev=(Xd, Yd))
    res["imp_prompts_duplicates_removed"] = overlap_removed

    def acc(t, k, hm=None, fm=None, split="eval", m=model):
        m.set_masks(hm, fm)
        X, Y = sets[t, k][split]
        a = accuracy(m, X, Y, tasks.candidates(t), device, B, ctx)
        m.set_masks(None, None)
        return a

    # --- 1. full-model accuracy, warn near chance
    full = {t: {k: acc(t, k) for k in shots} for t in TASKS}
    res["accuracy_full"] = full
    res["chance"] = {t: tasks.chance(t) for t in TASKS}
    near = []
    print("\nfull-model accuracy (n=%d per cell, +- binomial s.e.)" % cfg.n_eval)
    print("  task     " + "".join(f"{k:>4d}-shot     " for k in shots) + "chance")
    for t in TASKS:
        cells = []
        for k in shots:
            a = full[t][k]
            se = math.sqrt(max(a * (1 - a), 1e-12) / cfg.n_eval)
            cells.append(f"{a:6.3f}+-{se:.3f}  ")
            c = tasks.chance(t)
            if a <= c + max(0.05, 3 * math.sqrt(c * (1 - c) / cfg.n_eval)):
                near.append(f"{t}/{k}")
        print(f"  {t:8s} " + "".join(cells) + f"{tasks.chance(t):.3f}")
    res["near_chance"] = near
    if near:
        print("WARNING: near chance (their importance maps and correlations are noise; "
              "0-shot recall/cluster are at chance by design): " + ", ".join(near))
    low = [f"{t}/{k}" for t in TASKS for k in shots if k > 0 and full[t][k] < 0.9]
    if low:
        print("WARNING: few-shot accuracy below 0.9 for " + ", ".join(low) +
              " -- train longer (--max_iters) before trusting the pruning curves")
    res["few_shot_below_0.9"] = low

    # --- 2. head importance per (task, shot) and the aggregate per shot
    def score(t, k, hm=None):
        model.set_masks(hm, None)
        X, Y = sets[t, k]["imp"]
        s = head_importance(model, X, Y, device, B, cfg.abs_per, cfg.imp_norm)
        model.set_masks(None, None)
        return layer_l2_normalise(s) if cfg.layer_norm_imp else s

    imp = {k: {t: score(t, k) for t in TASKS} for k in shots}
    agg = {k: aggregate([imp[k][t] for t in TASKS], cfg.agg_norm) for k in shots}
    # the other |.| placement, to report how much the choice matters (paper Eq. 8 vs official code)
    other = "example" if cfg.abs_per == "token" else "token"
    abs_agree = {f"{t}/{k}": spearman(imp[k][t], head_importance(model, *sets[t, k]["imp"], device, B, other,
                                                                   cfg.imp_norm)) for t in TASKS for k in shots}
    res["head_importance"] = {str(k): {t: imp[k][t].tolist() for t in TASKS} for k in shots}
    res["head_importance_aggregate"] = {str(k): agg[k].tolist() for k in shots}
    res["spearman_token_vs_example_abs"] = abs_agree
    res["importance_mass_per_layer"] = {str(k): (agg[k].sum(1) / max(agg[k].sum(), 1e-30)).tolist() for k in shots}
    print(f"head importance done ({time.time() - t_start:.0f}s); Spearman of per-token vs per-example |.|: "
          f"median {np.nanmedian(list(abs_agree.values())):.2f}")

    # --- 3. FFN oracle importance on the dev split (paper Eq. 7)
    ffn = {k: {} for k in shots}
    for t in TASKS:
        for k in shots:
            base = acc(t, k, split="dev")
            ffn[k][t] = np.array([base - acc(t, k, fm=np.eye(L)[l] * -1 + 1, split="dev") for l in range(L)])
    ffn_agg = {k: np.mean([ffn[k][t] for t in TASKS], 0) for k in shots}
    res["ffn_oracle"] = {str(k): {t: ffn[k][t].tolist() for t in TASKS} for k in shots}

    # --- 4. head pruning curves: one global ranking from the unpruned model
    pcts = list(range(0, 100, 10))
    n_of = lambda p: int(p * LH // 100)  # official: p * n_heads // 100
    rng = np.random.default_rng(cfg.seed)
    rand_orders = [rng.permutation(LH) for _ in range(cfg.n_random)]
    curves = {}
    work = [(t, k) for t in TASKS for k in shots]
    for t, k in _progress(work, desc="pruning curves", dynamic_ncols=True, disable=not cfg.progress):
        o_task, o_agg = order_heads(imp[k][t]), order_heads(agg[k])
        c = {"task": [], "aggregate": [], "reverse": [], "random": [[] for _ in rand_orders]}
        for p in pcts:
            c["task"].append(acc(t, k, mask_from_order(o_task, n_of(p), L, H)))
            c["aggregate"].append(acc(t, k, mask_from_order(o_agg, n_of(p), L, H)))
            c["reverse"].append(acc(t, k, mask_from_order(o_task[::-1], n_of(p), L, H)))
            for r, o in enumerate(rand_orders):
                c["random"][r].append(acc(t, k, mask_from_order(o, n_of(p), L, H)))
        if cfg.rescore:  # recompute the task's importance on the pruned model before each step
            pruned, c["task_rescored"] = [], []
            for p in pcts:
                need = n_of(p) - len(pruned)
                if need > 0:
                    hm = mask_from_order(np.array(pruned, dtype=int), len(pruned), L, H)
                    s = score(t, k, hm).ravel()
                    s[pruned] = np.inf
                    pruned += list(np.argsort(s, kind="stable")[:need])
                hm = mask_from_order(np.array(pruned, dtype=int), len(pruned), L, H)
                c["task_rescored"].append(acc(t, k, hm))
        c["random_mean"] = np.mean(c["random"], 0).tolist()
        c["random_std"] = np.std(c["random"], 0).tolist()
        curves[f"{t}/{k}"] = c
    res["head_pruning"] = {"percent": pcts, "curves": curves}

    # --- 4b. cross-task transfer (paper Sec. 6.1.2): prune task A with task B's ranking, or the aggregate's
    tp = [10, 30, 50, 70, 90]
    transfer = {}
    for k in shots:
        for t in TASKS:
            transfer[f"{t}/{k}"] = {src: [acc(t, k, mask_from_order(order_heads(agg[k] if src == "aggregate"
                                                                              else imp[k][src]), n_of(p), L, H))
                                          for p in tp] for src in TASKS + ("aggregate",)}
    res["transfer_pruning"] = {"percent": tp, "acc": transfer}

    # --- 5. FFN pruning, cumulative in oracle order (most negative score first), and a random control
    ffn_curves = {}
    for t in TASKS:
        for k in shots:
            o = np.argsort(ffn[k][t], kind="stable")
            oracle = [acc(t, k, fm=_ffn_mask(o, n, L)) for n in range(L + 1)]
            rnd = [[acc(t, k, fm=_ffn_mask(rng.permutation(L), n, L)) for n in range(L + 1)]
                   for _ in range(cfg.n_random)]
            ffn_curves[f"{t}/{k}"] = {"oracle": oracle, "random_mean": np.mean(rnd, 0).tolist(),
                                      "random_std": np.std(rnd, 0).tolist()}
    res["ffn_pruning"] = {"n_pruned": list(range(L + 1)), "curves": ffn_curves,
                          "note": f"{L} FFNs: one step = {100 / L:.0f}% of the FFNs"}

    # --- 6. combined heads x FFNs grid, shot-specific task-aggregate orders (paper Fig. 7 caption)
    gp = list(range(0, cfg.grid_max_heads + 1, 10))
    grid = {}
    for k in shots:
        oh, of = order_heads(agg[k]), np.argsort(ffn_agg[k], kind="stable")
        g = np.zeros((len(TASKS), len(gp), L + 1))
        for a_, p in enumerate(gp):
            for nf in range(L + 1):
                hm, fm = mask_from_order(oh, n_of(p), L, H), _ffn_mask(of, nf, L)
                for ti, t in enumerate(TASKS):
                    g[ti, a_, nf] = acc(t, k, hm, fm)
        grid[str(k)] = {"per_task": g.tolist(), "mean": g.mean(0).tolist()}
    res["combined_grid"] = {"head_percent": gp, "ffn_pruned": list(range(L + 1)), "grids": grid}
    print(f"pruning curves and grid done ({time.time() - t_start:.0f}s)")

    # --- 7. agreement: cross-task and cross-shot Spearman, top-30% overlap
    names = list(TASKS) + ["aggregate"]
    mats = {}
    for k in shots:
        vecs = [imp[k][t] for t in TASKS] + [agg[k]]
        mats[str(k)] = {"spearman": [[spearman(a, b) for b in vecs] for a in vecs],
                        "top_overlap": [[topk_overlap(a, b, cfg.topk_frac) for b in vecs] for a in vecs]}
    cross_shot = {}
    for t in TASKS + ("aggregate",):
        get = (lambda k: agg[k]) if t == "aggregate" else (lambda k, t=t: imp[k][t])
        cross_shot[t] = {f"{a}-{b}": spearman(get(a), get(b)) for i, a in enumerate(shots) for b in shots[i + 1:]}
    res["agreement"] = {"names": names, "per_shot": mats, "cross_shot_spearman": cross_shot,
                        "topk_frac": cfg.topk_frac}

    # --- 8. induction heads: prefix matching (Alg. 1) and copying (Alg. 2 / Olsson / OV eigenvalues)
    T = cfg.block_size
    Lp = min(cfg.prefix_len, (T - 2) // 4, tasks.N)
    gi = torch.Generator().manual_seed(cfg.seed + 4242)
    rep = tasks.repeated_sequences(cfg.n_prefix_seq, Lp, gi)  # (n, 2 + 4Lp)
    att = attention_maps(model, rep, device)  # (n, L, H, T, T)
    prefix = torch.stack([prefix_matching_score(att[:, l], rep, 2 + Lp) for l in range(L)]).numpy()
    T_rep = rep.shape[1]
    uniform = torch.ones(T_rep, T_rep).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None, None].expand(len(rep), 1, T_rep, T_rep)
    prefix_floor = float(prefix_matching_score(uniform, rep, 2 + Lp)[0])  # uniform attention's score
    # previous-token score: attention from j to j-1 (the other half of the induction circuit)
    prev_tok = att[:, :, :, torch.arange(2, T_rep), torch.arange(1, T_rep - 1)].mean((0, 3)).numpy()
    Lc = min(25, tasks.N, T - 2)
    uniq = torch.rand(cfg.n_prefix_seq, tasks.N, generator=gi).argsort(1)[:, :Lc] + tasks.C0
    uniq = torch.cat([torch.tensor([tasks.BOS, tasks.REP]).expand(len(uniq), 2), uniq], 1)
    copying = {"olsson": copying_score_olsson(model, uniq, 2, device),
               "official": copying_score_official(model, uniq, device),
               "eigen": copying_score_eigen(model, tasks)}
    cp = copying[cfg.copy_impl]
    thr_p, thr_c = np.quantile(prefix, 0.9), np.quantile(cp, 0.9)
    ind = [(int(l), int(h)) for l in range(L) for h in range(H) if prefix[l, h] >= thr_p and cp[l, h] >= thr_c]
    res["induction"] = {"prefix_matching": prefix.tolist(), "prefix_floor_uniform_attention": prefix_floor,
                        "previous_token": prev_tok.tolist(), "prefix_len": Lp,
                        "copying": {k_: v.tolist() for k_, v in copying.items()}, "copy_impl_shown": cfg.copy_impl,
                        "induction_heads_top10pct_both": ind,
                        "spearman_copying_variants": {f"{a}-{b}": spearman(copying[a], copying[b])
                                                      for i, a in enumerate(COPY_IMPLS) for b in COPY_IMPLS[i + 1:]}}
    top_prefix = np.argsort(-prefix.ravel(), kind="stable")
    print("top prefix-matching heads: " + ", ".join(f"L{i // H}H{i % H}={prefix.ravel()[i]:.2f}"
                                                    for i in top_prefix[:5]) + f" (uniform floor {prefix_floor:.3f})")

    # --- 9. retained induction capacity under importance-ordered pruning (paper Fig. 11)
    cap = {}
    for k in shots:
        o = order_heads(agg[k])
        cap[str(k)] = {"prefix": retained_capacity(prefix, o).tolist(),
                       "prefix_minus_floor": retained_capacity(prefix - prefix_floor, o).tolist(),
                       "copying": retained_capacity(cp, o).tolist()}
    res["capacity"] = {"n_pruned": list(range(LH + 1)), "curves": cap}

    # --- 10. extension (not in the paper): remove the top-n prefix-matching heads vs n random heads
    abl = {}
    n_rand = max(cfg.n_random, 5)
    n_ind = int((prefix >= 0.5).sum())  # every head with prefix-matching score >= 0.5
    for n in sorted({v for v in parse_ints(cfg.ablate_n, "ablate_n") + [n_ind] if 0 < v < LH}):
        hm_top = mask_from_order(top_prefix, n, L, H)
        row = {}
        for t in TASKS:
            for k in shots:
                rs = [acc(t, k, mask_from_order(rng.permutation(LH), n, L, H)) for _ in range(n_rand)]
                row[f"{t}/{k}"] = {"full": full[t][k], "top_induction": acc(t, k, hm_top),
                                   "random_mean": float(np.mean(rs)), "random_std": float(np.std(rs))}
        abl[str(n)] = {"heads": [f"L{i // H}H{i % H}" for i in top_prefix[:n]], "acc": row,
                       "all_prefix_ge_0.5": n == n_ind}
    res["induction_ablation"] = abl

    # --- 11. physical pruning: the sliced model equals the masked one; measured vs ideal speed-up
    res["physical_pruning"] = physical_pruning_benchmark(model, cfg, agg[shots[-1]],
                                                         np.argsort(ffn_agg[shots[-1]], kind="stable"), device, ctx)
    res["analysis_elapsed_s"] = time.time() - t_start
    return res


def _ffn_mask(order, n: int, L: int) -> np.ndarray:
    m = np.ones(L)
    m[np.asarray(order)[:n]] = 0.0
    return m


def physical_pruning_benchmark(model: GPT, cfg: Config, head_imp: np.ndarray, ffn_order, device: str, ctx) -> list:
    """For a few (heads %, FFNs) settings: max |logit difference| between the masked and the physically
    pruned model, and the measured forward-pass speed-up next to the ideal FLOP ratio."""
    L, H = cfg.n_layer, cfg.n_head
    T = cfg.block_size
    g = torch.Generator().manual_seed(cfg.seed + 5)
    x = torch.randint(model.vocab_size, (cfg.speed_batch, T), generator=g).to(device)
    hs, C, V = model.head_size, cfg.n_embd, model.vocab_size
    full_flops = forward_flops_per_token([H] * L, [True] * L, C, hs, T, V)
    settings = [(50, 0), (70, 0), (70, max(1, L // 3)), (90, L // 2)]
    out = []
    model.eval()

    def timeit(m):
        with torch.no_grad(), ctx:
            for _ in range(3):
                m(x)
            if "cuda" in device:
                torch.cuda.synchronize()
            times = []
            for _ in range(10 if "cuda" in device else 3):
                t0 = time.perf_counter()
                m(x)
                if "cuda" in device:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return float(np.median(times))

    t_full = timeit(model)
    for p, nf in settings:
        hm = mask_from_order(order_heads(head_imp), int(p * L * H // 100), L, H)
        fm = _ffn_mask(ffn_order, nf, L)
        small = physically_prune(model, cfg, hm, fm)
        model.set_masks(hm, fm)
        with torch.no_grad():
            diff = float((model(x[:8])[0].float() - small(x[:8])[0].float()).abs().max())
        t_masked = timeit(model)
        model.set_masks(None, None)
        t_small = timeit(small)
        fl = forward_flops_per_token([int(v) for v in hm.sum(1)], [bool(v) for v in fm], C, hs, T, V)
        out.append({"heads_pruned_pct": p, "ffns_pruned": nf, "params_full": model.num_params(),
                    "params_pruned": small.num_params(), "max_abs_logit_diff": diff,
                    "time_full_s": t_full, "time_masked_s": t_masked, "time_pruned_s": t_small,
                    "speedup_measured": t_full / t_small, "speedup_ideal_flops": full_flops / fl})
        print(f"physical pruning {p}% heads + {nf} FFNs: params {model.num_params():,} -> {small.num_params():,}, "
              f"max|dlogit| {diff:.1e}, speed-up measured {t_full / t_small:.2f}x vs ideal {full_flops / fl:.2f}x")
    return out


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib imported lazily)
# ----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_all(res: dict, out_dir: str, log_path: str | None = None) -> list[str]:
    plt = _plt()
    shots, L, H = res["shots"], res["layers"], res["heads"]
    paths = []

    def save(fig, name):
        p = os.path.join(out_dir, name)
        fig.savefig(p, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)

    # 1. importance heat maps (log10) next to prefix matching and copying (paper Figs. 3, 10)
    ind = res["induction"]
    n = len(shots) + 2
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), constrained_layout=True)
    for ax, k in zip(axes, shots):
        m = np.array(res["head_importance_aggregate"][str(k)])
        im = ax.imshow(np.log10(m + 1e-12), aspect="auto", cmap="viridis")
        ax.set_title(f"log10 aggregate IS_h, {k}-shot", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax, (name, m) in zip(axes[len(shots):], [("prefix matching", ind["prefix_matching"]),
                                                  (f"copying ({ind['copy_impl_shown']})",
                                                   ind["copying"][ind["copy_impl_shown"]])]):
        im = ax.imshow(np.array(m), aspect="auto", cmap="magma")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes:
        ax.set_xlabel("head"), ax.set_ylabel("layer")
        ax.set_xticks(range(H)), ax.set_yticks(range(L))
    save(fig, "importance.png")

    # 2. accuracy vs % heads pruned per task and shot, with controls (paper Fig. 5 + controls)
    hp = res["head_pruning"]
    pc = hp["percent"]
    cols = list(TASKS) + ["mean"]
    fig, axes = plt.subplots(len(shots), len(cols), figsize=(3 * len(cols), 2.5 * len(shots)), squeeze=False,
                             constrained_layout=True)
    for i, k in enumerate(shots):
        for j, t in enumerate(cols):
            ax = axes[i, j]
            cs = [hp["curves"][f"{u}/{k}"] for u in TASKS] if t == "mean" else [hp["curves"][f"{t}/{k}"]]
            mean = lambda key: np.mean([c[key] for c in cs], 0)
            ax.plot(pc, mean("task"), "o-", label="task importance", ms=3)
            ax.plot(pc, mean("aggregate"), "s-", label="aggregate importance", ms=3)
            if "task_rescored" in cs[0]:
                ax.plot(pc, mean("task_rescored"), "^--", label="task, rescored", ms=3)
            rm, rs = mean("random_mean"), mean("random_std")
            ax.plot(pc, rm, "-", color="gray", label="random (mean +- sd)")
            ax.fill_between(pc, rm - rs, rm + rs, color="gray", alpha=0.25)
            ax.plot(pc, mean("reverse"), "x:", color="red", label="reverse", ms=3)
            if t != "mean":
                ax.axhline(res["chance"][t], color="k", lw=0.6, ls="--")
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"{t}, {k}-shot", fontsize=9)
            if i == len(shots) - 1:
                ax.set_xlabel("% heads pruned")
            if j == 0:
                ax.set_ylabel("accuracy")
    axes[0, 0].legend(fontsize=7)
    save(fig, "head_pruning.png")

    # 3. FFN oracle scores per layer (paper Fig. 4) and cumulative FFN pruning (paper Fig. 6)
    fig, axes = plt.subplots(2, len(shots), figsize=(4 * len(shots), 6), squeeze=False, constrained_layout=True)
    w = 0.8 / len(TASKS)
    for i, k in enumerate(shots):
        ax = axes[0, i]
        for j, t in enumerate(TASKS):
            ax.bar(np.arange(L) + j * w, res["ffn_oracle"][str(k)][t], w, label=t)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(f"FFN oracle score, {k}-shot (dev split)", fontsize=9)
        ax.set_xlabel("layer"), ax.set_ylabel("acc - acc without FFN")
        ax = axes[1, i]
        for j, t in enumerate(TASKS):
            c = res["ffn_pruning"]["curves"][f"{t}/{k}"]
            line, = ax.plot(range(L + 1), c["oracle"], "o-", ms=3, label=f"{t} oracle order")
            ax.plot(range(L + 1), c["random_mean"], ":", color=line.get_color())
        ax.set_title(f"cumulative FFN pruning, {k}-shot (dotted: random order)", fontsize=9)
        ax.set_xlabel(f"FFNs pruned (of {L}; 1 step = {100 / L:.0f}%)"), ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.03)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=6)
    save(fig, "ffn.png")

    # 4. combined pruning grid (paper Fig. 7)
    cg = res["combined_grid"]
    fig, axes = plt.subplots(1, len(shots), figsize=(3.6 * len(shots), 3.2), squeeze=False, constrained_layout=True)
    for ax, k in zip(axes[0], shots):
        m = np.array(cg["grids"][str(k)]["mean"])
        im = ax.imshow(m, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for a_ in range(m.shape[0]):
            for b_ in range(m.shape[1]):
                ax.text(b_, a_, f"{m[a_, b_]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_yticks(range(len(cg["head_percent"])), cg["head_percent"])
        ax.set_xticks(range(len(cg["ffn_pruned"])), cg["ffn_pruned"])
        ax.set_xlabel("FFNs pruned"), ax.set_ylabel("% heads pruned")
        ax.set_title(f"mean accuracy, {k}-shot", fontsize=9)
    fig.colorbar(im, ax=axes[0, -1], fraction=0.046)
    save(fig, "grid.png")

    # 4b. cross-task transfer at transfer_pct heads pruned: rows = evaluated task, columns = whose ranking
    tr = res["transfer_pruning"]
    srcs = list(TASKS) + ["aggregate"]
    fig, axes = plt.subplots(1, len(shots), figsize=(3.8 * len(shots), 3.2), squeeze=False, constrained_layout=True)
    for ax, k in zip(axes[0], shots):
        i70 = tr["percent"].index(70)
        m = np.array([[tr["acc"][f"{t}/{k}"][s_][i70] for s_ in srcs] for t in TASKS])
        im = ax.imshow(m, vmin=0, vmax=1, cmap="RdYlGn")
        for a_ in range(m.shape[0]):
            for b_ in range(m.shape[1]):
                ax.text(b_, a_, f"{m[a_, b_]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(srcs)), srcs, rotation=45, fontsize=7)
        ax.set_yticks(range(len(TASKS)), TASKS, fontsize=7)
        ax.set_xlabel("ranking taken from"), ax.set_ylabel("task evaluated")
        ax.set_title(f"accuracy at 70% heads pruned, {k}-shot", fontsize=9)
    fig.colorbar(im, ax=axes[0, -1], fraction=0.046)
    save(fig, "transfer.png")

    # 5. Spearman matrices (paper Fig. 8) and the cross-shot table (paper Table 1)
    ag = res["agreement"]
    names = ag["names"]
    fig, axes = plt.subplots(1, len(shots) + 1, figsize=(3.6 * (len(shots) + 1), 3.4), constrained_layout=True)
    for ax, k in zip(axes, shots):
        m = np.array(ag["per_shot"][str(k)]["spearman"])
        ax.imshow(m, vmin=-1, vmax=1, cmap="coolwarm")
        for a_ in range(len(names)):
            for b_ in range(len(names)):
                ax.text(b_, a_, f"{m[a_, b_]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"Spearman across tasks, {k}-shot", fontsize=9)
    ax = axes[-1]
    pairs = list(next(iter(ag["cross_shot_spearman"].values())).keys())
    m = np.array([[ag["cross_shot_spearman"][t][p] for p in pairs] for t in names])
    ax.imshow(m, vmin=-1, vmax=1, cmap="coolwarm", aspect="auto")
    for a_ in range(m.shape[0]):
        for b_ in range(m.shape[1]):
            ax.text(b_, a_, f"{m[a_, b_]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(pairs)), [p + " shot" for p in pairs], fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title("Spearman across shots", fontsize=9)
    save(fig, "spearman.png")

    # 6. prefix matching vs copying scatter + retained capacity (paper Figs. 10-11)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    ax = axes[0]
    pm = np.array(ind["prefix_matching"]).ravel()
    cpv = np.array(ind["copying"][ind["copy_impl_shown"]]).ravel()
    kk = shots[-1]
    col = np.log10(np.array(res["head_importance_aggregate"][str(kk)]).ravel() + 1e-12)
    sc = ax.scatter(pm, cpv, c=col, cmap="viridis", s=25)
    for i in range(len(pm)):
        if (i // H, i % H) in [tuple(v) for v in ind["induction_heads_top10pct_both"]] or pm[i] > 0.3:
            ax.annotate(f"L{i // H}H{i % H}", (pm[i], cpv[i]), fontsize=7)
    ax.axvline(np.quantile(pm, 0.9), color="gray", ls=":", lw=0.8)
    ax.axhline(np.quantile(cpv, 0.9), color="gray", ls=":", lw=0.8)
    fig.colorbar(sc, ax=ax, label=f"log10 aggregate IS_h ({kk}-shot)")
    ax.set_xlabel("prefix-matching score"), ax.set_ylabel(f"copying score ({ind['copy_impl_shown']})")
    ax.set_title("induction heads: top 10% on both (dotted lines)", fontsize=9)
    ax = axes[1]
    cap = res["capacity"]
    x = 100 * np.array(cap["n_pruned"]) / (L * H)
    for k in shots:
        c = cap["curves"][str(k)]
        line, = ax.plot(x, c["prefix"], label=f"prefix, {k}-shot order")
        ax.plot(x, c["prefix_minus_floor"], ":", color=line.get_color())
        ax.plot(x, c["copying"], "--", color=line.get_color(), alpha=0.7)
    ax.set_xlabel("% heads pruned (least aggregate-important first)"), ax.set_ylabel("retained capacity")
    ax.set_title("solid: prefix; dotted: prefix minus uniform floor; dashed: copying", fontsize=8)
    ax.legend(fontsize=7)
    save(fig, "induction.png")

    # 7. extension: accuracy after removing the top-n induction heads vs n random heads
    abl = res["induction_ablation"]
    if abl:
        ns = list(abl.keys())
        keys = [f"{t}/{k}" for t in TASKS for k in shots if k > 0]
        nc = min(3, len(ns))
        nr = (len(ns) + nc - 1) // nc
        fig, axes = plt.subplots(nr, nc, figsize=(5 * nc, 3.4 * nr), squeeze=False, constrained_layout=True)
        for ax in axes.flat[len(ns):]:
            ax.axis("off")
        for ax, n_ in zip(axes.flat, ns):
            a = abl[n_]["acc"]
            xs = np.arange(len(keys))
            ax.bar(xs - 0.27, [a[q]["full"] for q in keys], 0.27, label="full model", color="lightgray")
            ax.bar(xs, [a[q]["random_mean"] for q in keys], 0.27, yerr=[a[q]["random_std"] for q in keys],
                   label=f"{n_} random heads removed", color="tab:blue")
            ax.bar(xs + 0.27, [a[q]["top_induction"] for q in keys], 0.27,
                   label=f"top-{n_} prefix-matching heads removed", color="tab:red")
            ax.set_xticks(xs, keys, rotation=60, fontsize=7)
            ax.set_ylim(0, 1.35)
            ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
            ax.set_ylabel("accuracy")
            tag = " (= all with prefix score >= 0.5)" if abl[n_].get("all_prefix_ge_0.5") else ""
            heads = abl[n_]["heads"]
            ax.set_title(f"top-{n_}{tag}: " + ", ".join(heads[:8]) + (" ..." if len(heads) > 8 else ""), fontsize=8)
            ax.legend(fontsize=6, loc="upper center", ncol=2)
        save(fig, "ablation.png")

    # 8. training curve
    if log_path and os.path.exists(log_path):
        rows = [r.split(",") for r in open(log_path).read().strip().splitlines()]
        if len(rows) > 1:
            hdr, data = rows[0], rows[1:]
            col = {h: i for i, h in enumerate(hdr)}
            step = [float(r[col["step"]]) for r in data]
            fig, axes = plt.subplots(1, 2, figsize=(9, 3), constrained_layout=True)
            axes[0].plot(step, [float(r[col["train_loss"]]) for r in data], label="train")
            axes[0].plot(step, [float(r[col["val_loss"]]) for r in data], label="val")
            axes[0].set_xlabel("step"), axes[0].set_ylabel("loss on answers"), axes[0].legend()
            for h in hdr:
                if h.startswith("acc_") and not h.endswith("_0"):
                    axes[1].plot(step, [float(r[col[h]]) for r in data], label=h[4:], lw=1)
            axes[1].set_xlabel("step"), axes[1].set_ylabel("accuracy"), axes[1].legend(fontsize=6, ncol=2)
            save(fig, "training.png")
    return paths


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def die(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def resolve_device(cfg: Config) -> str:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible; use --device cpu (or auto)")
    if cfg.device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps but MPS is not available; use --device cpu (or auto)")
    return cfg.device


def validate(cfg: Config, device: str):
    """Every check that can fail runs here, before anything is written."""
    if cfg.n_head < 1 or cfg.n_embd % cfg.n_head:
        raise UsageError(f"--n_embd {cfg.n_embd} must be a positive multiple of --n_head {cfg.n_head}")
    if cfg.n_layer < 1:
        raise UsageError("--n_layer must be at least 1 (2 or more for induction heads)")
    shots = parse_ints(cfg.shots, "shots")
    parse_ints(cfg.ablate_n, "ablate_n")
    need = 3 + 2 * max(shots)
    if cfg.block_size < max(need, 2 + 4 * 4):
        raise UsageError(f"--block_size {cfg.block_size} is too short: a {max(shots)}-shot prompt needs {need} "
                         f"tokens and prefix matching needs 18; raise --block_size or lower --shots")
    if cfg.n_content < max(2 * cfg.n_clusters, 8, 2 * max(shots) + 2):
        raise UsageError(f"--n_content {cfg.n_content} is too small for {cfg.n_clusters} clusters and "
                         f"{max(shots)} shots; use at least {max(2 * cfg.n_clusters, 8, 2 * max(shots) + 2)}")
    if cfg.n_labels < cfg.n_clusters or cfg.n_clusters < 1:
        raise UsageError(f"--n_labels {cfg.n_labels} must be >= --n_clusters {cfg.n_clusters} >= 1")
    text = cfg.text_frac if cfg.dataset != "none" else 0.0
    if not 0 <= cfg.text_frac < 1 or max(cfg.rep_frac, cfg.rep_frac_early) + text >= 1 or \
            min(cfg.rep_frac, cfg.rep_frac_early) < 0:
        raise UsageError("--rep_frac, --rep_frac_early and --text_frac must be in [0, 1) and each rep "
                         "fraction plus the text fraction must stay below 1")
    for name in ("batch_size", "grad_accum", "eval_iters", "n_eval", "n_imp", "n_dev", "n_random",
                 "n_prefix_seq", "analysis_batch", "speed_batch", "eval_interval"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if not cfg.skip_train and cfg.max_iters < 1:
        raise UsageError("--max_iters must be at least 1 (or pass --skip_train --ckpt PATH)")
    if not 0 < cfg.topk_frac <= 1:
        raise UsageError("--topk_frac must be in (0, 1]")
    if cfg.dtype == "float16" and device != "cuda":
        raise UsageError("--dtype float16 needs --device cuda; use float32 or bfloat16")
    if cfg.skip_train and cfg.resume:
        raise UsageError("--skip_train and --resume contradict each other; pick one")
    if cfg.skip_train:
        path = cfg.ckpt or os.path.join(cfg.out_dir, "ckpt.pt")
        if not os.path.isfile(path):
            raise UsageError(f"checkpoint {path} not found; train first or pass --ckpt PATH")
    if cfg.resume and not os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt")):
        raise UsageError(f"--resume but {os.path.join(cfg.out_dir, 'ckpt.pt')} does not exist; drop --resume")
    if cfg.dataset != "none" and cfg.tokenizer not in CHOICES["tokenizer"]:
        raise UsageError(f"unknown --tokenizer {cfg.tokenizer}; use char or gpt2")


def load_text(cfg: Config):
    """The optional natural text, through the shared loader. Raises UsageError on any data problem."""
    if cfg.dataset == "none":
        return None
    try:
        import data
    except ImportError:
        raise UsageError("--dataset needs the repository's data/ package (run from the repo root); "
                         "or use --dataset none")
    try:
        ds = data.load_dataset(name=cfg.dataset, tokenizer=cfg.tokenizer, data_dir=cfg.data_dir or None)
        ds.check_block_size(cfg.block_size)
    except data.DataError as e:
        raise UsageError(str(e))
    return ds


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except Exception:
        return None


def main(argv=None):
    cfg, given = parse_config(argv)
    ddp_rank = int(os.environ.get("RANK", -1))
    ddp = {"rank": 0, "local_rank": 0, "world": 1}
    try:
        if ddp_rank != -1:
            import torch.distributed as dist
            ddp = {"rank": ddp_rank, "local_rank": int(os.environ["LOCAL_RANK"]),
                   "world": int(os.environ["WORLD_SIZE"])}
            if torch.cuda.is_available() and cfg.device in ("auto", "cuda"):
                torch.cuda.set_device(ddp["local_rank"])
                device = f"cuda:{ddp['local_rank']}"
                dist.init_process_group("nccl")
            else:
                device = "cpu"
                dist.init_process_group("gloo")
        else:
            device = resolve_device(cfg)
        # checkpoint to load: its model/task fields win over the flags
        ck = None
        if cfg.skip_train or cfg.resume:
            validate(cfg, device.split(":")[0])
            path = (cfg.ckpt or os.path.join(cfg.out_dir, "ckpt.pt")) if cfg.skip_train else \
                os.path.join(cfg.out_dir, "ckpt.pt")
            try:
                ck = torch.load(path, map_location="cpu", weights_only=False)
                saved = ck["config"]
            except Exception as e:
                raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}); pass a ckpt.pt "
                                 f"written by nano_prune.py")
            for f_ in MODEL_FIELDS:
                if f_ in given and getattr(cfg, f_) != saved[f_]:
                    print(f"note: --{f_} {getattr(cfg, f_)} ignored, the checkpoint has {saved[f_]}")
                setattr(cfg, f_, saved[f_])
        validate(cfg, device.split(":")[0])
        text_ds = load_text(cfg)
    except UsageError as e:
        die(str(e))

    device_type = device.split(":")[0]
    if cfg.compile is None:
        cfg.compile = device_type == "cuda"
    if cfg.compile and (device_type != "cuda" or not hasattr(torch, "compile")):
        print(f"note: torch.compile is not used on {device_type} here (--no-compile)")
        cfg.compile = False
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device_type == "cuda" and
                                                   torch.cuda.is_bf16_supported() else "float32")
    cfg.dtype = dtype
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ctx = torch.autocast(device_type=device_type, dtype=ptdtype) if ptdtype != torch.float32 \
        else contextlib.nullcontext()
    master = ddp["rank"] == 0
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out_dir = cfg.out_dir
    if master:
        os.makedirs(out_dir, exist_ok=True)
        meta = {"config": dataclasses.asdict(cfg), "torch": torch.__version__, "device": device,
                "device_name": torch.cuda.get_device_name() if device_type == "cuda" else device,
                "git_commit": git_commit(), "world_size": ddp["world"]}
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)

    tasks = ICLTasks(cfg.n_content, cfg.n_labels, cfg.n_clusters, cfg.task_seed,
                     text_ds.vocab_size if text_ds is not None else 0, cfg.recall_max_keys)
    model = GPT(cfg, tasks.vocab_size).to(device)
    if master:
        print(f"model: {cfg.n_layer} layers x {cfg.n_head} heads, d {cfg.n_embd}, T {cfg.block_size}, "
              f"{model.num_params():,} parameters, vocab {tasks.vocab_size} (padded {model.vocab_size}); "
              f"device {device}, dtype {dtype}, preset {cfg.preset}")
    t0 = time.time()
    if cfg.skip_train:
        model.load_state_dict(ck["model"])
        final = dict(ck.get("final", {}))
        final.setdefault("params", model.num_params())
        print(f"loaded {cfg.ckpt or os.path.join(out_dir, 'ckpt.pt')} (step {ck.get('step')})")
    else:
        final = train(cfg, model, tasks, Batcher(tasks, cfg, text_ds), device, ptdtype, out_dir, ddp, text_ds)
    if ddp["world"] > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    if not master:
        return
    if not cfg.skip_train:  # store the final numbers with the checkpoint (used by --skip_train)
        ckp = os.path.join(out_dir, "ckpt.pt")
        ck2 = torch.load(ckp, map_location="cpu", weights_only=False)
        ck2["final"] = final
        tmp = ckp + ".tmp"
        torch.save(ck2, tmp)
        os.replace(tmp, ckp)
    results = {"script": "nano_prune.py", "config": dataclasses.asdict(cfg), "final": final,
               "device": device, "torch": torch.__version__}
    if cfg.stop_iter and not cfg.skip_train and final.get("steps", 0) < cfg.max_iters:
        print(f"stopped at step {final['steps']} (--stop_iter); resume with --resume")
    elif cfg.analysis:
        results.update(analyse(model, tasks, cfg, device, ctx, out_dir))
        try:
            paths = plot_all(results, out_dir, os.path.join(out_dir, "log.csv"))
            print("figures: " + ", ".join(os.path.basename(p) for p in paths))
        except ImportError:
            print("note: matplotlib is not installed, no figures (pip install matplotlib)")
    results["total_elapsed_s"] = time.time() - t0
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    # a short sample: one 5-shot recall prompt and the model's greedy answer
    g = torch.Generator().manual_seed(cfg.seed + 3)
    k = min(3, max(parse_ints(cfg.shots, "shots")))
    for t in ("recall", "cluster"):
        X, Y = tasks.prompts(t, k, 1, g)
        model.eval()
        with torch.no_grad():
            logits, _ = model(X.to(device))
        pred = int(logits[0, -1].argmax())
        print(f"sample ({t}, {k}-shot): {tasks.decode(X[0])} -> {tasks.decode([pred])} "
              f"(gold {tasks.decode([int(Y[0])])})")
    print(f"done in {time.time() - t0:.0f}s; results in {out_dir}/results.json")


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    main()
