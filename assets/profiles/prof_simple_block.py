"""Profile full training steps of nano_simple_block bench entries at the paper shape (compiled, bf16)."""
import os, sys, dataclasses, torch
sys.path.insert(0, "."); sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nano_simple_block as S
from profutil import prof
entries = sys.argv[1].split(",")
cfg = S.parse_config(["--preset", "gpu", "--device", "cuda"])
cfg = dataclasses.replace(cfg, vocab_size=50304)
device = torch.device("cuda"); dtype = torch.bfloat16
torch.backends.cuda.matmul.allow_tf32 = True
xy = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1)).to(device)
x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
for e in entries:
    label, c = e, S.parse_bench_entry(e, S.with_block(cfg, e.split(":")[0]))
    step, model, compiled = S.bench_step(c, x, y, device, dtype)
    prof(step, 10, f"simple_block {label} train step (L{c.n_layer} d{c.n_embd} T{c.block_size} B{c.batch_size})", top=30)
    del step, model; torch.cuda.empty_cache()
