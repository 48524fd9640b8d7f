"""GPU check of nano_sffn --impl triton against compute_masked: tests/test_sffn_triton.py, then
its errors() at the bench shapes, float32 (tol 1e-5) and bf16 (reported; the grouped and fused
variants gave 4-5e-3). From the repo root: python assets/profiles/sffn_triton_check.py"""
import sys
import pytest
import torch
sys.path[:0] = [".", "tests"]
print("pytest rc", pytest.main(["-q", "tests/test_sffn_triton.py"]))
from test_sffn_triton import errors  # noqa: E402

for case in [("avgk", 64, 32, 16384, 512, 2048), ("avgk", 256, 8, 16384, 512, 2048)]:
    e = max(errors(*case))
    print("float32", case, f"max rel err {e:.2e}", "OK" if e < 1e-5 else "FAIL")
for case in [("avgk", 64, 32, 16384, 512, 16384), ("avgk", 256, 8, 16384, 512, 16384)]:
    print("bf16", case, f"max rel err {max(errors(*case, dt=torch.bfloat16)):.2e}")
