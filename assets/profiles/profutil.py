"""Shared: profile a closure, print the top CUDA kernels and a per-category breakdown (ms per call)."""
import torch
from torch.profiler import profile, ProfilerActivity

def cat(name):
    n = name.lower()
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "grouped", "matmul")): return "gemm"
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa")): return "attention"
    if "adam" in n or "multi_tensor" in n or "foreach" in n: return "optimizer"
    if n.startswith("triton_red") or n.startswith("triton_per"): return "triton_reduction"
    if n.startswith("triton_poi"): return "triton_pointwise"
    if "triton" in n: return "triton_other"
    if "memcpy" in n or "memset" in n or "copy" in n: return "copy"
    if "sort" in n or "radix" in n: return "sort"
    if "scatter" in n or "index" in n or "gather" in n: return "index"
    if "reduce" in n: return "reduce"
    return "other"

def dev_time(e):
    for k in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(e, k, None)
        if v is not None: return v
    return 0.0

def prof(fn, n, label, top=25):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(n): fn()
        torch.cuda.synchronize()
    ev = [e for e in p.key_averages() if dev_time(e) > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    tot = sum(dev_time(e) for e in ev)
    cats = {}
    for e in ev: cats[cat(e.key)] = cats.get(cat(e.key), 0) + dev_time(e)
    print(f"\n==== {label}: GPU kernel time {tot / n / 1000:.3f} ms per call")
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {k:18s} {v / n / 1000:8.3f} ms  {100 * v / tot:5.1f}%")
    print(f"  top kernels (ms per call, calls per call):")
    for e in sorted(ev, key=lambda e: -dev_time(e))[:top]:
        print(f"   {dev_time(e) / n / 1000:8.3f}  x{e.count / n:5.1f}  [{cat(e.key)}] {e.key[:110]}")
