"""CPU tests for nano_sffn.py (run: python -m pytest -q tests/test_sffn.py)."""
import csv
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from torch.func import functional_call

from snapshot import snapshot

import nano_sffn as S

MASKED, GROUPED, AVGK, SWITCH, PKM = (pytest.mark.exercise("sffn_" + e)
                                      for e in ("masked", "grouped", "avgk", "switch", "pkm"))


SPARSE = ("avgk", "vanillam", "switch", "topk", "base", "hash", "pkm")


def layer_cfg(selector, g=4, d=8, d_m=16, d_ff=8, impl="masked", **kw):
    """A tiny config for one FFN layer (switch: one block of c cells)."""
    if selector == "switch":
        d_ff = g
    cfg = S.Config(selector=selector, n_embd=d, n_head=2, n_layer=2, d_ff=d_ff, d_m=d_m, g=g, impl=impl,
                   pkm_heads=2, pkm_knn=2, pkm_dq=4, **kw)
    return S.validate(cfg)


def make_layer(selector, dtype=torch.float64, vocab=11, **kw):
    cfg = layer_cfg(selector, **kw)
    layer = S.ProductKeyMemory(cfg) if selector == "pkm" else S.SparseFFN(cfg, vocab)
    return layer.to(dtype), cfg


def expected_params(selector):
    return {"avgk": {"K", "V"}, "vanillam": {"K", "V"}, "hash": {"K", "V"}, "switch": {"K", "V", "W_g"},
            "topk": {"K", "V", "W_g"}, "base": {"K", "V", "C"},
            "pkm": {"W_q.weight", "bn.weight", "bn.bias", "subkeys", "V"}}[selector]


# ----------------------------------------------------------------------------- model level
@pytest.mark.parametrize("selector", S.SELECTORS)
def test_model_shapes_loss_and_gradients(selector):
    torch.manual_seed(0)
    cfg = S.validate(S.Config(selector=selector, n_layer=2, n_head=2, n_embd=16, block_size=8, d_ff=16,
                                     d_m=64, g=16 if selector == "switch" else 4, sffn_every=1,
                                     pkm_heads=2, pkm_knn=4, pkm_dq=8))
    model = S.GPT(cfg, 64)
    idx = torch.randint(0, 50, (3, 8))
    logits, ce, aux = model(idx, idx)
    assert logits.shape == (3, 8, 64)
    assert torch.isfinite(ce) and torch.isfinite(aux)
    (ce + aux).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{selector}: no gradient reaches {name}"
    for _, layer in model.sparse_layers():
        assert {n for n, _ in layer.named_parameters()} == expected_params(selector)
    if selector in ("switch", "topk"):
        assert aux > 0
    else:
        assert aux == 0
    logits, _, _ = model(idx)
    assert logits.shape == (3, 1, 64)


@pytest.mark.parametrize("selector", [pytest.param("avgk", marks=AVGK), "hash", "vanillam"])
def test_no_gradient_through_selection(selector):
    """Avg-K block embeddings (mean keys) get no gradient: the layer's grads equal those of the compute
    with the selection detached, and keys/values of blocks no token chose get exactly zero."""
    torch.manual_seed(1)
    layer, cfg = make_layer(selector, d_m=32, g=4)
    x = torch.randn(3, 8, dtype=torch.float64)
    idx = torch.randint(0, 11, (3,))
    y, _ = layer(x, idx)
    gy = torch.randn_like(y)
    gK, gV = torch.autograd.grad(y, (layer.K, layer.V), gy)
    ids = layer.route(x, idx)[0].detach()
    y2 = layer.compute_masked(x, ids, None)
    gK2, gV2 = torch.autograd.grad(y2, (layer.K, layer.V), gy)
    torch.testing.assert_close(gK, gK2, rtol=0, atol=1e-12)
    torch.testing.assert_close(gV, gV2, rtol=0, atol=1e-12)
    unused = sorted(set(range(layer.B)) - set(ids.flatten().tolist()))
    assert unused, "test needs a block nobody selected"
    for beta in unused:
        assert gK[beta * layer.g:(beta + 1) * layer.g].abs().max() == 0
        assert gV[beta * layer.g:(beta + 1) * layer.g].abs().max() == 0


# ----------------------------------------------------------------------------- gradcheck with the selection held fixed
IMPLS = [pytest.param("masked", marks=MASKED), pytest.param("grouped", marks=GROUPED)]


def graded(selector, impl):
    """The exercises a (selector, impl) case grades: the compute path (PKM has its own), the gate."""
    marks = [] if selector == "pkm" else [dict(masked=MASKED, grouped=GROUPED)[impl]]
    return pytest.param(selector, impl, marks=marks + ([SWITCH] if selector in ("switch", "topk") else []),
                        id=f"{selector}-{impl}")


@pytest.mark.parametrize("selector,impl", [graded(s, i) for s in SPARSE + ("avgk_softmax",)
                                           for i in ("masked", "grouped")])
def test_gradcheck_fixed_selection(selector, impl):
    torch.manual_seed(2)
    extra = {}
    if selector == "avgk_softmax":
        selector, extra = "avgk", dict(avgk_weight="softmax")
    layer, cfg = make_layer(selector, impl=impl, **extra)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 11, (5,))
    with torch.no_grad():
        ids = layer.route(x, idx)[0]
    # Avg-K's softmax weights use e = mean(K) under stop-gradient (Avg-K's definition): K is held fixed there
    names = [n for n, _ in layer.named_parameters() if not (extra and n == "K")]
    params = [layer.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def f(x, *ps):
        y, aux = functional_call(layer, dict(zip(names, ps)), (x, idx), dict(ids=ids), strict=False)
        return y, aux.reshape(1)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


# ----------------------------------------------------------------------------- equivalences
@AVGK
@pytest.mark.parametrize("impl", IMPLS)
def test_avgk_all_blocks_equals_dense(impl):
    torch.manual_seed(3)
    layer, cfg = make_layer("avgk", impl=impl, d_m=16, d_ff=16, g=4)     # b = B = 4: every block on
    assert cfg.b == layer.B
    dense = S.DenseFFN(8, 16, "gelu", 2).double()
    with torch.no_grad():
        dense.K.copy_(layer.K), dense.V.copy_(layer.V)
    x = torch.randn(6, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], dense(x)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("selector,g", [pytest.param(s, g, marks=GROUPED) for s in SPARSE if s != "pkm"
                                        for g in (1, 4, 8)] + [("pkm", 1)])
def test_grouped_equals_masked(selector, g, dtype):
    """float32 uses torch's grouped GEMM where it exists; float64 the loop fallback. PKM has g = 1 by definition."""
    torch.manual_seed(4)
    kw = dict(g=g, d_m=32, d_ff=8) if selector != "switch" else dict(g=g, d_m=32)
    if selector == "pkm":
        kw = dict(d_m=36)
    m, _ = make_layer(selector, dtype=dtype, impl="masked", **kw)
    gl, _ = make_layer(selector, dtype=dtype, impl="grouped", **kw)
    gl.load_state_dict(m.state_dict())
    x = torch.randn(7, 8, dtype=dtype, requires_grad=True)
    idx = torch.randint(0, 11, (7,))
    ym, am = m(x, idx)
    yg, ag = gl(x, idx)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(yg, ym, **tol)
    gy = torch.randn_like(ym)
    grads_m = torch.autograd.grad(ym, [x, *m.parameters()], gy)
    grads_g = torch.autograd.grad(yg, [x, *gl.parameters()], gy)
    for a, b in zip(grads_g, grads_m):
        torch.testing.assert_close(a, b, **tol)


def test_grouped_mm_native_matches_loop():
    torch.manual_seed(5)
    a, w = torch.randn(10, 8), torch.randn(3, 8, 16)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)                   # an empty group in the middle
    ref = torch.cat([a[:3] @ w[0], a[3:] @ w[2]])
    torch.testing.assert_close(S.grouped_mm_loop(a, w, offs), ref)
    torch.testing.assert_close(S.grouped_mm(a, w, offs), ref, rtol=1e-5, atol=1e-5)


def test_vanillam_pre_mean_selects_like_avgk():
    torch.manual_seed(6)
    av, _ = make_layer("avgk", d_m=64, g=8, d_ff=16)
    vm, _ = make_layer("vanillam", d_m=64, g=8, d_ff=16, vanillam_agg="pre_mean")
    vm.load_state_dict(av.state_dict())
    x = torch.randn(50, 8, dtype=torch.float64)
    ia = av.route(x)[0].sort(-1).values
    iv = vm.route(x)[0].sort(-1).values
    assert torch.equal(ia, iv)
    torch.testing.assert_close(av(x)[0], vm(x)[0])


def test_hash_depends_only_on_token_ids():
    torch.manual_seed(7)
    layer, cfg = make_layer("hash", d_m=32, g=4, d_ff=8, vocab=20)
    idx = torch.randint(0, 20, (30,))
    i1 = layer.route(torch.randn(30, 8, dtype=torch.float64), idx)[0]
    i2 = layer.route(torch.randn(30, 8, dtype=torch.float64), idx)[0]
    assert torch.equal(i1, i2) and torch.equal(i1, layer.hash_table[idx])
    assert (i1.sort(-1).values.diff(dim=-1) > 0).all()                   # b distinct blocks per token
    same = [torch.equal(i1[a], i1[b]) for a in range(30) for b in range(30) if idx[a] == idx[b]]
    assert all(same)
    layer2, _ = make_layer("hash", d_m=32, g=4, d_ff=8, vocab=20)        # fixed, seeded table
    assert torch.equal(layer.hash_table, layer2.hash_table)
    layer3, _ = make_layer("hash", d_m=32, g=4, d_ff=8, vocab=20, hash_seed=99)
    assert not torch.equal(layer.hash_table, layer3.hash_table)


@SWITCH
def test_switch_aux_loss_and_capacity_by_hand():
    torch.manual_seed(8)
    layer, cfg = make_layer("switch", d=4, d_m=16, g=4, aux_alpha=0.01)  # B = 4 blocks
    tokens = [0, 0, 2, 3]
    x = torch.eye(4, dtype=torch.float64)[tokens]                         # logits = 3 * one-hot(token)
    with torch.no_grad():
        layer.W_g.copy_(3 * torch.eye(4))
    ids, w, aux, _ = layer.route(x)
    # hand computation: p(one-hot at e) = e^3/(e^3+3) on e, 1/(e^3+3) elsewhere
    hi, lo = math.exp(3) / (math.exp(3) + 3), 1 / (math.exp(3) + 3)
    f = [2 / 4, 0, 1 / 4, 1 / 4]
    P = [(2 * hi + 2 * lo) / 4, (4 * lo) / 4, (hi + 3 * lo) / 4, (hi + 3 * lo) / 4]
    expect = 0.01 * 4 * sum(fe * pe for fe, pe in zip(f, P))
    assert ids.flatten().tolist() == tokens
    torch.testing.assert_close(w.flatten(), torch.full((4,), hi, dtype=w.dtype))
    assert abs(aux.item() - expect) < 1e-12
    # capacity factor 1: C = ceil(1 * 4 / 4) = 1 -> the second token of block 0 is dropped (training only)
    layer.cf = 1.0
    layer.train()
    _, w, _, _ = layer.route(x)
    assert w.flatten().tolist() == pytest.approx([hi, 0.0, hi, hi])
    layer.eval()
    assert layer.route(x)[1].flatten().tolist() == pytest.approx([hi] * 4)


@SWITCH
def test_topk_weights_renormalized():
    torch.manual_seed(9)
    layer, cfg = make_layer("topk", d_m=32, g=4, d_ff=12)                # b = 3
    ids, w, aux, _ = layer.route(torch.randn(10, 8, dtype=torch.float64))
    assert ids.shape == (10, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(10, dtype=w.dtype))


def test_base_training_assignment_is_balanced():
    torch.manual_seed(10)
    layer, cfg = make_layer("base", d_m=32, g=4, d_ff=4, base_iters=50)  # B = 8, b = 1
    with torch.no_grad():
        layer.C[0] += 3.0                                                # skewed: greedy sends everyone to block 0
    x = torch.randn(64, 8, dtype=torch.float64) + 1.0
    layer.eval()
    greedy = torch.bincount(layer.route(x)[0].flatten(), minlength=8)
    layer.train()
    bal = torch.bincount(layer.route(x)[0].flatten(), minlength=8)
    assert greedy.max() > 32
    assert bal.max() <= 2 * 64 / 8 and (bal > 0).all()



def test_base_eval_agreement_diagnostic():
    """routing_health's 'agree' = share of greedy eval choices the balanced training plan makes too:
    about 1 when greedy is already balanced, low when greedy sends every token to one block."""
    torch.manual_seed(12)
    layer, cfg = make_layer("base", d_m=32, g=4, d_ff=4, base_iters=50)  # B = 8, b = 1
    x = torch.randn(64, 8, dtype=torch.float64)
    with torch.no_grad():  # block e's centroid = one direction, tokens along it: greedy = balanced
        layer.C.copy_(torch.eye(8, dtype=torch.float64) * 5)
    x = 5 * torch.eye(8, dtype=torch.float64).repeat(8, 1) + 0.1 * x
    layer.eval()
    layer.track = True
    layer(x)
    assert S.routing_health(layer)["agree"] == 1.0
    with torch.no_grad():
        layer.C[0] += 30.0                                               # greedy: all to block 0
    layer.track = True
    layer(x)
    h = S.routing_health(layer)
    assert h["maxload"] == 8.0 and h["agree"] <= 2 / 8
    assert layer.agree == [] and not layer.track                        # reset with the eval


def test_base_eval_balanced_routes_as_in_training():
    torch.manual_seed(13)
    layer, cfg = make_layer("base", d_m=32, g=4, d_ff=8, base_iters=20, base_eval="balanced")
    with torch.no_grad():
        layer.C[0] += 3.0                                                # greedy would pick block 0
    x = torch.randn(64, 8, dtype=torch.float64) + 1.0
    layer.train()
    train_ids = layer.route(x)[0]
    layer.eval()
    assert torch.equal(layer.route(x)[0], train_ids)
    layer.base_eval = "greedy"
    assert not torch.equal(layer.route(x)[0], train_ids)


@PKM
def test_pkm_topk_equals_brute_force():
    torch.manual_seed(11)
    cfg = S.validate(S.Config(selector="pkm", n_embd=16, n_layer=2, d_m=256, pkm_heads=3, pkm_knn=5, pkm_dq=8))
    pkm = S.ProductKeyMemory(cfg).double().eval()
    x = torch.randn(20, 16, dtype=torch.float64)
    ids, w, _, _ = pkm.route(x)
    s1, s2 = pkm.half_scores(x)                                          # (T, H, n)
    n = pkm.n
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).reshape(20, 3, n * n)   # all N product-key scores
    top = full.topk(5, -1)
    assert torch.equal(ids.view(20, 3, 5).sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(w.view(20, 3, 5).sort(-1).values, torch.softmax(top.values, -1).sort(-1).values)
    assert (ids.view(20, 3, 5) != ids.view(20, 3, 5)[:, :1]).any()      # not degenerate


# ----------------------------------------------------------------------------- command line
def _run_main(argv):
    with pytest.raises(SystemExit) as e:
        S.main(argv)
    return e.value.code


BAD = [  # script-specific bad inputs (tests/test_cli.py has the common ones)
    ["--selector", "nope"],
    ["--selector", "avgk", "--d_m", "64", "--g", "8", "--b", "9"],       # b > B
    ["--b", "-1"],
    ["--selector", "switch", "--g", "64", "--avgk_balance", "bias"],    # balances Avg-K only
    ["--avgk_balance", "bias", "--balance_rate", "0"],
    ["--avgk_balance", "aux"],
    ["--selector", "avgk", "--d_m", "100", "--g", "8"],                  # d_m % g
    ["--g", "7"],                                                        # g does not divide d_m
    ["--g", "-4"],
    ["--d_m", "-1"],
    ["--d_ff", "-1"],
    ["--selector", "pkm", "--d_m", "1000"],                              # N not a square
    ["--selector", "pkm", "--d_m", "256", "--pkm_dq", "3"],              # odd query dim
    ["--selector", "pkm", "--d_m", "256", "--pkm_knn", "17"],            # k > sqrt(N)
    ["--pkm_heads", "0"],
    ["--selector", "switch", "--g", "64", "--d_ff", "512"],              # switch with b > 1
    ["--aux_alpha", "-1"],
    ["--aux_alpha", "nan"],
    ["--capacity_factor", "-0.5"],
    ["--key_init_std", "0"],
    ["--key_init_std", "inf"],
    ["--hash_seed", "-1"],
    ["--sffn_every", "0"],
    ["--base_iters", "-1"],
    ["--sample_tokens", "-1"],
    ["--impl", "fast"],
    ["--impl", "triton", "--dtype", "bfloat16"],                         # interpreter: float32
    ["--activation", "tanh"],
    ["--avgk_weight", "sigmoid"],
    ["--vanillam_agg", "median"],
    ["--compare", "dense,nope:64"],                                      # unknown selector
    ["--compare", "avgk:x"],                                             # g not an int
    ["--compare", ","],                                                  # empty
    ["--compare", "avgk:7"],                                             # g does not divide d_m
    ["--bench", "nope"],
    ["--bench", "64,7"],                                                 # 7 does not divide d_m
    ["--bench", "64", "--bench_iters", "0"],
    ["--bench_tokens", "0"],
    ["--compare", "dense,avgk", "--resume"],
    ["--g", "notanint"],
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_input_exits_2(argv, tmp_path, capsys):
    """One line on stderr, exit 2, nothing written (main(argv) in-process)."""
    out = tmp_path / "out"
    assert _run_main(argv + ["--out_dir", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nano_sffn.py: error:"), err
    assert "Traceback" not in err[0]
    assert list(tmp_path.iterdir()) == []


def test_impl_triton_on_cpu_needs_the_interpreter(tmp_path, capsys, monkeypatch):
    """Without TRITON_INTERPRET=1 (or without triton) --impl triton on CPU is one line, exit 2."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _run_main(["--impl", "triton", "--device", "cpu", "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--impl triton needs triton" in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("selector,g,device,auto,triton", [
    ("avgk", 64, "cpu", "masked", "triton"), ("avgk", 256, "cpu", "masked", "triton"),
    ("avgk", 64, "cuda", "triton/grouped", "triton"), ("avgk", 128, "cuda", "triton/grouped",
                                                        "triton"),
    ("avgk", 256, "cuda", "grouped", "triton"), ("avgk", 32, "cuda", "masked", "triton"),
    ("switch", 2048, "cuda", "grouped", "triton"), ("topk", 128, "cuda", "triton/grouped", "triton"),
    ("vanillam", 64, "cuda", "grouped", "grouped"), ("pkm", 1, "cuda", "grouped", "grouped")])
def test_impl_picks(selector, g, device, auto, triton, monkeypatch):
    """--impl auto: on CUDA triton for 64 <= g < 256 where triton is installed (else grouped),
    grouped for larger g, masked for smaller g and on CPU. --impl triton: triton (VanillaM, PKM:
    grouped). auto "a/b": a with triton installed, b without."""
    for found in (True, False):
        monkeypatch.setattr(S, "triton_ok", lambda *a, f=found: f)
        cfg = S.Config(selector=selector, n_embd=512, n_head=8, d_ff=2048, d_m=16384, g=g)
        cfg = S.validate(cfg)
        layer = S.ProductKeyMemory(cfg) if selector == "pkm" else S.SparseFFN(cfg, 11)
        dt = torch.bfloat16 if device == "cuda" else torch.float32
        ok = S.native_grouped_ok("cuda", dt, 512, g, 16384 // g)
        want = auto.split("/")[0 if found else -1]
        want = want if want != "grouped" or ok or selector == "pkm" else "masked"
        assert S.impl_path(layer, device, dt, 512) == want, (selector, g, device, found)
        assert S.impl_path(layer, device, torch.float32, 512) != "triton"  # measured in bf16 only
        layer.impl = "triton"
        assert S.impl_path(layer, device, dt, 512) == triton, (selector, g, device, found)


def test_grouped_cuda_shape_check():
    cfg = S.Config(selector="avgk", n_embd=12, n_head=2, d_ff=48, d_m=96, g=12, impl="grouped")
    if S.native_grouped_mm() is None:
        pytest.skip("no grouped GEMM in this torch")
    with pytest.raises(S.BadInput):
        S.validate(cfg, "cuda")


TINY = ["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--d_ff", "32",
        "--d_m", "128", "--g", "8", "--batch_size", "4", "--eval_iters", "2", "--tokenizer", "char",
        "--sample_tokens", "20", "--no-progress"]


def _log(path):
    return list(csv.DictReader(open(os.path.join(path, "log.csv"))))


def test_smoke_train_and_resume(tiny_text, tmp_path):
    torch.manual_seed(12)
    base = TINY + ["--dataset", tiny_text, "--selector", "hash", "--g", "32", "--eval_interval", "3"]
    full = tmp_path / "full"
    res = S.main(base + ["--max_iters", "6", "--out_dir", str(full)])
    assert math.isfinite(res["final"]["val_loss"])
    for f in ("config.json", "log.csv", "results.json", "ckpt.pt", "loss.png", "routing_health.png", "flops.txt"):
        assert (full / f).exists(), f
    rows = _log(full)
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert "L1_entropy" in rows[0] and "L1_overflow1" in rows[0]
    assert json.load(open(full / "results.json"))["final"]["params"] > 0


def test_resume_continues_exactly(tiny_text, tmp_path):
    torch.manual_seed(13)
    base = TINY + ["--dataset", tiny_text, "--selector", "base", "--eval_interval", "2", "--warmup_iters", "1",
                   "--sample_tokens", "0"]
    full = tmp_path / "full"
    S.main(base + ["--max_iters", "4", "--out_dir", str(full)])
    # a run of 2 steps whose schedule is that of a 4-step run: stop it at step 2 by editing max_iters on resume
    cut = tmp_path / "cut"
    S.main(base + ["--max_iters", "4", "--out_dir", str(cut), "--stop_at", "2"])
    assert [int(r["step"]) for r in _log(cut)] == [0, 2]
    S.main(base + ["--max_iters", "4", "--out_dir", str(cut), "--resume"])
    a, b = _log(full), _log(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]


def test_compare_mode(tiny_text, tmp_path):
    torch.manual_seed(14)
    out = tmp_path / "cmp"
    table = S.main(TINY + ["--dataset", tiny_text, "--compare", "dense,avgk:8,hash:16", "--max_iters", "2",
                           "--eval_interval", "2", "--sample_tokens", "0", "--out_dir", str(out)])
    assert [r["selector"] for r in table] == ["dense", "avgk", "hash"]
    flops = [r["active_fwd_flops_per_token"] for r in table]
    assert flops[2] == flops[0] < flops[1]   # hash: dense's FLOPs exactly; avgk: + its 2dB selection
    for f in ("compare.csv", "compare.md", "compare_val_loss.png"):
        assert (out / f).exists()
    assert (out / "avgk_g8" / "results.json").exists()


def test_flop_table_matches_formulas():
    cfg = S.validate(S.Config(selector="avgk", n_embd=512, n_head=8, n_layer=8, d_ff=2048, d_m=16384, g=256))
    cells, over, params = S.layer_flops(cfg, "avgk")
    assert cells == 4 * 512 * 2048 and over == 2 * 512 * 64 and params == 2 * 512 * 16384
    assert over / cells == pytest.approx((16384 / 2048) / (2 * 256))   # (d_m/c)/(2g) = 1.6%


@AVGK
def test_select_fp32_scores_and_selection():
    """--select_fp32: Avg-K scores stay float32 under bf16 autocast (and with bf16 weights), and
    pick the same blocks as scoring in float64."""
    torch.manual_seed(15)
    layer, _ = make_layer("avgk", dtype=torch.float32, d_m=64, g=4, d_ff=16, select_fp32=True)
    x = torch.randn(40, 8)
    e = layer.K.double().view(layer.B, layer.g, -1).mean(1)
    ref = (x.double() @ e.t()).topk(layer.b, -1).indices.sort(-1).values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.avgk_scores(x).dtype == torch.float32
        assert torch.equal(layer.route(x)[0].sort(-1).values, ref)
        layer.select_fp32 = False
        assert layer.avgk_scores(x).dtype == torch.bfloat16          # the default: autocast's
    layer, _ = make_layer("avgk", dtype=torch.bfloat16, d_m=64, g=4, d_ff=16, select_fp32=True)
    xb = x.bfloat16()
    e = layer.K.double().view(layer.B, layer.g, -1).mean(1)
    assert layer.avgk_scores(xb).dtype == torch.float32
    ref = (xb.double() @ e.t()).topk(layer.b, -1).indices.sort(-1).values
    assert torch.equal(layer.route(xb)[0].sort(-1).values, ref)


def test_key_init_std_sets_the_std_of_K():
    torch.manual_seed(16)
    for std in (0.02, 0.5):
        layer, _ = make_layer("avgk", dtype=torch.float32, d=64, d_m=1024, g=16, d_ff=64,
                              key_init_std=std)
        assert layer.K.std().item() == pytest.approx(std, rel=0.02)
        assert layer.V.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.05)


def test_bench_writes_tables(tmp_path):
    out = tmp_path / "bench"
    rows = S.main(["--device", "cpu", "--n_embd", "16", "--n_head", "2", "--d_ff", "32",
                   "--d_m", "128", "--g", "8", "--bench", "16,8", "--bench_tokens", "64", "--bench_iters", "1",
                   "--out_dir", str(out)])
    assert [r["g"] for r in rows] == ["dense", 16, 8]
    assert all(r["masked_ms"] > 0 and r["grouped_ms"] > 0 for r in rows[1:])
    assert all(r["triton_ms"] is None for r in rows)                    # CUDA only
    assert sorted(os.listdir(out)) == ["bench.csv", "bench.md"]
    long = list(csv.DictReader(open(out / "bench.csv")))                 # one row per (g, path)
    assert list(long[0]) == ["g", "b", "B", "path", "ms", "device", "torch", "commit"]
    assert [(r["g"], r["b"], r["path"]) for r in long] == [
        ("", "", "dense"), ("16", "2", "masked"), ("16", "2", "grouped"), ("8", "4", "masked"),
        ("8", "4", "grouped")]
    assert all(float(r["ms"]) > 0 and r["device"] == "cpu" for r in long)


def test_bench_compile_compiles_each_path_afresh(tmp_path, monkeypatch):
    """--bench --compile times each (layer, path) through its own torch.compile (here with the
    eager backend: the wiring, not inductor) after a dynamo reset; the table says compiled."""
    seen, compile_ = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **k: seen.append(m) or compile_(
        m, backend="eager"))
    out = tmp_path / "bench"
    S.main(["--device", "cpu", "--n_embd", "16", "--n_head", "2", "--d_ff", "32", "--d_m", "128",
            "--g", "8", "--bench", "16,8", "--bench_tokens", "64", "--bench_iters", "1",
            "--compile", "--out_dir", str(out)])
    assert [type(m).__name__ for m in seen] == ["DenseFFN"] + ["SparseFFN"] * 4   # 2 g x 2 paths
    assert ", compiled, " in (out / "bench.md").read_text()


def test_resume_takes_unset_settings_from_the_checkpoint(tiny_text, tmp_path):
    """--resume with only --out_dir continues the run with the checkpoint's settings."""
    out = tmp_path / "run"
    base = TINY + ["--dataset", tiny_text, "--selector", "hash", "--eval_interval", "2",
                   "--sample_tokens", "0", "--max_iters", "4"]
    S.main(base + ["--out_dir", str(out), "--stop_at", "2"])
    res = S.main(["--resume", "--out_dir", str(out), "--no-progress", "--sample_tokens", "0"])
    assert res["config"]["selector"] == "hash" and res["config"]["n_embd"] == 16
    assert [int(r["step"]) for r in _log(out)] == [0, 2, 4]


# ----------------------------------------------------------------------------- loss-free balancing
def test_balance_bias_moves_the_choice_and_nothing_else():
    """With a bias, the output and every gradient equal those of the plain layer given the same
    blocks; the bias itself is a buffer (no parameter, no gradient) and does change the choice."""
    torch.manual_seed(0)
    layer, _ = make_layer("avgk", g=4, d=8, d_m=32, d_ff=8, avgk_balance="bias")
    plain, _ = make_layer("avgk", g=4, d=8, d_m=32, d_ff=8)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "sel_bias"})
    assert {n for n, _ in layer.named_parameters()} == {"K", "V"}
    x = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    ids0 = layer.route(x)[0]
    layer.sel_bias.copy_(torch.randn(layer.B) * 10)
    ids = layer.route(x)[0]
    assert not torch.equal(ids0.sort(-1).values, ids.sort(-1).values)
    y, _ = layer(x)
    y_ref, _ = plain(x, ids=ids)
    assert torch.equal(y, y_ref)
    g = torch.autograd.grad(y.square().sum(), [x, layer.K, layer.V])
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, plain.K, plain.V])
    for a, b in zip(g, g_ref):
        assert torch.equal(a, b)


def test_balance_drives_a_skewed_load_toward_uniform():
    """Tokens that share one direction pick the same blocks; balance steps even the load out."""
    torch.manual_seed(1)
    layer, _ = make_layer("avgk", dtype=torch.float32, g=4, d=8, d_m=64, d_ff=8,
                          avgk_balance="bias", balance_rate=0.002)
    layer.train()
    x = torch.randn(256, 8) + 2 * torch.randn(8)  # a shared direction: most tokens pick alike

    def max_over_mean():
        layer.load.zero_()
        layer.route(x)
        load = layer.load.clone()
        layer.load.zero_()
        return (load.max() / load.mean()).item()

    before = max_over_mean()
    for _ in range(500):  # u must be small next to the spread of the scores (here ~0.1)
        layer.route(x)
        layer.balance_step()
    after = max_over_mean()
    assert before > 4 and after < 1.5, (before, after)


def test_balance_bias_is_saved_and_restored(tiny_text, tmp_path):
    base = TINY + ["--dataset", tiny_text, "--selector", "avgk", "--avgk_balance", "bias",
                   "--eval_interval", "2", "--warmup_iters", "1", "--sample_tokens", "0"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    S.main(base + ["--max_iters", "4", "--out_dir", str(full)])
    S.main(base + ["--max_iters", "4", "--out_dir", str(cut), "--stop_at", "2"])
    ck = torch.load(cut / "ckpt.pt", map_location="cpu", weights_only=False)
    biases = [v for k, v in ck["model"].items() if k.endswith("sel_bias")]
    assert biases and any(b.abs().sum() > 0 for b in biases)
    assert not any(k.endswith(".load") for k in ck["model"])
    S.main(base + ["--max_iters", "4", "--out_dir", str(cut), "--resume"])
    assert [r["train_loss"] for r in _log(full)] == [r["train_loss"] for r in _log(cut)]
    a = torch.load(full / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(cut / "ckpt.pt", map_location="cpu", weights_only=False)["model"]
    for k in a:
        if k.endswith("sel_bias"):
            assert torch.equal(a[k], b[k])


# ----------------------------------------------------------------------------- classroom exercises
# Each exercise (python tests/make_exercises.py --list) is graded by the tests marked for it:
# those above (gradcheck, grouped == masked, all blocks == dense, brute force) and these.
def tiny_ids(N, B, b, seed):
    """(N, b) distinct block ids per token, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(B, generator=gen)[:b] for _ in range(N)])


@MASKED
def test_masked_all_blocks_is_the_dense_ffn_and_additive_over_blocks():
    """All B blocks with w = 1: f(x K^T) V (1). One token's output is the sum of its blocks'
    outputs, is linear in w, and is the same whether pre = x K^T is passed or not."""
    torch.manual_seed(20)
    layer, _ = make_layer("hash", g=4, d=8, d_m=32, d_ff=8)               # B = 8, b = 2
    x = torch.randn(5, 8, dtype=torch.float64)
    every = torch.arange(layer.B).expand(5, layer.B)
    dense = S.F.gelu(x @ layer.K.t()) @ layer.V
    torch.testing.assert_close(layer.compute_masked(x, every, None), dense, rtol=1e-12, atol=1e-14)
    ids = tiny_ids(5, layer.B, 2, seed=1)
    y = layer.compute_masked(x, ids, None)
    assert y.shape == (5, 8)
    parts = layer.compute_masked(x, ids[:, :1], None) + layer.compute_masked(x, ids[:, 1:], None)
    torch.testing.assert_close(y, parts, rtol=1e-12, atol=1e-14)
    w = torch.rand(5, 2, dtype=torch.float64)
    yw = layer.compute_masked(x, ids, w)
    torch.testing.assert_close(yw, layer.compute_masked(x, ids[:, :1], w[:, :1])
                               + layer.compute_masked(x, ids[:, 1:], w[:, 1:]))
    torch.testing.assert_close(layer.compute_masked(x, ids, 3 * w), 3 * yw)
    torch.testing.assert_close(layer.compute_masked(x, ids, w, pre=x @ layer.K.t()), yw,
                               rtol=0, atol=0)


@MASKED
def test_masked_gradient_reaches_only_the_chosen_blocks():
    torch.manual_seed(21)
    layer, _ = make_layer("hash", g=4, d=8, d_m=32, d_ff=8)
    x = torch.randn(3, 8, dtype=torch.float64)
    ids = torch.tensor([[1, 5], [5, 6], [1, 6]])
    w = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    y = layer.compute_masked(x, ids, w)
    gK, gV, gw = torch.autograd.grad(y.square().sum(), (layer.K, layer.V, w))
    for beta in range(layer.B):
        rows = slice(beta * layer.g, (beta + 1) * layer.g)
        if beta in (1, 5, 6):
            assert gK[rows].abs().sum() > 0 and gV[rows].abs().sum() > 0, beta
        else:
            assert gK[rows].abs().max() == 0 and gV[rows].abs().max() == 0, beta
    assert (gw != 0).all()


def snapshot_layer(seed):
    """A tiny fixed-selection layer (B = 4 blocks of g = 2, b = 2) with unit-scale K and V."""
    torch.manual_seed(seed)
    layer, _ = make_layer("hash", g=2, d=4, d_m=8, d_ff=4)
    with torch.no_grad():
        layer.K.normal_(), layer.V.normal_()
    return layer


@MASKED
def test_masked_snapshot():
    layer = snapshot_layer(22)
    x = torch.randn(2, 4, dtype=torch.float64)
    ids = torch.tensor([[0, 3], [2, 1]])
    w = torch.tensor([[0.25, 1.0], [0.5, 2.0]], dtype=torch.float64)
    snapshot("sffn_masked", "y_w_none", layer.compute_masked(x, ids, None).detach())
    snapshot("sffn_masked", "y_w", layer.compute_masked(x, ids, w).detach())


@SWITCH
def test_switch_router_choice_weights_and_balanced_aux():
    """Top-1 = argmax of the gate logits; w = that probability, float32 for a bfloat16 input;
    a uniform router (W_g = 0) gives aux = alpha exactly (f and P sum to 1, P_e = 1/B);
    the aux loss has a gradient (through P) but the choice does not."""
    torch.manual_seed(23)
    layer, _ = make_layer("switch", d=8, d_m=32, g=4, aux_alpha=0.01)   # B = 8, b = 1
    x = torch.randn(12, 8, dtype=torch.float64)
    logits = x @ layer.W_g.t()
    ids, w, aux = layer.gate_route(x)
    assert ids.shape == (12, 1) and w.shape == (12, 1)
    assert torch.equal(ids[:, 0], logits.argmax(-1))
    torch.testing.assert_close(w[:, 0], torch.softmax(logits, -1).amax(-1))
    (g,) = torch.autograd.grad(aux, layer.W_g)
    assert g.abs().sum() > 0
    given = torch.randint(0, 8, (12, 1))
    assert torch.equal(layer.gate_route(x, given)[0], given)
    with torch.no_grad():
        layer.W_g.zero_()
    _, w0, aux0 = layer.gate_route(x)
    torch.testing.assert_close(w0, torch.full_like(w0, 1 / 8))
    assert abs(aux0.item() - 0.01) < 1e-15
    lb = layer.to(torch.bfloat16)
    _, wb, auxb = lb.gate_route(x.bfloat16())
    assert wb.dtype == torch.float32 and auxb.dtype == torch.float32


@SWITCH
def test_switch_and_topk_snapshot():
    for sel, d_ff in (("switch", 4), ("topk", 8)):
        torch.manual_seed(24)
        layer, _ = make_layer(sel, d=4, d_m=16, g=4, d_ff=d_ff, aux_alpha=0.1)   # B = 4
        with torch.no_grad():
            layer.W_g.normal_()
        x = torch.randn(3, 4, dtype=torch.float64)
        ids, w, aux = layer.gate_route(x)
        snapshot("sffn_switch", sel + "_ids", ids)
        snapshot("sffn_switch", sel + "_w", w.detach())
        snapshot("sffn_switch", sel + "_aux", aux.detach())


@AVGK
def test_avgk_scores_are_mean_preactivations_without_key_gradient():
    """(4): x . mean(K_beta) = the mean of the block's pre-activations x . k_i; the top-b of those
    is the selection; the scores carry no gradient to K (stop-gradient), only to x."""
    torch.manual_seed(25)
    layer, _ = make_layer("avgk", g=4, d=8, d_m=64, d_ff=12)             # B = 16, b = 3
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    s = layer.avgk_scores(x)
    mean_pre = (x @ layer.K.t()).view(20, layer.B, layer.g).mean(-1)
    torch.testing.assert_close(s, mean_pre, rtol=1e-12, atol=1e-14)
    ids, w, aux, pre = layer.route(x)
    assert torch.equal(ids.sort(-1).values, mean_pre.topk(3, -1).indices.sort(-1).values)
    assert w is None and aux == 0 and pre is None
    gK, gx = torch.autograd.grad(s.sum(), (layer.K, x), allow_unused=True)
    assert gK is None and gx.abs().sum() > 0


@AVGK
def test_avgk_snapshot():
    torch.manual_seed(29)
    layer, _ = make_layer("avgk", g=2, d=4, d_m=8, d_ff=4)                # B = 4, b = 2
    with torch.no_grad():
        layer.K.normal_()
    x = torch.randn(3, 4, dtype=torch.float64)
    snapshot("sffn_avgk", "scores", layer.avgk_scores(x))
    snapshot("sffn_avgk", "ids", layer.route(x)[0])


def pkm_layer(n=6, k=3, heads=2):
    cfg = S.validate(S.Config(selector="pkm", n_embd=8, n_layer=2, d_m=n * n, pkm_heads=heads,
                              pkm_knn=k, pkm_dq=4))
    return S.ProductKeyMemory(cfg).double()


@PKM
def test_product_topk_is_the_top_k_of_all_n2_sums_for_every_k():
    """For every k <= n: the k best cells of all n^2 sums s1[i1] + s2[i2], best first, as
    i1 * n + i2; also when one half's best entries pair badly with the other's."""
    torch.manual_seed(27)
    n = 6
    s1, s2 = torch.randn(2, 5, 2, n, dtype=torch.float64).unbind(0)     # (T, H, n) each
    hard1 = torch.tensor([10.0, 9.0, 0.0, -1.0, -2.0, -3.0], dtype=torch.float64)
    hard2 = torch.tensor([0.0, 5.0, 4.9, 4.8, -9.0, 1.0], dtype=torch.float64)
    s1[0, 0], s2[0, 0] = hard1, hard2
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).reshape(5, 2, n * n)
    for k in range(1, n + 1):
        pkm = pkm_layer(n=n, k=k)
        ids = pkm.product_topk(s1, s2)
        assert ids.shape == (5, 2 * k) and ids.dtype == torch.long
        ih = ids.view(5, 2, k)
        top = full.topk(k, -1)
        assert torch.equal(ih.sort(-1).values, top.indices.sort(-1).values), k
        torch.testing.assert_close(full.gather(-1, ih), top.values)      # best first


@PKM
def test_pkm_snapshot():
    """By hand: token 0's best sums are s1[2] + s2[1] = 5 (cell 2*4+1 = 9), then s1[0] + s2[1] = 3.5
    (cell 1); token 1's are s1[1] + s2[3] = 3.6 (cell 7), then s1[0] + s2[3] = 3.5 (cell 3)."""
    pkm = pkm_layer(n=4, k=2, heads=1)
    s1 = torch.tensor([[[0.5, -1.0, 2.0, 0.1]], [[1.0, 1.1, -3.0, 0.0]]], dtype=torch.float64)
    s2 = torch.tensor([[[0.0, 3.0, -0.5, 1.0]], [[-1.0, 0.2, 0.3, 2.5]]], dtype=torch.float64)
    snapshot("sffn_pkm", "ids", pkm.product_topk(s1, s2))


@GROUPED
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_direct_with_empty_and_crowded_blocks(dtype):
    """compute_grouped called directly: block 0 chosen by nobody, block 1 by every token, weights
    and VanillaM's reused pre-activations: output and gradients equal the masked reference."""
    torch.manual_seed(28)
    layer, _ = make_layer("vanillam", dtype=dtype, g=4, d=8, d_m=32, d_ff=8)   # B = 8, b = 2
    x = torch.randn(6, 8, dtype=dtype, requires_grad=True)
    ids = torch.stack([torch.ones(6, dtype=torch.long), torch.tensor([2, 3, 3, 7, 2, 5])], 1)
    w = torch.rand(6, 2, dtype=dtype, requires_grad=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for pre in (None, x @ layer.K.t()):
        for ww in (None, w):
            yg = S.compute_grouped(layer, x, ids, ww, pre)
            ym = layer.compute_masked(x, ids, ww, pre)
            torch.testing.assert_close(yg, ym, **tol)
            ins = [x, layer.K, layer.V] + ([w] if ww is not None else [])
            gy = torch.randn_like(ym)
            for a, b in zip(torch.autograd.grad(yg, ins, gy, retain_graph=True),
                            torch.autograd.grad(ym, ins, gy, retain_graph=True)):
                torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("B", [3, 256, 257, 32768, 32769])
def test_sort_pairs_matches_plain_stable_sort(B):
    """sort_pairs sorts a narrow key (uint8 / int16 / int32 by B): the same blocks, order, tokens
    and offsets as a stable sort of the int64 ids, at each type's edge (block B-1 is used)."""
    gen = torch.Generator().manual_seed(B)
    N, b = 40, 3
    ids = torch.stack([torch.randperm(B, generator=gen)[:b] for _ in range(N)])
    ids[0, 0], ids[1, 0] = B - 1, 0                       # (duplicates in a row: still sorted)
    blk_ref, order_ref = ids.reshape(-1).sort(stable=True)
    offs_ref = torch.bincount(blk_ref, minlength=B).cumsum(0)
    blk, order, tok, offs = S.sort_pairs(ids, B)
    assert blk.dtype == torch.int64 and offs.dtype == torch.int32
    assert torch.equal(blk, blk_ref) and torch.equal(order, order_ref)
    assert torch.equal(tok, order_ref // b) and torch.equal(offs.long(), offs_ref)


def test_expand_and_sum_pairs_are_adjoint_gathers():
    """The row moves of the grouped path: ExpandPairs x -> x[tok] and SumPairs ys -> sum of each
    token's pairs, against plain indexing / index_add, and torch.autograd.gradcheck of both."""
    torch.manual_seed(30)
    N, b, d = 5, 3, 4
    ids = torch.stack([torch.randperm(6)[:b] for _ in range(N)])            # (N, b) distinct
    _, order = ids.reshape(-1).sort(stable=True)
    tok = order // b
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * b)).view(N, b)
    x = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(N * b, d, dtype=torch.float64, requires_grad=True)
    assert torch.equal(S.ExpandPairs.apply(x, tok, inv), x[tok])
    ref = torch.zeros(N, d, dtype=torch.float64).index_add(0, tok, ys)
    torch.testing.assert_close(S.SumPairs.apply(ys, tok, inv), ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: S.ExpandPairs.apply(t, tok, inv), (x,))
    assert torch.autograd.gradcheck(lambda t: S.SumPairs.apply(t, tok, inv), (ys,))


@GROUPED
def test_grouped_snapshot():
    layer = snapshot_layer(29)
    x = torch.randn(3, 4, dtype=torch.float64)
    ids = torch.tensor([[3, 1], [1, 3], [2, 1]])
    w = torch.tensor([[0.5, 1.0], [2.0, 0.25], [1.0, 1.0]], dtype=torch.float64)
    snapshot("sffn_grouped", "y", S.compute_grouped(layer, x, ids, w).detach())
