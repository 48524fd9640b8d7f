"""CPU tests for nano_simple_block.py (run: python -m pytest -q tests/test_simple_block.py)."""
import copy
import csv
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from snapshot import snapshot

import nano_simple_block as S

SHAPED = S.SHAPED_BLOCKS
SOFTMAX, CUMMEAN, SHAPED_MATRIX, BLOCK, PARAMS = (
    pytest.mark.exercise("sb_" + e) for e in ("softmax", "cummean", "shaped", "block", "params"))


def assert_same_model(a, b, idx, tol=1e-10):
    """Two GPTs with the same weights (float64): equal logits and every gradient."""
    la, loss_a = a(idx, idx)
    lb, loss_b = b(idx, idx)
    assert (la - lb).abs().max().item() < tol
    loss_a.backward()
    loss_b.backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert (pa.grad - pb.grad).abs().max().item() < tol, n


def tiny(block="sasp", **kw):
    base = dict(block=block, n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=64, mlp_ratio=2)
    base.update(kw)
    return S.Config(**base)


def perturb(model, scale=0.3):
    """Move every parameter away from its (degenerate) init: random W^Q, alpha, beta, gamma, gains, ..."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


# ---- exercise sb_softmax: causal_softmax, A = softmax(Q K^T / sqrt(d_h) + M) (Eq. 2) ----------------
@SOFTMAX
def test_causal_softmax_is_causal_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    A = S.causal_softmax(q, k)
    assert A.shape == (2, 3, 5, 5) and A.dtype == torch.float64
    assert torch.allclose(A.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64), atol=1e-12)
    assert (A.triu(1) == 0).all() and (A >= 0).all()  # probabilities, no look-ahead
    assert torch.allclose(A[..., 0, 0], torch.ones(2, 3, dtype=torch.float64))  # token 1 sees itself
    # A V is PyTorch's causal attention (its fused kernel, scale 1/sqrt(d_h))
    assert torch.allclose(A @ v, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-12)


@SOFTMAX
def test_causal_softmax_invariances_and_zero_queries():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 6, 4, dtype=torch.float64), torch.randn(1, 2, 6, 4, dtype=torch.float64)
    A = S.causal_softmax(q, k)
    # a shift of every key adds q.c to a whole row of logits: softmax does not see it
    assert torch.allclose(S.causal_softmax(q, k + torch.randn(4, dtype=torch.float64)), A, atol=1e-12)
    # future keys do not matter
    k2 = k.clone()
    k2[..., 4:, :] += 5.0
    assert torch.allclose(S.causal_softmax(q, k2)[..., :4, :], A[..., :4, :], atol=1e-12)
    # Sec. 4.1: W^Q = 0 (q = 0) gives the causal uniform matrix C, whatever the keys
    assert torch.allclose(S.causal_softmax(torch.zeros_like(q), k), S.causal_uniform(6, dtype=torch.float64),
                          atol=1e-12)


@SOFTMAX
def test_causal_softmax_snapshot():
    torch.manual_seed(2)
    q, k = torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2)
    snapshot("sb_softmax", "A_T3_dh2", S.causal_softmax(q, k)[0, 0])


# ---- exercise sb_cummean: cummean(v) = C V, the causal running mean (Eq. 5's C) --------------------
@CUMMEAN
def test_cummean_is_C_times_v():
    torch.manual_seed(0)
    for shape in [(2, 3, 7, 4), (5, 1), (1, 1, 1, 3)]:  # any leading dims; T = 1: v itself
        v = torch.randn(*shape, dtype=torch.float64)
        T = shape[-2]
        out = S.cummean(v)
        assert out.shape == v.shape and out.dtype == torch.float64
        assert (out - S.causal_uniform(T, dtype=torch.float64) @ v).abs().max().item() < 1e-12


@CUMMEAN
def test_cummean_is_a_causal_running_mean():
    torch.manual_seed(1)
    v = torch.randn(2, 6, 3, dtype=torch.float64)
    out = S.cummean(v)
    assert torch.equal(out[:, 0], v[:, 0])  # the first token averages only itself
    assert torch.allclose(out[:, -1], v.mean(1), atol=1e-12)  # the last averages all
    # a change at position t moves rows t.. by delta / (i + 1) and leaves rows < t alone
    dv = torch.zeros_like(v)
    dv[:, 3] = 1.0
    diff = S.cummean(v + dv) - out
    assert (diff[:, :3] == 0).all()
    assert torch.allclose(diff[:, 3:, 0], 1.0 / torch.arange(4, 7, dtype=torch.float64).expand(2, 3), atol=1e-12)
    # linear, and its gradient is C^T (finite differences)
    assert torch.autograd.gradcheck(S.cummean, (v[:1, :4].clone().requires_grad_(),))


@CUMMEAN
def test_cummean_accumulates_in_float32():
    torch.manual_seed(2)
    v = torch.randn(3, 50, 4, dtype=torch.float64) + 10
    C = S.causal_uniform(50, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16):
        vb = v.to(dtype)
        out = S.cummean(vb)
        assert out.dtype == torch.float32  # half inputs: a float32 running sum
        assert (out.double() - C @ vb.double()).abs().max().item() < 1e-5
    assert S.cummean(v.float()).dtype == torch.float32


@CUMMEAN
def test_cummean_snapshot():
    torch.manual_seed(3)
    snapshot("sb_cummean", "cummean_T4_C2", S.cummean(torch.randn(4, 2)))


# ---- exercise sb_shaped: skipless_matrix, alpha I + beta A - gamma C (Eqs. 4-5) --------------------
def _heads(*vals):
    return torch.tensor(vals, dtype=torch.float64).view(-1, 1, 1)


@SHAPED_MATRIX
def test_skipless_matrix_is_identity_at_init():
    """Sec. 4.1: W^Q = 0 makes A = C; then alpha = beta = gamma = 1 gives the identity."""
    T, H = 5, 3
    C = S.causal_uniform(T, dtype=torch.float64).expand(2, H, T, T)
    eye = torch.eye(T, dtype=torch.float64).expand(2, H, T, T)
    M = S.skipless_matrix(C, _heads(1, 1, 1), _heads(1, 1, 1), _heads(1, 1, 1))
    assert M.shape == (2, H, T, T) and M.dtype == torch.float64
    assert (M - eye).abs().max().item() < 1e-15
    # Eq. 4 (V-SkipInit) at init: beta = 0, no gamma C: the identity whatever A is
    A = torch.rand(2, H, T, T, dtype=torch.float64)
    assert (S.skipless_matrix(A, _heads(1, 1, 1), _heads(0, 0, 0), _heads(0, 0, 0)) - eye).abs().max() < 1e-15


@SHAPED_MATRIX
def test_skipless_matrix_terms_heads_and_rows():
    torch.manual_seed(0)
    B, H, T = 2, 2, 4
    A = torch.rand(B, H, T, T, dtype=torch.float64).tril()
    A = A / A.sum(-1, keepdim=True)  # a causal, row-stochastic matrix
    C = S.causal_uniform(T, dtype=torch.float64)
    z, o = _heads(0, 0), _heads(1, 1)
    assert torch.allclose(S.skipless_matrix(A, o, z, z), torch.eye(T, dtype=torch.float64).expand(B, H, T, T))
    assert torch.allclose(S.skipless_matrix(A, z, o, z), A)
    assert torch.allclose(S.skipless_matrix(A, z, z, o), -C.expand(B, H, T, T))
    # each head has its own alpha_h, beta_h, gamma_h
    a, b, c = _heads(0.5, 2.0), _heads(1.5, -1.0), _heads(0.25, 3.0)
    M = S.skipless_matrix(A, a, b, c)
    for h in range(H):
        assert torch.allclose(M[:, h:h + 1], S.skipless_matrix(A[:, h:h + 1], a[h], b[h], c[h]))
    # causal; rows of A and C sum to 1, so each row of M sums to alpha_h + beta_h - gamma_h
    assert (M.triu(1) == 0).all()
    assert torch.allclose(M.sum(-1), (a + b - c).view(1, H, 1).expand(B, H, T))
    # float32 stays float32 (the model's dtype)
    assert S.skipless_matrix(A.float(), a.float(), b.float(), c.float()).dtype == torch.float32


@SHAPED_MATRIX
def test_skipless_matrix_snapshot():
    torch.manual_seed(1)
    A = torch.rand(1, 2, 3, 3).tril()
    A = A / A.sum(-1, keepdim=True)
    M = S.skipless_matrix(A, torch.tensor([0.9, 1.1]).view(2, 1, 1), torch.tensor([1.2, 0.7]).view(2, 1, 1),
                          torch.tensor([0.8, 1.3]).view(2, 1, 1))
    snapshot("sb_shaped", "M_H2_T3", M[0])


# ---- exercise sb_block: Block.forward's plain SAS (Eqs. 12-13) and SAS-P (Eq. 7) -------------------
def plain_block(block, layer=1, seed=3, **kw):
    """One block of a perturbed float64 model with the plain forward (fused=False)."""
    torch.manual_seed(seed)
    model = S.GPT(tiny(block, fused=False, **kw)).double()
    perturb(model)
    return model.blocks[layer]


def with_gains(blk, **gains):
    """The block with some scalar gains replaced (a copy)."""
    blk = copy.deepcopy(blk)
    with torch.no_grad():
        for n, v in gains.items():
            getattr(blk, n).fill_(v)
    return blk


@BLOCK
@pytest.mark.parametrize("block", ["sasp", "sasp_nonorm"])
def test_sasp_block_sums_two_branches_without_skip(block):
    blk = plain_block(block)  # block 2: sasp_nonorm has no norm there
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    bsa, bff = blk.beta_sa.item(), blk.beta_ff.item()
    f = lambda **g: with_gains(blk, **g)(x)  # noqa: E731
    assert (f(beta_sa=0.0, beta_ff=0.0) == 0).all()  # no skip: both branches off give 0
    assert torch.allclose(blk(x), f(beta_ff=0.0) + f(beta_sa=0.0), atol=1e-12)  # a sum of 2 branches
    assert torch.allclose(f(beta_sa=2 * bsa, beta_ff=0.0), 2 * f(beta_ff=0.0), atol=1e-12)
    assert torch.allclose(f(beta_sa=0.0, beta_ff=3 * bff), 3 * f(beta_sa=0.0), atol=1e-12)
    mlp_branch = with_gains(blk, beta_sa=0.0)
    if block == "sasp":  # both branches read Norm(x): blind to the scale of x (eps = 0)
        blk.norm1.eps = 0.0
        assert torch.allclose(blk(3 * x), blk(x), atol=1e-10)
    else:  # no norm: the MLP branch (ReLU, no biases) is positively homogeneous
        assert torch.allclose(mlp_branch(3 * x), 3 * mlp_branch(x), atol=1e-12)


@BLOCK
@pytest.mark.parametrize("block", ["sas", "vskip"])
def test_sas_block_sequential_with_mlp_skip(block):
    blk = plain_block(block)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    f = lambda **g: with_gains(blk, **g)(x)  # noqa: E731
    assert (f(beta_sa=0.0) == 0).all()  # no attention skip: x_hat = 0, and Norm(0) = MLP(0) = 0
    skip = f(beta_ff=0.0)  # alpha_FF x_hat alone
    assert torch.allclose(f(beta_ff=0.0, alpha_ff=2 * blk.alpha_ff.item()), 2 * skip, atol=1e-12)
    assert torch.allclose(blk(x), skip + f(alpha_ff=0.0), atol=1e-12)  # skip + MLP branch
    # the MLP reads Norm_2(x_hat): with eps = 0 the MLP branch is blind to the scale of x_hat
    mlp_branch = with_gains(blk, alpha_ff=0.0)
    mlp_branch.norm2.eps = 0.0
    y = mlp_branch(x)
    assert torch.allclose(with_gains(mlp_branch, beta_sa=3 * blk.beta_sa.item())(x), y, atol=1e-10)
    # --no-mlp_skip: the same block without alpha_FF x_hat
    noskip = S.GPT(tiny(block, fused=False, mlp_skip=False)).double().blocks[1]
    assert not hasattr(noskip, "alpha_ff")
    noskip.load_state_dict({k: v for k, v in blk.state_dict().items() if k != "alpha_ff"})
    assert torch.allclose(noskip(x), f(alpha_ff=0.0), atol=1e-12)


@BLOCK
@pytest.mark.parametrize("fused", [False, True])
def test_sas_equals_sasp_at_init(fused):
    """Paper Sec. 4.3: with identity attention, SAS and SAS-P compute the same function at init."""
    torch.manual_seed(0)
    sas = S.GPT(tiny("sas", n_layer=3, norm_eps=0.0, fused=fused)).double()
    torch.manual_seed(0)
    sasp = S.GPT(tiny("sasp", n_layer=3, norm_eps=0.0, fused=fused)).double()
    # the same seed gives the same weights for every parameter they share
    sd = sas.state_dict()
    for k, v in sasp.state_dict().items():
        assert torch.equal(v, sd[k]), k
    idx = torch.randint(0, 64, (2, 6))
    a, b = sas(idx, idx)[0], sasp(idx, idx)[0]
    assert (a - b).abs().max().item() < 1e-10
    # and not after training moves the attention away from the identity
    perturb(sas)
    sasp.load_state_dict({k: v for k, v in sas.state_dict().items() if k in sasp.state_dict()})
    assert (sas(idx, idx)[0] - sasp(idx, idx)[0]).abs().max().item() > 1e-3


@BLOCK
@pytest.mark.parametrize("block,layer", [("sas", 0), ("sas", 1), ("vskip", 1), ("sasp", 0), ("sasp", 1),
                                         ("sasp_nonorm", 1)])
def test_simplified_block_snapshot(block, layer):
    blk = plain_block(block, layer, n_embd=4, n_head=2)
    torch.manual_seed(4)
    snapshot("sb_block", f"{block}_layer{layer}", blk(torch.randn(1, 3, 4, dtype=torch.float64))[0])


# ----------------------------------------------------------------------------- shaped attention
@pytest.mark.parametrize("block", SHAPED)
@pytest.mark.parametrize("layer", [0, 1])
def test_shaped_attention_is_identity_at_init(block, layer):
    torch.manual_seed(0)
    cfg = tiny(block, n_embd=32, n_head=4, block_size=16)
    model = S.GPT(cfg)
    att = model.blocks[layer].attn
    h = torch.randn(3, 16, 32)
    y = att(h)
    if block == "vskip":  # orthogonal W^V, W^P: identity attention gives h W^V^T W^P^T
        expect = h @ att.c_v.weight.t() @ att.c_proj.weight.t()
    else:
        expect = h
    assert (y - expect).abs().max().item() < 1e-5


def test_shaped_attention_not_identity_after_perturbation():
    """The identity test above can fail: a random W^Q breaks it."""
    torch.manual_seed(0)
    model = S.GPT(tiny("sasp", n_embd=32, n_head=4, block_size=16))
    perturb(model)
    h = torch.randn(3, 16, 32)
    assert (model.blocks[1].attn(h) - h).abs().max().item() > 1e-2


def test_causal_uniform_is_softmax_of_the_mask():
    """C = softmax(M): causal attention with all logits 0 (q = 0), here through PyTorch's kernel."""
    C = S.causal_uniform(7, dtype=torch.float64)
    q, k = torch.zeros(1, 1, 7, 2, dtype=torch.float64), torch.randn(1, 1, 7, 2, dtype=torch.float64)
    eye = torch.eye(7, dtype=torch.float64).view(1, 1, 7, 7)
    assert torch.allclose(C, F.scaled_dot_product_attention(q, k, eye, is_causal=True)[0, 0], atol=1e-15)


@pytest.mark.parametrize("how", ["cumsum", "matmul"])
def test_cummean_fast_equals_C_times_v(how):
    """Making it fast: cummean_fast (both --cummean forms) against the plain C @ v."""
    torch.manual_seed(0)
    v = torch.randn(2, 3, 7, 4, dtype=torch.float64)
    C = S.causal_uniform(7, dtype=torch.float64)
    assert (S.cummean_fast(v, how) - C @ v).abs().max().item() < 1e-12
    # bf16 input: the cumulative sum is taken in float32
    vb = v.to(torch.bfloat16)
    out = S.cummean_fast(vb, how)
    assert out.dtype == torch.float32
    assert (out.double() - C @ vb.double()).abs().max().item() < 2e-2


VARIANTS = [{}, {"gains": "layer"}, {"attn_matrix": "vskip"}, {"cummean": "cumsum"}]


@SOFTMAX
@SHAPED_MATRIX
@pytest.mark.parametrize("block,variant", [(b, {}) for b in S.BLOCKS] + [(b, v) for b in SHAPED for v in VARIANTS[1:]])
def test_sdpa_path_equals_explicit_path_float64(block, variant):
    """The model with the plain T x T matrices (causal_softmax, skipless_matrix) against the fast
    SDPA form it trains with, forward and every gradient."""
    torch.manual_seed(1)
    cfg = tiny(block, n_layer=3, n_head=2, n_embd=8, block_size=6, **variant)
    fast = S.GPT(cfg).double()
    perturb(fast)  # random alpha, beta, gamma and W^Q
    slow = S.GPT(dataclasses.replace(cfg, attn_impl="explicit")).double()
    slow.load_state_dict(fast.state_dict())
    assert_same_model(fast, slow, torch.randint(0, 64, (3, 6)))


# ----------------------------------------------------------------------------- blocks against the paper's equations
def rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_mha(att, h):
    """Eqs. 2-3 from the parameters, with PyTorch's causal attention kernel."""
    B, T, d = h.shape
    H = att.n_head
    Wq, Wk = att.c_qk.weight[:d], att.c_qk.weight[d:]
    bq, bk = att.c_qk.bias[:d], att.c_qk.bias[d:]
    split = lambda t: t.view(B, T, H, d // H).transpose(1, 2)  # noqa: E731
    q, k, v = split(h @ Wq.t() + bq), split(h @ Wk.t() + bk), split(h @ att.c_v.weight.t())
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
    return y @ att.c_proj.weight.t()


@pytest.mark.parametrize("block", ["preln", "parallel"])
@pytest.mark.parametrize("fused", [False, True])
def test_baseline_blocks_match_paper_equations(block, fused):
    """Pre-LN (Eq. 1) and the parallel block (Eq. 7) written out. (The simplified blocks are
    exercise sb_block: graded by properties and snapshots above, and by the fused forms below.)"""
    torch.manual_seed(2)
    cfg = tiny(block, n_layer=2, fused=fused)
    model = S.GPT(cfg).double()
    perturb(model)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    blk, eps = model.blocks[1], cfg.norm_eps
    mlp = lambda t: F.relu(t @ blk.mlp.c_fc.weight.t()) @ blk.mlp.c_proj.weight.t()  # noqa: E731
    h = rms(x, blk.norm1.weight, eps)
    if block == "preln":
        xh = x + ref_mha(blk.attn, h)
        ref = xh + mlp(rms(xh, blk.norm2.weight, eps))
    else:
        ref = x + ref_mha(blk.attn, h) + mlp(h)
    assert (blk(x) - ref).abs().max().item() < 1e-10


# ----------------------------------------------------------------------------- shapes, loss, gradients
@pytest.mark.parametrize("block", S.BLOCKS)
def test_shapes_loss_and_gradient_flow(block):
    torch.manual_seed(0)
    model = S.GPT(tiny(block, n_layer=3))
    idx = torch.randint(0, 64, (2, 6))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 6, 64) and torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5  # near uniform at init
    assert model(idx)[0].shape == (2, 1, 64)
    perturb(model, 0.1)  # at init W^Q = 0 so W^K gets no gradient; after a move every parameter must
    model.zero_grad()
    model(idx, idx)[1].backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().max().item() > 0, n


def test_frozen_gains_are_buffers_not_parameters():
    model = S.GPT(tiny("sasp", trainable_gains=False))
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.split(".")[-1] in ("alpha", "beta", "gamma", "beta_sa", "beta_ff", "alpha_v", "beta_v")
                   for n in names)
    assert "blocks.0.attn.alpha" in dict(model.named_buffers())


# layer 1 differs from layer 0 only where the first block keeps W_1^V
@pytest.mark.parametrize("block,layer", [(b, 0) for b in S.BLOCKS] + [(b, 1) for b in ("sas", "sasp", "sasp_nonorm")])
def test_gradcheck_block_float64(block, layer):
    """torch.autograd.gradcheck of one block, w.r.t. its input and every parameter."""
    torch.manual_seed(4)
    cfg = tiny(block, n_layer=2, n_embd=4, n_head=2, block_size=3, mlp_ratio=2)
    model = S.GPT(cfg).double()
    perturb(model)
    blk = model.blocks[layer]
    names = [n for n, _ in blk.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in blk.named_parameters())
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return functional_call(blk, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x,) + params, eps=1e-6, atol=1e-6)


def test_gradcheck_shaped_attention_sdpa_float64():
    """gradcheck of beta SDPA(q, k, v) + alpha v - gamma cummean(v) w.r.t. q, k, v and the per-head gains."""
    torch.manual_seed(5)
    att = S.GPT(tiny("sasp", n_embd=4, n_head=2, block_size=4)).double().blocks[1].attn

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.att = att

        def forward(self, q, k, v):
            return S.sdpa_attention(self.att, q, k, v)

    wrap = Wrap()
    q, k, v = (torch.randn(1, 2, 4, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    gains = tuple(torch.rand(2, dtype=torch.float64, requires_grad=True) + 0.5 for _ in range(3))

    def f(q, k, v, a, b, c):
        return functional_call(wrap, {"att.alpha": a, "att.beta": b, "att.gamma": c}, (q, k, v))

    assert torch.autograd.gradcheck(f, (q, k, v) + gains)


# ----------------------------------------------------------------------------- parameters and weight decay
@PARAMS
@pytest.mark.parametrize("block", S.BLOCKS)
@pytest.mark.parametrize("variant", [{}, {"gains": "layer"}, {"first_value": False}, {"trainable_gains": False},
                                     {"attn_matrix": "vskip"}, {"mlp_skip": False}, {"mlp_ratio": 3}])
def test_param_count_equals_formula(block, variant):
    cfg = tiny(block, n_layer=3, n_head=4, n_embd=16, block_size=10, vocab_size=128, **variant)
    model = S.GPT(cfg)
    assert S.count_params(model) == S.param_formula(cfg, block)


@PARAMS
def test_param_formula_at_paper_shape():
    """Sec. 4.1: V = 50,000, 1024 positions, 18 x 768: Pre-LN 166.64M, SAS 146.00M (paper: 167M -> 146M)."""
    cfg = S.Config(n_layer=18, n_head=12, n_embd=768, block_size=1024, vocab_size=50000)
    n = {b: S.param_formula(cfg, b) for b in S.BLOCKS}
    assert round(n["preln"] / 1e6, 2) == 166.64 and round(n["sas"] / 1e6, 2) == 146.00
    assert 0.12 < 1 - n["sasp"] / n["preln"] < 0.13
    # W^V, W^P are 2 d^2 per block: the bulk of the saving
    assert abs(n["preln"] - n["sas"] - (18 * 2 - 1) * 768 ** 2) < 1000  # (block 1 keeps dW)
    snapshot("sb_params", "paper_shape", [n[b] for b in S.BLOCKS])
    small = S.Config(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=64, mlp_ratio=2)
    snapshot("sb_params", "tiny_shape", [S.param_formula(small, b) for b in S.BLOCKS])


def test_param_reduction_at_paper_shape():
    """The table main() prints counts the real models (meta device): Pre-LN 166.64M, SAS 146.00M."""
    cfg = S.Config(n_layer=18, n_head=12, n_embd=768, block_size=1024, vocab_size=50000)
    rows = {r["block"]: r for r in S.param_table(cfg)}
    assert round(rows["preln"]["params"] / 1e6, 2) == 166.64
    assert round(rows["sas"]["params"] / 1e6, 2) == 146.00
    assert 0.12 < rows["sasp"]["reduction_vs_preln"] < 0.13


def test_gains_excluded_from_weight_decay():
    model = S.GPT(tiny("sas", n_layer=2))
    opt = S.make_optimizer(model, dataclasses.replace(tiny("sas"), weight_decay=0.1), "cpu")
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    names = dict(model.named_parameters())
    for n, p in names.items():
        leaf = n.split(".")[-1]
        if leaf in ("alpha", "beta", "gamma", "beta_sa", "beta_ff", "alpha_ff", "alpha_v", "beta_v", "bias") \
                or "norm" in n:
            assert id(p) not in decay, n
        else:
            assert id(p) in decay, n
    assert id(names["blocks.0.attn.dW_v"]) in decay and id(names["wte.weight"]) in decay
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == len(names)


def test_lr_schedule_paper():
    cfg = S.Config(lr=1e-3, min_lr=0.0, max_iters=1000)
    assert S.warmup_iters(cfg) == 50
    lrs = [S.get_lr(s, cfg) for s in range(1001)]
    assert max(lrs) == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:50], lrs[1:51]))
    assert lrs[1000] == pytest.approx(0.0)
    assert lrs[525] == pytest.approx(0.5e-3)  # linear decay: half way


# ----------------------------------------------------------------------------- main()
def run_main(args, out):
    S.main(["--device", "cpu", "--out_dir", str(out)] + args)


SMALL = ["--preset", "cpu", "--n_layer", "2", "--n_embd", "16", "--n_head", "2", "--block_size", "16",
         "--batch_size", "4", "--eval_iters", "2", "--sample_tokens", "8"]


def test_main_smoke_and_exact_resume(tmp_path, tiny_text):
    args = SMALL + ["--dataset", tiny_text, "--max_iters", "6", "--eval_interval", "2", "--block", "sas"]
    out = tmp_path / "a"
    run_main(args, out)
    for f in ("config.json", "log.csv", "results.json", "ckpt.pt", "params.json", "loss_vs_step.png",
              "loss_vs_time.png"):
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())
    assert res["script"] == "nano_simple_block.py"
    for k in ("train_loss", "val_loss", "val_ppl", "tokens_per_s", "params", "elapsed_s"):
        assert k in res["final"]
    ra = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in ra] == [0, 2, 4, 6]
    assert float(ra[-1]["train_loss"]) < float(ra[0]["train_loss"])
    # interrupted at step 4, then resumed: the same losses as the uninterrupted run
    run_main(args + ["--stop_at", "4", "--sample_tokens", "0"], tmp_path / "b")
    assert len(list(csv.DictReader(open(tmp_path / "b" / "log.csv")))) == 3
    run_main(args + ["--resume", "--sample_tokens", "0"], tmp_path / "b")
    rb = list(csv.DictReader(open(tmp_path / "b" / "log.csv")))
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert x["train_loss"] == y["train_loss"] and x["val_loss"] == y["val_loss"]


def test_compare_and_bench_modes(tmp_path, tiny_text):
    out = tmp_path / "cmp"
    run_main(SMALL + ["--dataset", tiny_text, "--max_iters", "2", "--eval_interval", "2", "--sample_tokens", "0",
                      "--compare", "preln,sasp"], out)
    for f in ("compare.md", "compare.json", "compare_loss_vs_step.png", "compare_loss_vs_time.png",
              "preln/log.csv", "sasp/log.csv"):
        assert (out / f).exists(), f
    bench = tmp_path / "bench"
    run_main(SMALL + ["--bench", "preln,sasp:gains=layer", "--bench_iters", "1", "--vocab_size", "64"],
             bench)
    table = json.loads((bench / "bench.json").read_text())["table"]
    assert [r["block"] for r in table] == ["preln", "sasp:gains=layer"]
    assert table[0]["speed_vs_base"] == 1.0 and table[1]["params_vs_base"] < 0


BAD = [  # script-specific bad input (tests/test_cli.py has the common cases)
    (["--block", "foo"], "invalid choice"),
    (["--block", "nope", "--compare", "preln,sasp"], "invalid choice"),
    (["--compare", "preln,bogus"], "unknown block"),
    (["--preset", "gpu", "--compare", "preln,bogus"], "unknown block"),  # (no tuned LR for it)
    (["--compare", "preln,preln"], "twice"),
    (["--compare", "preln,"], "unknown block"),
    (["--bench", "nope"], "unknown block"),
    (["--bench", "sasp:nosuch=1"], "bad bench entry"),
    (["--bench", "sasp:n_layer=two"], "takes a int"),
    (["--bench", "sasp:fused=maybe"], "true or false"),
    (["--bench", "sasp:n_head=3"], "must divide"),
    (["--bench", "preln,sasp:lr=-1"], "--lr"),
    (["--compare", "preln,sasp", "--norm_eps", "-1"], "norm_eps"),
    (["--bench", "preln", "--compare", "preln"], "separate modes"),
    (["--resume", "--compare", "preln,sasp"], "separate modes"),
    (["--n_embd", "10", "--n_head", "3"], "must divide"),
    (["--block", "preln", "--gains", "layer"], "shaped attention"),
    (["--block", "parallel", "--attn_matrix", "vskip"], "shaped attention"),
    (["--block", "sasp", "--no-mlp_skip"], "sas or vskip"),
    (["--norm_eps", "-1"], "norm_eps"),
    (["--norm_eps", "inf"], "norm_eps"),
    (["--beta_ff", "nan"], "beta_ff"),
    (["--beta_sa", "inf"], "beta_sa"),
    (["--warmup_frac", "1.5"], "warmup_frac"),
    (["--mlp_ratio", "0"], "mlp_ratio"),
    (["--vocab_size", "-1"], "vocab_size"),
    (["--sample_tokens", "-1"], "sample_tokens"),
    (["--bench_iters", "0"], "bench_iters"),
    (["--attn_impl", "flash"], "invalid choice"),
    (["--cummean", "scan"], "invalid choice"),
    (["--schedule", "step"], "invalid choice"),
    (["--resume"], "no checkpoint"),
    (["--dataset", "/nonexistent/file.txt"], "not found"),
    (["--block_size", "100000"], "block_size"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, needle, tiny_text):
    out = tmp_path / "never"
    data = [] if "--dataset" in args else ["--dataset", tiny_text]
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        run_main(data + args, out)
    assert e.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert err[0].startswith("nano_simple_block.py: error: ")
    assert "Traceback" not in captured.out
    assert sorted(os.listdir(tmp_path)) == before and not out.exists()


@BLOCK
@pytest.mark.parametrize("block,variant", [(b, v) for b in S.BLOCKS for v in ({}, {"attn_impl":
                                             "explicit"})] + [(b, {"gains": "layer"}) for b in SHAPED])
def test_fused_forms_equal_plain_forms_float64(block, variant):
    """Making it fast: fused_block_forward (one GEMM for both branches, gains folded into the
    weights, addmm) against Block.forward's plain equations, forward and every gradient."""
    torch.manual_seed(7)
    cfg = tiny(block, n_layer=3, **variant)
    fast = S.GPT(cfg).double()
    perturb(fast)
    plain = S.GPT(dataclasses.replace(cfg, fused=False)).double()
    plain.load_state_dict(fast.state_dict())
    assert_same_model(fast, plain, torch.randint(0, 64, (3, 6)))


def test_all_plain_equals_all_fast_float64():
    """The whole plain model (T x T matrices, unfused blocks) against the default fast one."""
    torch.manual_seed(8)
    cfg = tiny("sasp", n_layer=3)
    fast = S.GPT(cfg).double()
    perturb(fast)
    plain = S.GPT(dataclasses.replace(cfg, fused=False, attn_impl="explicit")).double()
    plain.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 64, (3, 6))
    assert (fast(idx, idx)[0] - plain(idx, idx)[0]).abs().max().item() < 1e-10


def test_stop_at_between_evals_then_resume_is_exact(tmp_path, tiny_text):
    """--stop_at 3 (not an eval step) leaves a step-3 checkpoint; resuming gives the same log."""
    args = SMALL + ["--dataset", tiny_text, "--max_iters", "6", "--eval_interval", "2",
                    "--block", "sasp", "--sample_tokens", "0"]
    run_main(args, tmp_path / "a")
    run_main(args + ["--stop_at", "3"], tmp_path / "b")
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    run_main(args + ["--resume"], tmp_path / "b")
    ra = list(csv.DictReader(open(tmp_path / "a" / "log.csv")))
    rb = list(csv.DictReader(open(tmp_path / "b" / "log.csv")))
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in ra] == \
        [(r["step"], r["train_loss"], r["val_loss"]) for r in rb]


def test_resume_takes_architecture_from_checkpoint(tmp_path, tiny_text, capsys):
    """Architecture flags not given on resume come from the checkpoint; given ones must match."""
    args = SMALL + ["--dataset", tiny_text, "--max_iters", "4", "--eval_interval", "2",
                    "--sample_tokens", "0"]
    run_main(args + ["--block", "sas", "--stop_at", "2"], tmp_path / "a")
    run_main(args + ["--resume"], tmp_path / "a")  # --block not given: sas from the checkpoint
    assert json.loads((tmp_path / "a" / "results.json").read_text())["config"]["block"] == "sas"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(args + ["--resume", "--block", "sasp"], tmp_path / "a")
    assert e.value.code == 2
    assert "checkpoint has block=sas but --block sasp was given" in capsys.readouterr().err


def test_out_of_memory_is_one_line_and_removes_the_new_out_dir(tmp_path, tiny_text, capsys,
                                                               monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(S, "train", oom)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run_main(SMALL + ["--dataset", tiny_text], out)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0] and "--grad_accum" in err[0], err
    assert not out.exists()


def test_gpu_preset_takes_each_blocks_tuned_lr():
    """The gpu preset's LR depends on --block (the sweep's best); an explicit --lr wins; each
    --compare entry gets its own block's LR."""
    for block, lr in S.GPU_LR.items():
        assert S.parse_config(["--preset", "gpu", "--block", block]).lr == lr
    assert S.GPU_LR["sasp"] == 4 * S.GPU_LR["preln"]
    assert S.parse_config(["--preset", "gpu", "--block", "preln", "--lr", "1e-3"]).lr == 1e-3
    assert S.parse_config(["--preset", "cpu", "--block", "preln"]).lr == S.Config().lr
    cfg = S.parse_config(["--preset", "gpu", "--compare", "preln,sasp"])
    assert [c.lr for c in S.run_configs(cfg)] == [S.GPU_LR["preln"], S.GPU_LR["sasp"]]
    cfg = S.parse_config(["--preset", "gpu", "--compare", "preln,sasp", "--lr", "1e-4"])
    assert [c.lr for c in S.run_configs(cfg)] == [1e-4, 1e-4]
