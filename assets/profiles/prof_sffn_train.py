"""Profile compiled training steps of nano_sffn at the gpu preset (bf16, random tokens), one entry
per selector:g, e.g.  python assets/profiles/prof_sffn_train.py dense,avgk:256,avgk:64
An entry may name a candidate grouped path of prof_sffn_variants.py: avgk:64@isel runs the model with
nano_sffn.compute_grouped replaced by that candidate (same signature, checked there against masked).
An entry may end in /triton: avgk:64/triton runs nano_sffn's --impl triton (its Triton kernels as
torch.library custom ops, inside the compiled graph, as the script does).
Prints the GPU kernel time per step by category (profutil.py) and the wall time per step."""
import os, sys, time, dataclasses, torch
sys.path.insert(0, "."); sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nano_sffn as S
from profutil import prof
dev = "cuda"
base = S.parse_config(["--preset", "gpu", "--device", "cuda"])
V = 50304
x = torch.randint(0, V, (base.batch_size, base.block_size), device=dev)
y = torch.randint(0, V, (base.batch_size, base.block_size), device=dev)
GROUPED = S.compute_grouped
for entry in sys.argv[1].split(","):
    entry_, _, impl = entry.partition("/")
    arm, _, path = entry_.partition("@")
    if path:
        import prof_sffn_variants
        S.compute_grouped = prof_sffn_variants.CANDIDATES[path][0]
    else:
        S.compute_grouped = GROUPED
    sel, _, g = arm.partition(":")
    torch._dynamo.reset()  # each entry compiles afresh (a replaced compute_grouped included)
    cfg = S.validate(dataclasses.replace(base, selector=sel, g=int(g) if g else base.g,
                                         impl="triton" if impl else base.impl), dev)
    raw = S.GPT(cfg, V).to(dev)
    model = torch.compile(raw)
    opt = S.make_optimizer(raw, cfg, dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            _, ce, aux = model(x, y)
        (ce + aux).backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / 20 * 1000
    print(f"\n{entry}: wall {ms:.2f} ms/step, {base.batch_size * base.block_size / ms * 1000:,.0f} tok/s")
    prof(step, 10, f"nano_sffn {entry} train step (gpu preset, compiled)", top=30)
    del model, raw, opt
    torch.cuda.empty_cache()
