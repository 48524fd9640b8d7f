"""Tests for nano_prune.py (CPU, well under a minute): run `python -m pytest -q tests/test_prune.py`."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from snapshot import snapshot

import nano_prune as npr



def tiny_cfg(**kw):
    cfg = npr.Config(n_layer=2, n_head=3, n_embd=24, block_size=24, n_content=16, n_labels=4, n_clusters=2)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_cfg(**kw)
    tasks = npr.ICLTasks(cfg.n_content, cfg.n_labels, cfg.n_clusters, cfg.task_seed)
    m = npr.GPT(cfg, tasks.vocab_size).to(dtype)
    with torch.no_grad():  # make the untrained model less trivial: larger weights, non-default LN
        for n, p in m.named_parameters():
            p.add_(0.3 * torch.randn_like(p)) if p.dim() >= 2 else p.add_(0.2 * torch.randn_like(p))
    m.eval()
    return cfg, tasks, m


def reference_forward(m, idx):
    """The same transformer with no gates, each attention sublayer a torch.nn.MultiheadAttention
    carrying the block's weights (W_Q, W_K, W_V stacked as in c_attn; W_O)."""
    B, T = idx.shape
    x = m.wte.weight[idx] + m.wpe.weight[:T]
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = may not attend
    for blk in m.blocks:
        a = blk.attn
        mha = torch.nn.MultiheadAttention(x.shape[-1], a.n_head, bias=False, batch_first=True)
        mha = mha.to(x.dtype).eval()
        with torch.no_grad():
            mha.in_proj_weight.copy_(a.c_attn.weight)
            mha.out_proj.weight.copy_(a.c_proj.weight)
        h = F.layer_norm(x, (x.shape[-1],), blk.ln_1.weight, blk.ln_1.bias)
        x = x + mha(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = F.layer_norm(x, (x.shape[-1],), blk.ln_2.weight, blk.ln_2.bias)
        x = x + F.gelu(h @ blk.mlp.c_fc.weight.T) @ blk.mlp.c_proj.weight.T
    x = F.layer_norm(x, (x.shape[-1],), m.ln_f.weight, m.ln_f.bias)
    return x @ m.lm_head.weight.T




def full_logits(m, idx):
    B, T = idx.shape
    tgt = torch.zeros(B, T, dtype=torch.long)
    return m(idx, tgt)[0]


# ---- exercise prune_head_gate: gated_attention, xi_h * A_h (Sec. 2.2; Michel Eq. 1) -----------------
@pytest.mark.exercise("prune_head_gate")
def test_gated_attention_is_causal_attention_times_the_gates():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64) for _ in range(3))
    y1, att = npr.gated_attention(q, k, v, torch.ones(3, dtype=torch.float64))
    assert y1.shape == (2, 3, 6, 4) and att.shape == (2, 3, 6, 6)
    # gates at 1: the plain causal attention (PyTorch's fused kernel)
    assert torch.allclose(y1, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-12)
    assert torch.allclose(att.sum(-1), torch.ones(2, 3, 6, dtype=torch.float64))
    assert (att.triu(1) == 0).all() and (att >= 0).all()  # probabilities, no look-ahead
    # a gate scales its own head only; gate 0 removes the head exactly
    gate = torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64)
    y, att2 = npr.gated_attention(q, k, v, gate)
    assert (y[:, 0] == 0).all() and torch.equal(y[:, 1], y1[:, 1])
    assert torch.allclose(y[:, 2], 0.25 * y1[:, 2], atol=1e-15)
    assert torch.equal(att2, att)  # the gate acts after the softmax
    # causality: changing the last token's key and value leaves earlier outputs unchanged
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 3.0
    v2[:, :, -1] -= 2.0
    y3, _ = npr.gated_attention(q, k2, v2, gate)
    assert torch.allclose(y3[:, :, :-1], y[:, :, :-1], atol=1e-14)


@pytest.mark.exercise("prune_head_gate")
def test_gated_attention_snapshot():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 2, dtype=torch.float64) for _ in range(3))
    y, att = npr.gated_attention(q, k, v, torch.tensor([1.0, 0.5], dtype=torch.float64))
    snapshot("prune_head_gate", "y_gate_1_0.5", y[0])
    snapshot("prune_head_gate", "att", att[0])


@pytest.mark.exercise("prune_head_gate")
def test_gates_at_one_equal_ungated_model_both_attention_paths():
    cfg, tasks, m = tiny_model()
    idx = torch.randint(tasks.vocab_size, (3, 20))
    ref = reference_forward(m, idx)
    m.set_analysis(explicit=False)
    sdpa = full_logits(m, idx)
    m.set_analysis(explicit=True)
    expl = full_logits(m, idx)
    assert torch.allclose(sdpa, ref, atol=1e-10)
    assert torch.allclose(expl, ref, atol=1e-10)
    # gates in (0, 1): both paths still agree, and the gates are live (not the same function)
    hm = np.array([[1.0, 0.5, 0.0], [0.3, 1.0, 0.8]])
    m.set_masks(hm, None)
    expl = full_logits(m, idx)
    m.set_analysis(explicit=False)
    assert torch.allclose(full_logits(m, idx), expl, atol=1e-10)
    assert not torch.allclose(expl, ref, atol=1e-4)


def _answer_loss(m, X, Y):
    logits, _ = m(X)
    return F.cross_entropy(logits[:, -1, :], Y, reduction="sum")


@pytest.mark.exercise("prune_head_gate")
def test_gate_gradient_is_finite_difference_and_gradcheck():
    """The gates are differentiable: dL/dxi_h by autograd = a central finite difference, on the
    analysis path (explicit softmax); and torch.autograd.gradcheck at random gates."""
    cfg, tasks, m = tiny_model()
    X, Y = tasks.prompts("recall", 3, 1, torch.Generator().manual_seed(1))
    l, h = 1, 2
    attn = m.blocks[l].attn
    gate = torch.ones(cfg.n_head, dtype=torch.float64, requires_grad=True)
    attn.head_mask = gate
    m.set_analysis(explicit=True)
    _answer_loss(m, X, Y).backward()
    g_auto = gate.grad[h].item()
    eps, vals = 1e-6, []
    with torch.no_grad():
        for sgn in (+1, -1):
            gg = torch.ones(cfg.n_head, dtype=torch.float64)
            gg[h] += sgn * eps
            attn.head_mask = gg
            vals.append(_answer_loss(m, X, Y).item())
    assert abs(g_auto) > 1e-6
    assert g_auto == pytest.approx((vals[0] - vals[1]) / (2 * eps), rel=1e-6, abs=1e-9)

    X, Y = tasks.prompts("cluster", 2, 2, torch.Generator().manual_seed(2))

    def f(g0, g1):
        m.blocks[0].attn.head_mask = g0
        m.blocks[1].attn.head_mask = g1
        return _answer_loss(m, X, Y)
    gates = (torch.rand(3, dtype=torch.float64, requires_grad=True),
             torch.rand(3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(f, gates)


@pytest.mark.exercise("prune_head_gate")
def test_masking_a_head_equals_deleting_its_slice_of_W_O():
    """Gate 0 removes head 1 of layer 0 exactly: the same logits as zeroing its columns of W_O,
    on the training path (fused kernel) and on the analysis path (gated_attention)."""
    cfg, tasks, m = tiny_model()
    idx = torch.randint(tasks.vocab_size, (2, 16))
    hs = m.head_size
    hm = np.ones((2, 3))
    hm[0, 1] = 0
    masked = {}
    for explicit in (False, True):
        m.set_analysis(explicit=explicit)
        m.set_masks(hm, None)
        masked[explicit] = full_logits(m, idx)
    m.set_masks(None, None)
    with torch.no_grad():
        m.blocks[0].attn.c_proj.weight[:, 1 * hs:2 * hs] = 0
    for explicit in (False, True):
        m.set_analysis(explicit=explicit)
        assert torch.allclose(full_logits(m, idx), masked[explicit], atol=1e-12), explicit


def test_every_parameter_gets_gradient_but_no_buffer_is_trained():
    cfg, tasks, m = tiny_model(dtype=torch.float32)
    m.train()
    x, y = npr.Batcher(tasks, cfg).get(8, torch.Generator().manual_seed(0))
    _, loss = m(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(not b.requires_grad for b in m.buffers())


# ---- exercise prune_head_importance: IS_h = E |A_h^T dL/dA_h| = E |dL/dxi_h| (Eq. 8-9) ------------
def _gate_derivatives_by_finite_differences(m, X, Y, eps=1e-6):
    """(L, H): dL/dxi_h at xi = 1 by central differences, one head at a time (no autograd)."""
    L, H = len(m.blocks), m.n_head
    out = np.zeros((L, H))
    with torch.no_grad():
        for l in range(L):
            for h in range(H):
                vals = []
                for sgn in (+1, -1):
                    g = torch.ones(H, dtype=torch.float64)
                    g[h] += sgn * eps
                    m.blocks[l].attn.head_mask = g
                    vals.append(_answer_loss(m, X, Y).item())
                m.blocks[l].attn.head_mask = torch.ones(H, dtype=torch.float64)
                out[l, h] = (vals[0] - vals[1]) / (2 * eps)
    return out


@pytest.mark.exercise("prune_head_importance")
def test_importance_is_abs_gate_derivative_by_finite_differences():
    """Eq. 8 (|.| per example): for one prompt IS_h = |dL/dxi_h|, every head; the official
    per-token |.| is never smaller (triangle inequality: sum_t |.| >= |sum_t .|)."""
    cfg, tasks, m = tiny_model()
    X, Y = tasks.prompts("recall", 3, 1, torch.Generator().manual_seed(1))
    fd = _gate_derivatives_by_finite_differences(m, X, Y)
    imp_ex = npr.head_importance(m, X, Y, "cpu", 8, abs_per="example")
    imp_tok = npr.head_importance(m, X, Y, "cpu", 8, abs_per="token")
    assert imp_ex.shape == imp_tok.shape == (2, 3)
    assert np.abs(fd).min() > 1e-6
    np.testing.assert_allclose(imp_ex, np.abs(fd), rtol=1e-5, atol=1e-8)  # (the loss is fp32)
    assert np.all(imp_tok >= imp_ex - 1e-12) and np.any(imp_tok > imp_ex + 1e-9)
    # last layer: only the query position reaches the loss, so both placements of |.| agree
    np.testing.assert_allclose(imp_tok[-1], imp_ex[-1], rtol=1e-12)
    # two prompts: the mean of the per-prompt |dL/dxi_h| (not |mean of the derivatives|)
    X2, Y2 = tasks.prompts("recall", 3, 2, torch.Generator().manual_seed(4))
    fd2 = [_gate_derivatives_by_finite_differences(m, X2[i:i + 1], Y2[i:i + 1]) for i in range(2)]
    np.testing.assert_allclose(npr.head_importance(m, X2, Y2, "cpu", 8, abs_per="example"),
                               np.mean(np.abs(fd2), 0), rtol=1e-5, atol=1e-8)


@pytest.mark.exercise("prune_head_importance")
def test_importance_batching_is_a_mean_over_prompts():
    cfg, tasks, m = tiny_model()
    X, Y = tasks.prompts("copy", 2, 6, torch.Generator().manual_seed(3))
    one = np.mean([npr.head_importance(m, X[i:i + 1], Y[i:i + 1], "cpu", 1) for i in range(6)], 0)
    batched = npr.head_importance(m, X, Y, "cpu", 4)
    assert np.allclose(one, batched, rtol=1e-9)
    off = npr.head_importance(m, X, Y, "cpu", 4, imp_norm="official")
    T = X.shape[1]
    # the official code divides by all n*T tokens (the answer token counted too), last layer by n
    assert np.allclose(off[:-1], batched[:-1] / T) and np.allclose(off[-1], batched[-1])


@pytest.mark.exercise("prune_head_importance")
def test_importance_of_a_pruned_head_is_zero_and_model_left_clean():
    """A head gated to 0 has A_h = 0 after its gate: score 0 (the rest stay positive); and
    head_importance leaves no gradients and no stashed tensors behind."""
    cfg, tasks, m = tiny_model()
    X, Y = tasks.prompts("cluster", 2, 3, torch.Generator().manual_seed(5))
    hm = np.ones((2, 3))
    hm[1, 0] = 0
    m.set_masks(hm, None)
    imp = npr.head_importance(m, X, Y, "cpu", 2)
    assert imp[1, 0] == 0 and (np.delete(imp.ravel(), 3) > 0).all()
    assert all(p.grad is None for p in m.parameters())
    assert all(b.attn.y is None and not b.attn.explicit for b in m.blocks)


@pytest.mark.exercise("prune_head_importance")
def test_importance_snapshot():
    cfg, tasks, m = tiny_model()
    X, Y = tasks.prompts("recall", 2, 4, torch.Generator().manual_seed(6))
    for abs_per in ("token", "example"):
        snapshot("prune_head_importance", f"recall_2shot_abs_per_{abs_per}",
                 npr.head_importance(m, X, Y, "cpu", 3, abs_per=abs_per))


# ---- exercise prune_physical: slice the pruned heads out of W_Q/W_K/W_V and W_O ------------------
@pytest.mark.exercise("prune_physical")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_physical_pruning_equals_masking(seed):
    cfg, tasks, m = tiny_model(seed=seed, n_layer=3)
    rng = np.random.default_rng(seed)
    hm = (rng.random((3, 3)) < 0.5).astype(float)
    hm[seed % 3] = 0  # one layer loses every head
    fm = np.array([1.0, 0.0, 1.0]) if seed != 1 else np.array([0.0, 0.0, 1.0])
    idx = torch.randint(tasks.vocab_size, (2, 20))
    m.set_masks(hm, fm)
    masked = full_logits(m, idx)
    small = npr.physically_prune(m, cfg, hm, fm)
    assert small.num_params() < m.num_params()
    assert [b.attn.n_head if b.attn is not None else 0 for b in small.blocks] == list(hm.sum(1).astype(int))
    assert all((b.mlp is None) == (f == 0) for b, f in zip(small.blocks, fm))
    assert torch.allclose(full_logits(small, idx), masked, atol=1e-10)


@pytest.mark.exercise("prune_physical")
def test_physical_pruning_keeps_everything_when_nothing_is_pruned():
    cfg, tasks, m = tiny_model()
    small = npr.physically_prune(m, cfg, np.ones((2, 3)), np.ones(2))
    big_sd, small_sd = m.state_dict(), small.state_dict()
    assert list(small_sd) == list(big_sd)
    for name in big_sd:
        assert torch.equal(small_sd[name], big_sd[name]), name


@pytest.mark.exercise("prune_physical")
def test_physical_pruning_shapes_and_fractional_gates_kept():
    """Heads with gates in (0, 1) stay (with their gate); gate-0 heads go: the small model still
    equals the gated one. Weight shapes: c_attn (3 h d_h, C), c_proj (C, h d_h) for h kept heads."""
    cfg, tasks, m = tiny_model(n_layer=3)
    gates = np.array([[0.7, 0.0, 1.0], [0.0, 0.0, 0.4], [1.0, 0.2, 0.9]])
    idx = torch.randint(tasks.vocab_size, (2, 18))
    m.set_masks(gates, None)
    gated = full_logits(m, idx)
    small = npr.physically_prune(m, cfg, gates > 0, np.ones(3))
    C, hs = cfg.n_embd, m.head_size
    for blk, h in zip(small.blocks, (2, 1, 3)):
        assert blk.attn.n_head == h
        assert blk.attn.c_attn.weight.shape == (3 * h * hs, C)
        assert blk.attn.c_proj.weight.shape == (C, h * hs)
    assert small.blocks[1].attn.head_mask.tolist() == pytest.approx([0.4])
    assert torch.allclose(full_logits(small, idx), gated, atol=1e-10)


def test_ffn_gate_zero_skips_the_whole_sublayer():
    cfg, tasks, m = tiny_model()
    idx = torch.randint(tasks.vocab_size, (2, 12))
    m.set_masks(None, [0.0, 1.0])
    masked = full_logits(m, idx)
    m.set_masks(None, None)
    with torch.no_grad():  # zeroing W2 of layer 0 removes the FFN's contribution entirely
        m.blocks[0].mlp.c_proj.weight.zero_()
    assert torch.allclose(full_logits(m, idx), masked, atol=1e-12)


# ---- exercise prune_prefix_matching: induction_targets, the keys of Alg. 1 -------------------------
@pytest.mark.exercise("prune_prefix_matching")
def test_induction_targets_of_a_hand_written_sequence():
    #                   0  1  2  3  4  5  6  7  8
    ids = torch.tensor([[1, 2, 7, 8, 9, 7, 8, 7, 9]])
    P = npr.induction_targets(ids)
    assert P.shape == (1, 9, 9) and P.dtype == torch.bool
    expect = {5: [3], 6: [4], 7: [3, 6], 8: [5]}  # query j -> the keys right after ids[j]'s copies
    for j in range(9):
        assert P[0, j].nonzero().flatten().tolist() == expect.get(j, []), j
    # a token that follows itself: the key after the earlier copy is the query position itself
    P2 = npr.induction_targets(torch.tensor([[1, 2, 5, 5]]))
    assert P2[0, 3].nonzero().flatten().tolist() == [3] and not P2[0, 2].any()


@pytest.mark.exercise("prune_prefix_matching")
def test_prefix_matching_perfect_pattern_and_uniform():
    tasks = npr.ICLTasks(32, 8, 4, 0)
    L = 25
    ids = tasks.repeated_sequences(3, L, torch.Generator().manual_seed(0))  # [BOS][REP] s s s s
    n, T = ids.shape
    P = npr.induction_targets(ids)
    assert (P.sum(-1)[:, 2 + L:] == torch.arange(2 + L, T).sub(2).div(L, rounding_mode="floor")).all()
    assert not P.triu(1).any()  # never a key after the query
    att = torch.zeros(n, 2, T, T)
    att[:, :, 0, 0] = 1
    for j in range(1, T):
        if j >= 2 + L:  # head 0: perfect induction head -> the token after the previous copy of ids[j]
            att[:, 0, j, j - L + 1] = 1
        else:
            att[:, 0, j, 0] = 1
        att[:, 1, j, :j + 1] = 1.0 / (j + 1)  # head 1: uniform causal attention
    s = npr.prefix_matching_score(att, ids, 2 + L)
    assert s[0].item() == pytest.approx(1.0)
    assert s[1].item() < 0.06
    # a previous-token head and a duplicate-token head (the earlier copy itself) are not induction heads
    prev, dup = torch.zeros(n, 1, T, T), torch.zeros(n, 1, T, T)
    prev[:, 0, 0, 0] = dup[:, 0, :2 + L, 0] = 1
    for j in range(1, T):
        prev[:, 0, j, j - 1] = 1
    for j in range(2 + L, T):
        dup[:, 0, j, j - L] = 1
    assert npr.prefix_matching_score(prev, ids, 2 + L)[0].item() < 0.05
    assert npr.prefix_matching_score(dup, ids, 2 + L)[0].item() == 0.0


@pytest.mark.exercise("prune_prefix_matching")
def test_prefix_matching_snapshot():
    """The uniform-attention floor (the study's baseline) and a random pattern's score, L = 5."""
    tasks = npr.ICLTasks(16, 4, 2, 0)
    ids = tasks.repeated_sequences(2, 5, torch.Generator().manual_seed(0))  # (2, 22)
    T = ids.shape[1]
    uni = torch.ones(T, T, dtype=torch.float64).tril()
    uni = (uni / uni.sum(-1, keepdim=True)).expand(2, 1, T, T)
    torch.manual_seed(0)
    rnd = torch.randn(2, 2, T, T, dtype=torch.float64).masked_fill(
        torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    snapshot("prune_prefix_matching", "uniform_floor_L5", npr.prefix_matching_score(uni, ids, 7))
    snapshot("prune_prefix_matching", "random_attention_L5", npr.prefix_matching_score(rnd, ids, 7))


def test_copy_ratio_unit():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 3.0, 0.0]])
    r = npr.copy_ratio(logits, torch.tensor([0, 2, 1]))
    assert r.tolist() == pytest.approx([1.0, 0.0, 0.5])
    assert npr.copy_ratio(logits[:1], torch.tensor([-1])).item() == 0.0


def _copying_model(sign: float):
    """One layer, one head: one-hot embeddings, W_Q = W_K = 5 I (attend to self), OV = sign * I."""
    cfg = npr.Config(n_layer=1, n_head=1, n_embd=64, block_size=32, n_content=16, n_labels=4, n_clusters=2)
    tasks = npr.ICLTasks(16, 4, 2, 0)
    m = npr.GPT(cfg, tasks.vocab_size).double()
    C = cfg.n_embd
    with torch.no_grad():
        m.wte.weight.copy_(torch.eye(64, C))
        m.wpe.weight.zero_()
        eye = torch.eye(C, dtype=torch.float64)
        m.blocks[0].attn.c_attn.weight.copy_(torch.cat([5 * eye, 5 * eye, eye]))
        m.blocks[0].attn.c_proj.weight.copy_(sign * eye)
        m.blocks[0].mlp.c_proj.weight.zero_()
    return cfg, tasks, m


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_copying_scores_on_a_hand_built_copying_head(sign):
    cfg, tasks, m = _copying_model(sign)
    g = torch.Generator().manual_seed(0)
    uniq = torch.rand(4, tasks.N, generator=g).argsort(1)[:, :10] + tasks.C0
    ids = torch.cat([torch.tensor([tasks.BOS, tasks.REP]).expand(4, 2), uniq], 1)
    ols = npr.copying_score_olsson(m, ids, 2, "cpu")[0, 0]
    off = npr.copying_score_official(m, ids, "cpu")[0, 0]
    if sign > 0:
        assert ols > 0.95 and off > 0.95
    else:  # an anti-copying head lowers the attended token
        assert ols < 0.05 and off < 0.05


@pytest.mark.parametrize("k", [0, 1, 5])
def test_task_answers_follow_from_the_demonstrations(k):
    tasks = npr.ICLTasks(24, 8, 4, 0)
    g = torch.Generator().manual_seed(k)
    n = 200
    for t in npr.TASKS:
        X, Y = tasks.prompts(t, k, n, g)
        assert X.shape == (n, 3 + 2 * k)
        assert (X[:, 0] == tasks.BOS).all() and (X[:, 1] == tasks.template[t]).all()
        assert torch.isin(Y, tasks.candidates(t)).all()
        xs, ys, xq = X[:, 2:-1:2], X[:, 3::2], X[:, -1]
        c = tasks.C0
        if t == "copy":
            assert (Y == xq).all() and (ys == xs).all()
        elif t == "succ":
            assert (Y - c == (xq - c + 1) % tasks.N).all() and (ys - c == (xs - c + 1) % tasks.N).all()
        elif t == "recall" and k > 0:
            for i in range(n):
                pos = (xs[i] == xq[i]).nonzero().flatten()
                assert len(pos) == 1 and ys[i, pos[0]] == Y[i]  # the query key is a demo key; its value
                assert len(set(xs[i].tolist())) == k  # distinct demo keys
        elif t == "cluster" and k > 0:
            cl = tasks.cluster_of
            for i in range(n):
                same = cl[xs[i] - c] == cl[xq[i] - c]
                assert same.any() and (ys[i][same] == Y[i]).all()  # query's cluster shown with its label
                assert xq[i] not in xs[i]  # a new token: literal copying cannot solve it
                # the label map is a bijection within the episode
                for a in range(k):
                    for b in range(k):
                        assert (cl[xs[i, a] - c] == cl[xs[i, b] - c]) == (ys[i, a] == ys[i, b])


def test_training_rows_targets():
    tasks = npr.ICLTasks(24, 8, 4, 0)
    g = torch.Generator().manual_seed(0)
    for t in npr.TASKS:
        x, y = tasks.train_rows(t, 16, 32, g)
        assert x.shape == y.shape == (16, 32)
        on = y != -100
        assert on.any() and on[:, 1::2].sum() == 0 and on[:, 0].sum() == 0  # targets only at x_i inputs
        assert torch.isin(y[on], tasks.candidates(t)).all()
    x, y = tasks.repeat_rows(16, 32, g)
    on = y != -100
    for i in range(16):  # every target repeats an earlier token of the row
        for j in on[i].nonzero().flatten():
            assert y[i, j] in x[i, 2:j + 1]


# ---- exercise prune_spearman: Spearman rank correlation (Sec. 6.1, Fig. 8, Table 1) ---------------
@pytest.mark.exercise("prune_spearman")
def test_spearman_monotone_reversed_symmetric_constant():
    rng = np.random.default_rng(0)
    x = rng.random(20)
    assert npr.spearman(x, x ** 3) == pytest.approx(1.0)  # any increasing map: 1
    assert npr.spearman(x, np.exp(-x)) == pytest.approx(-1.0)  # decreasing: -1
    y = rng.normal(size=20)
    assert npr.spearman(x, y) == pytest.approx(npr.spearman(y, x), abs=1e-15)
    assert npr.spearman(x, y) == pytest.approx(npr.spearman(np.log(x), 5 * y + 1), abs=1e-12)
    assert npr.spearman(x.reshape(4, 5), y.reshape(4, 5)) == pytest.approx(npr.spearman(x, y))
    assert -1 <= npr.spearman(x, y) <= 1 and isinstance(npr.spearman(x, y), float)
    assert math.isnan(npr.spearman(np.ones(5), np.arange(5)))  # a constant side: no ranking


@pytest.mark.exercise("prune_spearman")
def test_spearman_ties_take_their_average_rank():
    """Hand-computed: ranks [0.5, 0.5, 2] vs [0, 1.5, 1.5] -> 0.75 / 1.5 = 0.5."""
    assert npr.spearman([0, 0, 1], [0, 1, 1]) == pytest.approx(0.5)
    assert npr.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert npr.spearman([5, 1, 5], [2, 0, 2]) == pytest.approx(1.0)  # same ties, same order
    # ties kept by a strictly increasing map: the same value (ties handled by value, not position)
    a = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    b = np.array([2, 7, 1, 8, 2, 8, 1, 8, 2, 8])
    assert npr.spearman(a, b) == pytest.approx(npr.spearman(a ** 2 + 1, np.sqrt(b)), abs=1e-12)
    assert npr.spearman(a, b) == pytest.approx(npr.spearman(a[::-1], b[::-1]), abs=1e-12)


@pytest.mark.exercise("prune_spearman")
def test_spearman_snapshot():
    a = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    b = [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]
    c = [0.5, 0.25, 0.125, 1.0, 2.0, 0.5, 4.0, 0.0, 0.75, 3.0]
    snapshot("prune_spearman", "ab_ac_bc", [npr.spearman(a, b), npr.spearman(a, c),
                                            npr.spearman(b, c)])


def test_topk_overlap():
    x = np.random.default_rng(0).random(20)
    assert npr.topk_overlap(x, x, 0.3) == 1.0 and npr.topk_overlap(x, -x, 0.3) == 0.0


def test_orders_masks_and_capacity():
    imp = np.array([[3.0, 1.0], [2.0, 4.0]])
    o = npr.order_heads(imp)
    assert o.tolist() == [1, 2, 0, 3]
    assert npr.prune_mask(o, 2, (2, 2)).tolist() == [[1, 0], [0, 1]]
    assert npr.prune_mask([2, 0], 1, 3).tolist() == [1, 1, 0]
    cap = npr.retained_capacity(imp, o)
    assert cap.tolist() == pytest.approx([1.0, 0.9, 0.7, 0.4, 0.0])
    assert npr.aggregate([imp, 2 * imp], "sum1") == pytest.approx(imp / imp.sum())


def _run(argv):
    npr.main(argv)


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    for argv in (["--n_embd", "30", "--n_head", "4"], ["--skip_train", "--ckpt", str(tmp_path / "nope.pt")],
                 ["--block_size", "8"], ["--shots", "0,x"], ["--resume"], ["--abs_per", "row"],
                 ["--n_layer", "two"]):
        with pytest.raises(SystemExit) as e:
            _run(argv + ["--out_dir", str(out), "--device", "cpu"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nano_prune.py: error:"), err
        assert not out.exists()


SMOKE = ["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--block_size", "24",
         "--n_content", "16", "--batch_size", "8", "--eval_iters", "1", "--warmup_iters", "2"]


def test_resume_continues_exactly(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = SMOKE + ["--max_iters", "6", "--eval_interval", "2", "--no-analysis"]
    _run(common + ["--out_dir", a])
    _run(common + ["--out_dir", b, "--stop_at", "3"])
    _run(common + ["--out_dir", b, "--resume"])
    ca = torch.load(os.path.join(a, "ckpt.pt"), weights_only=False)
    cb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=False)
    assert ca["step"] == cb["step"] == 6
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    la = open(os.path.join(a, "log.csv")).read().splitlines()
    lb = open(os.path.join(b, "log.csv")).read().splitlines()
    assert la[-1].split(",")[4:6] == lb[-1].split(",")[4:6]  # train_loss, val_loss at step 6


def test_smoke_main_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    _run(SMOKE + ["--max_iters", "4", "--eval_interval", "2", "--out_dir", out, "--n_eval", "16",
                  "--n_imp", "8", "--n_dev", "8", "--n_random", "1", "--n_prefix_seq", "3", "--speed_batch", "2"])
    res = json.load(open(os.path.join(out, "results.json")))
    for key in ("train_loss", "val_loss", "val_ppl", "tokens_per_s", "params", "elapsed_s"):
        assert key in res["final"]
    assert res["script"] == "nano_prune.py"
    assert np.array(res["head_importance"]["5"]["recall"]).shape == (2, 2)
    assert len(res["head_pruning"]["curves"]["copy/1"]["task"]) == 10
    assert all(p["max_abs_logit_diff"] < 1e-4 for p in res["physical_pruning"])
    assert set(res["transfer_pruning"]["acc"]["recall/5"]) == set(npr.TASKS) | {"aggregate"}
    for f in ("config.json", "log.csv", "ckpt.pt", "importance.png", "head_pruning.png", "ffn.png", "grid.png",
              "spearman.png", "induction.png", "transfer.png"):
        assert os.path.exists(os.path.join(out, f)), f
    # analyse the saved checkpoint again without training
    out2 = str(tmp_path / "again")
    _run(["--skip_train", "--ckpt", os.path.join(out, "ckpt.pt"), "--out_dir", out2, "--device", "cpu",
          "--no-analysis"])
    assert json.load(open(os.path.join(out2, "results.json")))["final"]["params"] == res["final"]["params"]


# --- bad input specific to nano_prune: one line, exit 2, nothing written (with tests/test_cli.py's
# common table, nano_prune gets well over 20 cases)
TINY = ["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--batch_size",
        "4", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--no-progress"]
BAD = [
    ("text_frac above 1", ["--dataset", "pycode", "--text_frac", "2"]),
    ("text_frac + rep_frac_early >= 1", ["--dataset", "pycode", "--text_frac", "0.5"]),
    ("rep_frac negative", ["--rep_frac", "-0.1"]),
    ("rep_frac_early 1", ["--rep_frac_early", "1"]),
    ("rep_early above 1", ["--rep_early", "2"]),
    ("shots negative", ["--shots", "-1"]),
    ("shots not integers", ["--shots", "0,x"]),
    ("shots too long for the context", ["--shots", "40"]),
    ("n_random zero", ["--n_random", "0"]),
    ("speed_batch zero", ["--speed_batch", "0"]),
    ("n_content too small", ["--n_content", "4"]),
    ("n_labels below n_clusters", ["--n_labels", "2"]),
    ("n_eval zero", ["--n_eval", "0"]),
    ("prefix_len zero", ["--prefix_len", "0"]),
    ("dropout 1", ["--dropout", "1"]),
    ("task_seed negative", ["--task_seed", "-1"]),
    ("unknown abs_per", ["--abs_per", "row"]),
    ("unknown imp_norm", ["--imp_norm", "nope"]),
    ("unknown copy_impl", ["--copy_impl", "nope"]),
    ("unknown compare item", ["--compare", "nope"]),
    ("bad compare value", ["--compare", "abs_per=row"]),
    ("bench not a number", ["--bench", "x"]),
    ("bench above 100", ["--bench", "150"]),
    ("bench too many ffns", ["--bench", "50:9"]),
    ("skip_train and resume", ["--skip_train", "--resume"]),
    ("skip_train without a checkpoint", ["--skip_train", "--ckpt", "{tmp}/nope.pt"]),
    ("unknown dataset", ["--dataset", "nope"]),
]


def _main(argv, capsys):
    try:
        npr.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _files(path):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("case,extra", BAD, ids=[c for c, _ in BAD])
def test_bad_input_table(case, extra, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in TINY + extra]
    code, out, err = _main(argv + ["--out_dir", str(tmp_path / "o")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("nano_prune.py: error:"), err
    assert "Traceback" not in out + err
    assert _files(tmp_path) == []


@pytest.mark.parametrize("dataset", ["none", "shakespeare", "pycode", "pycode_all", "{text}"])
def test_every_documented_dataset_trains(dataset, tiny_text, tmp_path, capsys):
    """--dataset shakespeare used to fail on its own defaults (rep_frac_early + text_frac = 1)."""
    out = tmp_path / "run"
    code, _, err = _main(TINY + ["--no-analysis", "--block_size", "24", "--out_dir", str(out),
                                 "--dataset", dataset.replace("{text}", tiny_text)], capsys)
    assert code == 0, err
    res = json.load(open(out / "results.json"))
    assert math.isfinite(res["final"]["val_loss"])


def test_dev_and_importance_prompts_kept_apart_from_eval(capsys):
    """Audit fix (b): the FFN oracle's dev prompts (and the importance prompts) share no prompt
    with the eval prompts where the prompt space allows; where it does not, a note says so."""
    cfg = tiny_cfg(n_eval=300, n_imp=64, n_dev=200, shots="0,1", seed=3)
    tasks = npr.ICLTasks(cfg.n_content, cfg.n_labels, cfg.n_clusters, cfg.task_seed)
    sets, shared = npr.prompt_sets(tasks, cfg, [0, 1])
    rows = {key: {s: {r.tobytes() for r in v[0].numpy()} for s, v in d.items()}
            for key, d in sets.items()}
    for t in npr.TASKS:
        assert rows[t, 1]["dev"].isdisjoint(rows[t, 1]["eval"]), t
        assert rows[t, 1]["imp"].isdisjoint(rows[t, 1]["eval"]), t
        assert len(sets[t, 1]["dev"][0]) == cfg.n_dev  # topped up to the full size
        assert f"{t}/0" in shared and f"{t}/1" not in shared  # 16 content tokens: 0-shot overlaps
    assert "note:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    npr.main(TINY + ["--max_iters", "4", "--no-analysis", "--out_dir", str(out)])
    return out / "ckpt.pt"


def test_bench_and_compare_run_alone_on_a_checkpoint(trained, tmp_path, capsys):
    small = ["--skip_train", "--ckpt", str(trained), "--device", "cpu", "--n_eval", "16",
             "--n_imp", "8", "--n_dev", "8", "--speed_batch", "2", "--no-progress"]
    _main(small + ["--bench", "50,75:1", "--out_dir", str(tmp_path / "b")], capsys)
    res = json.load(open(tmp_path / "b" / "results.json"))
    assert [(r["heads_pruned_pct"], r["ffns_pruned"]) for r in res["bench"]] == [(50, 0), (75, 1)]
    assert all(r["max_abs_logit_diff"] < 1e-4 and r["speedup_measured"] > 0 for r in res["bench"])
    assert "head_pruning" not in res and not any(f.endswith(".png") for f in _files(tmp_path))
    _main(small + ["--compare", "abs_per=example,layer_norm_imp", "--out_dir", str(tmp_path / "c")],
          capsys)
    cmp = json.load(open(tmp_path / "c" / "results.json"))["compare"]
    assert list(cmp) == ["default", "abs_per=example", "layer_norm_imp=True"]
    assert cmp["default"]["5"]["spearman_vs_default"] == 1.0


def test_non_finite_checkpoint_is_not_analysed(trained, tmp_path, capsys):
    ck = torch.load(trained, weights_only=False)
    ck["model"]["wte.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(ck, bad)
    code, out, err = _main(["--skip_train", "--ckpt", str(bad), "--device", "cpu",
                            "--out_dir", str(tmp_path / "o")], capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1 and "non-finite" in err
    assert not os.path.exists(tmp_path / "o" / "results.json")


def test_divergence_stops_before_the_analysis(tmp_path, capsys, monkeypatch):
    real = F.cross_entropy

    def nan_from_step_3(*a, **k):
        loss = real(*a, **k)
        nan_from_step_3.n += torch.is_grad_enabled()
        return loss * float("nan") if nan_from_step_3.n >= 3 else loss
    nan_from_step_3.n = 0
    monkeypatch.setattr(F, "cross_entropy", nan_from_step_3)
    out = tmp_path / "run"
    code, _, err = _main(TINY + ["--max_iters", "4", "--out_dir", str(out)], capsys)
    assert code == 3 and "step 3: loss is not finite" in err and "(step 2)" in err
    assert not any(f.endswith((".png", "results.json")) for f in _files(out))
