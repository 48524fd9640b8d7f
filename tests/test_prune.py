"""Tests for nano_prune.py (CPU, well under a minute): run `python -m pytest -q tests/test_prune.py`."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nano_prune as npr

torch.set_num_threads(1)


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
    """Plain transformer forward written out with loops over heads, no gates, no fused kernels."""
    B, T = idx.shape
    x = m.wte.weight[idx] + m.wpe.weight[:T]
    for blk in m.blocks:
        a = blk.attn
        h = F.layer_norm(x, (x.shape[-1],), blk.ln_1.weight, blk.ln_1.bias)
        qkv = h @ a.c_attn.weight.T
        H, hs = a.n_head, a.head_size
        outs = []
        for i in range(H):
            q = qkv[..., i * hs:(i + 1) * hs]
            k = qkv[..., H * hs + i * hs:H * hs + (i + 1) * hs]
            v = qkv[..., 2 * H * hs + i * hs:2 * H * hs + (i + 1) * hs]
            s = q @ k.transpose(-1, -2) / math.sqrt(hs)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            outs.append(torch.softmax(s, -1) @ v)
        x = x + torch.cat(outs, -1) @ a.c_proj.weight.T
        h = F.layer_norm(x, (x.shape[-1],), blk.ln_2.weight, blk.ln_2.bias)
        x = x + F.gelu(h @ blk.mlp.c_fc.weight.T) @ blk.mlp.c_proj.weight.T
    x = F.layer_norm(x, (x.shape[-1],), m.ln_f.weight, m.ln_f.bias)
    return x @ m.lm_head.weight.T


def full_logits(m, idx):
    B, T = idx.shape
    tgt = torch.zeros(B, T, dtype=torch.long)
    return m(idx, tgt)[0]


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
    # and a gate of 0.5 is not the same function (the gates are live)
    m.blocks[0].attn.head_mask[1] = 0.5
    assert not torch.allclose(full_logits(m, idx), ref, atol=1e-4)


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


def _answer_loss(m, X, Y):
    logits, _ = m(X)
    return F.cross_entropy(logits[:, -1, :], Y, reduction="sum")


def test_gate_gradient_is_finite_difference_and_inner_product():
    cfg, tasks, m = tiny_model()
    X, Y = tasks.prompts("recall", 3, 1, torch.Generator().manual_seed(1))
    l, h = 1, 2
    attn = m.blocks[l].attn
    gate = torch.ones(cfg.n_head, dtype=torch.float64, requires_grad=True)
    attn.head_mask = gate
    m.set_analysis(explicit=True, keep=True)
    loss = _answer_loss(m, X, Y)
    loss.backward()
    g_auto = gate.grad[h].item()
    # <A_h, dL/dA_h>, summed over tokens and d_h (A_h stashed after the gate; gate = 1)
    inner = (attn.y[:, h] * attn.y.grad[:, h]).sum().item()
    # central finite difference in the gate
    eps = 1e-6
    with torch.no_grad():
        vals = []
        for s in (+1, -1):
            gg = torch.ones(cfg.n_head, dtype=torch.float64)
            gg[h] += s * eps
            attn.head_mask = gg
            vals.append(_answer_loss(m, X, Y).item())
    fd = (vals[0] - vals[1]) / (2 * eps)
    assert abs(g_auto) > 1e-6
    assert g_auto == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert g_auto == pytest.approx(inner, rel=1e-9, abs=1e-12)
    # and the importance function's per-example score is |dL/dxi_h| for one prompt
    m.set_analysis(explicit=False, keep=False)
    attn.head_mask = torch.ones(cfg.n_head, dtype=torch.float64)
    imp_ex = npr.head_importance(m, X, Y, "cpu", 8, abs_per="example")
    imp_tok = npr.head_importance(m, X, Y, "cpu", 8, abs_per="token")
    assert imp_ex[l, h] == pytest.approx(abs(g_auto), rel=1e-6)
    assert np.all(imp_tok >= imp_ex - 1e-12)  # triangle inequality: sum |.| >= |sum .|


def test_gradcheck_through_the_gates():
    cfg, tasks, m = tiny_model()
    X, Y = tasks.prompts("cluster", 2, 2, torch.Generator().manual_seed(2))
    m.set_analysis(explicit=True)

    def f(g0, g1):
        m.blocks[0].attn.head_mask = g0
        m.blocks[1].attn.head_mask = g1
        return _answer_loss(m, X, Y)
    gates = (torch.rand(3, dtype=torch.float64, requires_grad=True),
             torch.rand(3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(f, gates)


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


def test_masking_a_head_equals_deleting_its_slice_of_W_O():
    cfg, tasks, m = tiny_model()
    idx = torch.randint(tasks.vocab_size, (2, 16))
    hs = m.head_size
    hm = np.ones((2, 3))
    hm[0, 1] = 0
    m.set_masks(hm, None)
    masked = full_logits(m, idx)
    m.set_masks(None, None)
    with torch.no_grad():
        m.blocks[0].attn.c_proj.weight[:, 1 * hs:2 * hs] = 0
    assert torch.allclose(full_logits(m, idx), masked, atol=1e-12)


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


def test_ffn_gate_zero_skips_the_whole_sublayer():
    cfg, tasks, m = tiny_model()
    idx = torch.randint(tasks.vocab_size, (2, 12))
    m.set_masks(None, [0.0, 1.0])
    masked = full_logits(m, idx)
    m.set_masks(None, None)
    with torch.no_grad():  # zeroing W2 of layer 0 removes the FFN's contribution entirely
        m.blocks[0].mlp.c_proj.weight.zero_()
    assert torch.allclose(full_logits(m, idx), masked, atol=1e-12)


def test_prefix_matching_perfect_pattern_and_uniform():
    tasks = npr.ICLTasks(32, 8, 4, 0)
    L = 25
    ids = tasks.repeated_sequences(3, L, torch.Generator().manual_seed(0))  # [BOS][REP] s s s s
    n, T = ids.shape
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
    # a previous-token head is not an induction head
    prev = torch.zeros(n, 1, T, T)
    prev[:, 0, 0, 0] = 1
    for j in range(1, T):
        prev[:, 0, j, j - 1] = 1
    assert npr.prefix_matching_score(prev, ids, 2 + L)[0].item() < 0.05


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


def test_spearman_against_plain_reference():
    def ref(a, b):
        def ranks(v):
            return [sum(w < x for w in v) + (sum(w == x for w in v) - 1) / 2 for x in v]
        ra, rb = ranks(list(a)), ranks(list(b))
        ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
        num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
        return num / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 6, 30).astype(float)  # with ties
        b = a + rng.normal(0, 2, 30)
        assert npr.spearman(a, b) == pytest.approx(ref(a, b), abs=1e-12)
    x = rng.random(20)
    assert npr.spearman(x, x ** 3) == pytest.approx(1.0)
    assert npr.spearman(x, -x) == pytest.approx(-1.0)
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
    ("topk_frac zero", ["--topk_frac", "0"]),
    ("grid_max_heads above 100", ["--grid_max_heads", "101"]),
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
    assert code == 3 and "step 3: loss is nan" in err and "(step 2)" in err
    assert not any(f.endswith((".png", "results.json")) for f in _files(out))
