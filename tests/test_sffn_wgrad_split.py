"""The chunked weight-gradient candidate (assets/profiles/sffn_wgrad_split.py, issue 12) against a
float64 reference of nano_sffn.weight_grad's sum, dK_e = a_e^T src[tok_e], under the Triton
interpreter on CPU (compiled on CUDA), float32; uniform, skewed and empty-block routing, several
chunks per block. Skipped where triton is missing (CI)."""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():   # before anything imports triton: run kernels on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "assets", "profiles", "sffn_wgrad_split.py")
_spec = importlib.util.spec_from_file_location("sffn_wgrad_split", PATH)
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)
S = W.S
DEV = "cuda" if torch.cuda.is_available() else "cpu"
if not S.triton_ok(DEV, torch.float32):
    pytest.skip("no CUDA, and TRITON_INTERPRET is not 1: the kernel cannot run here",
                allow_module_level=True)


def reference(a, src, tok, offs, g):
    """Plain float64: block e's (g, d) rows = a[pairs of e]^T src[tok[pairs of e]]."""
    B, out, lo = offs.numel(), [], 0
    for e in range(B):
        hi = int(offs[e])
        out.append(a[lo:hi].double().T @ src[tok[lo:hi]].double())
        lo = hi
    return torch.cat(out)


@pytest.mark.parametrize("hot", [0.0, 0.6, 1.0])
def test_split_matches_reference(hot, monkeypatch):
    """CH 16 with BM 16: a block of up to N = 40 pairs spans three chunks; at hot 1 every
    token takes blocks 0 and 1, so blocks 2..5 are empty (zero rows); g 24 and d 40 leave
    partial tiles."""
    monkeypatch.setattr(W, "CH", 16)
    monkeypatch.setattr(S, "TILES", dict(S.TILES, BM=16, BN=16, BD=16))
    N, B, b, g, d = 40, 6, 2, 24, 40
    torch.manual_seed(0)
    ids = W.routing(N, B, b, hot, DEV)
    _, _, tok, offs = S.sort_pairs(ids, B)
    a = torch.randn(N * b, g, device=DEV)
    src = torch.randn(N, d, device=DEV)
    ref = reference(a, src, tok, offs, g)
    for fn in (W.weight_grad_split, S.weight_grad):
        out = fn(a, src, tok, offs, g, torch.float32)
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-5, f"{fn.__name__}, hot {hot}: rel err {err:.1e}"


def test_chunks_cover_every_pair_once():
    """Each pair lies in exactly one chunk of its own block; chunks past the last map to B."""
    offs = torch.tensor([0, 5, 5, 21, 40], dtype=torch.int32)   # blocks of 0, 5, 0, 16, 19 pairs
    M, ch, B = 40, 8, offs.numel()
    first, cblk = W.chunks(offs, M, ch)
    seen = torch.zeros(M, dtype=torch.long)
    for c, e in enumerate(cblk.tolist()):
        if e == B:
            continue
        lo_e = int(offs[e - 1]) if e else 0
        lo = lo_e + (c - int(first[e])) * ch
        seen[lo:min(lo + ch, int(offs[e]))] += 1
    assert seen.tolist() == [1] * M
    assert cblk.tolist()[:6] == [1, 3, 3, 4, 4, 4] and set(cblk.tolist()[6:]) == {B}
