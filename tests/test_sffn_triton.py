"""--impl triton, nano_sffn's fused Triton kernels, against the exact reference compute_masked
on CPU under the Triton interpreter (on CUDA where there is one) in float32: y and the gradients
of x, K, V (and of the gate, through w) within TOL relative; gradcheck through the custom op;
the whole GPT compiled with fullgraph=True (no graph break). Skipped where triton is missing
(CI). Small shapes: the interpreter is slow."""
import os

import pytest
import torch

if not torch.cuda.is_available():   # before anything imports triton: run kernels on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import nano_sffn as S  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # CUDA: the compiled kernels, float32
if not S.triton_ok(DEV, torch.float32):
    pytest.skip("no CUDA, and TRITON_INTERPRET is not 1: the kernels cannot run here",
                allow_module_level=True)

TOL = 1e-5  # max |triton - masked| / max |masked| of y and of every gradient
CASES = [  # selector, g, b, d_m, d, N, tile (every one of TILES; None: the defaults)
    ("avgk", 8, 2, 32, 40, 40, 16),      # ~20 pairs a block: several tiles per block; d 40, tile 16
    ("topk", 32, 2, 128, 24, 17, 16),    # weighted (w's gradient reaches W_g); g spans 2 tiles
    ("switch", 32, 1, 128, 40, 9, None),  # b = 1 (N = N*b), TILES' defaults, most blocks empty
    ("avgk", 4, 4, 32, 20, 12, 16),      # g below tl.dot's 16 (a masked tile)
]


def errors(selector, g, b, d_m, d, N, seed=0, dt=torch.float32):
    """Relative errors of y, dx and every parameter's gradient: compute_triton against
    compute_masked, same blocks, same weights, same upstream gradient (dt: under autocast, as
    assets/profiles/sffn_triton_check.py uses it on CUDA in bf16)."""
    torch.manual_seed(seed)
    cfg = S.validate(S.Config(selector=selector, n_embd=d, n_head=1, n_layer=2, d_ff=g * b,
                              d_m=d_m, g=g, b=b, impl="masked"))
    layer = S.SparseFFN(cfg, 11).float().to(DEV)
    x = torch.randn(N, d, device=DEV, requires_grad=True)
    ids = layer.route(x)[0].detach()
    gy = torch.randn(N, d, device=DEV)
    out = []
    for fn in (layer.compute_masked, lambda *a: S.compute_triton(layer, *a)):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with torch.autocast(DEV, dt, enabled=dt != torch.float32):
            y = fn(x, ids, layer.route(x, None, ids)[1])             # w: None or with its grad
        y.float().backward(gy)
        out.append([y.detach().float(), x.grad] + [p.grad for p in layer.parameters()])
    return [((a - b).abs().max() / a.abs().max()).item() for a, b in zip(*out)]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-g{c[1]}-b{c[2]}-d{c[4]}-t{c[6]}"
                                             for c in CASES])
def test_triton_matches_masked(case, monkeypatch):
    *shape, tile = case
    if tile:
        monkeypatch.setattr(S, "TILES", dict(S.TILES, BM=tile, BN=tile, BK=tile, BD=tile))
    errs = errors(*shape)
    assert len(errs) == 2 + (3 if case[0] in ("topk", "switch") else 2)
    assert max(errs) <= TOL, f"{case}: relative errors of y, dx, dK, dV(, dW_g) {errs}"


def test_check_catches_a_dropped_pair(monkeypatch):
    """The check can fail: a scatter that leaves out the last sorted pair."""
    real = S.pair_mm

    def drop_last(a, tok, blk, W, g, n_tok=None):
        return real(a[:-1], tok[:-1], blk[:-1], W, g, n_tok) if n_tok else real(a, tok, blk, W, g)
    monkeypatch.setattr(S, "pair_mm", drop_last)
    assert max(errors("avgk", 8, 2, 32, 40, 40)) > TOL


def test_model_with_impl_triton_matches_masked():
    """Through SparseFFN.forward (--impl triton) in a GPT: the loss and every gradient."""
    grads = []
    for impl in ("masked", "triton"):
        torch.manual_seed(0)
        cfg = S.validate(S.Config(selector="avgk", n_layer=2, n_head=2, n_embd=24, block_size=8,
                                  d_ff=32, d_m=64, g=8, impl=impl), DEV)
        model = S.GPT(cfg, 64).to(DEV)
        layers = model.sparse_layers()
        assert [S.impl_path(m, DEV, torch.float32, 24) for _, m in layers] == [impl]
        idx = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1)).to(DEV)
        _, ce, aux = model(idx, idx)
        (ce + aux).backward()
        grads.append([ce.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= TOL * a.abs().max()


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")   # float32 on CUDA
def test_custom_op_gradcheck():
    """torch.autograd.gradcheck through nano_sffn::pair_mm's autograd (gather and scatter; a and
    W). Float64 under the interpreter (its float64 dots are exact), float32 on CUDA (compiled
    kernels keep float32 accumulators). The scatter's output is float32 by design: eps 0.5 there,
    exact for central differences since the op is linear in each input."""
    mm, dt = S.custom_ops()["pair_mm"], torch.float64 if DEV == "cpu" else torch.float32
    gen = torch.Generator().manual_seed(0)
    N, b, B, g, d = 6, 2, 3, 4, 5
    ids = torch.rand(N, B, generator=gen).argsort(1)[:, :b].to(DEV)   # b distinct blocks a token
    blk, _, tok, offs = S.sort_pairs(ids, B)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=dt).to(DEV).requires_grad_()
    W, x, h = leaf(B * g, d), leaf(N, d), leaf(N * b, g)   # gather x -> (N*b, g); scatter h
    eps, kw = 1e-6 if dt == torch.float64 else 0.5, dict(atol=1e-4, nondet_tol=1e-5)  # atomics
    assert torch.autograd.gradcheck(lambda a, w: mm(a, w, tok, blk, offs, g, None), (x, W),
                                    eps=eps, **kw)
    assert torch.autograd.gradcheck(lambda a, w: mm(a, w, tok, blk, offs, g, N), (h, W),
                                    eps=0.5, **kw)


def test_compiled_model_has_no_graph_break():
    """The whole GPT with impl triton compiles to one graph (fullgraph=True raises at a graph
    break, e.g. a torch.compiler.disable around the op) and matches eager: loss and grads."""
    torch.manual_seed(0)
    cfg = S.validate(S.Config(selector="avgk", n_layer=2, n_head=2, n_embd=24, block_size=8,
                              d_ff=32, d_m=64, g=8, impl="triton"), DEV)
    model = S.GPT(cfg, 64).to(DEV)
    idx = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1)).to(DEV)
    torch._dynamo.reset()
    out = []
    for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        _, ce, aux = run(idx, idx)
        (ce + aux).backward()
        out.append([ce.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*out):
        assert (a - b).abs().max() <= TOL * a.abs().max()
