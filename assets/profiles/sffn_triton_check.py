"""GPU check of nano_sffn --impl triton against compute_masked: float32 small and bench-shape cases
(tol 1e-5), bf16 at the bench shape (reported). Runs tests/test_sffn_triton.py first if pytest is
there. From the repo root: python assets/profiles/sffn_triton_check.py"""
import sys, torch, dataclasses
sys.path.insert(0, ".")
try:
    import pytest
    rc = pytest.main(["-q", "tests/test_sffn_triton.py"])
    print("pytest rc", rc)
except ImportError:
    print("no pytest: own checks only")
import nano_sffn as S
DEV = "cuda"


def errs(selector, g, b, d_m, d, N, dt=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = S.validate(S.Config(selector=selector, n_embd=d, n_head=1, n_layer=2, d_ff=g * b, d_m=d_m,
                              g=g, b=b, impl="masked"), DEV)
    layer = S.SparseFFN(cfg, 11).float().to(DEV)
    x = torch.randn(N, d, device=DEV, requires_grad=True)
    ids = layer.route(x)[0].detach()
    gy = torch.randn(N, d, device=DEV)
    out = []
    for fn in (layer.compute_masked, lambda *a: S.compute_triton(layer, *a)):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with torch.autocast(DEV, dt, enabled=dt != torch.float32):
            y = fn(x, ids, layer.route(x, None, ids)[1])
        y.float().backward(gy)
        out.append([y.detach().float(), x.grad] + [p.grad for p in layer.parameters()])
    return max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(*out))


for case in [("avgk", 8, 2, 32, 40, 40), ("topk", 32, 2, 128, 24, 17), ("switch", 32, 1, 128, 40, 9),
             ("avgk", 4, 4, 32, 20, 12), ("avgk", 64, 32, 16384, 512, 2048), ("avgk", 256, 8, 16384, 512, 2048)]:
    e = errs(*case)
    print("float32", case, f"max rel err {e:.2e}", "OK" if e < 1e-5 else "FAIL")
for case in [("avgk", 64, 32, 16384, 512, 16384), ("avgk", 256, 8, 16384, 512, 16384)]:
    print("bf16", case, f"max rel err {errs(*case, dt=torch.bfloat16):.2e} (grouped/fused variants: 4-5e-3)")
