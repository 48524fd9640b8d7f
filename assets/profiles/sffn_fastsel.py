"""Issue 12, session 22: two cheap candidates for the selection part of nano_sffn's Avg-K step, and
a profile of the real training loop (real data, routing as trained) instead of a fresh model.
The first (SORT8) is in nano_sffn.sort_pairs since session 22; INT64SORT=1 puts the int64 sort
back, to time the two side by side.

Why: session 21's split weight gradient was 2x faster under skewed routing on its own but changed
training speed by < 1%, so the profile of a fresh model (prof_sffn_train.py) misleads about where
a trained model's step goes. Candidates, both exact (same pairs, same order):
  SORT8     sort_pairs sorts the (N*b,) block ids as uint8 (B <= 256) or int16, not int64: torch's
            radix sort makes one pass per key byte, so 1-2 passes instead of 8
  TOPKSORT  Avg-K's TopK_b by a row sort (bitonic, in shared memory for B <= 4096) sliced to b,
            instead of torch.topk's radix select (the same set unless scores tie at the b-th).
            Not faster alone (--bench), so not adopted; its training runs (with SORT8, at commit
            67be70d, which had the switch) are in assets/sffn_train_speed.csv

    python assets/profiles/sffn_fastsel.py --bench                 # the pieces alone, on one GPU
    INT64SORT=1 python assets/profiles/sffn_fastsel.py -- <nano_sffn args>   # training, int64 sort
    PROF_AT=260 python assets/profiles/sffn_fastsel.py -- <nano_sffn args>   # profile 10 steps of
                               # the training loop from step 260 (tokens/s of that run is void)
Run from the repository root."""
import os
import sys

import torch

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import nano_sffn as S  # noqa: E402

sort_pairs_narrow = S.sort_pairs


def sort_pairs_int64(ids, B):
    """nano_sffn.sort_pairs before session 22: the int64 ids sorted as they are (8 radix passes)."""
    blk, order = ids.reshape(-1).sort(stable=True)
    offs = torch.searchsorted(blk, torch.arange(B, device=ids.device), right=True)
    return blk, order, order // ids.shape[1], offs.to(torch.int32)


def topk_by_sort(s, b):
    """(N, B) scores -> (N, b) indices of the b largest, by a full row sort."""
    return s.sort(dim=-1, descending=True, stable=False).indices[:, :b]


def bench():
    import triton.testing
    timer = lambda fn: triton.testing.do_bench(fn, return_mode="median")  # noqa: E731
    dev, N = "cuda", 16384
    print("g | B | b | topk ms | topk unsorted ms | sort-slice ms | same set | sort_pairs int64 ms "
          "| narrow ms | identical")
    for B, b in ((8, 1), (64, 8), (256, 32), (1024, 128)):
        torch.manual_seed(0)
        s = torch.randn(N, B, device=dev).to(torch.bfloat16)
        t_topk = timer(lambda: s.topk(b, dim=-1).indices)
        t_uns = timer(lambda: s.topk(b, dim=-1, sorted=False).indices)
        t_sort = timer(lambda: topk_by_sort(s, b))
        a = s.topk(b, dim=-1).indices.sort(-1).values
        c = topk_by_sort(s, b).sort(-1).values
        same = (a == c).all(-1).float().mean().item()
        ids = s.float().topk(b, dim=-1).indices
        t_p = timer(lambda: sort_pairs_int64(ids, B))
        t_n = timer(lambda: sort_pairs_narrow(ids, B))
        ident = all(torch.equal(u, v) for u, v in zip(sort_pairs_int64(ids, B),
                                                       sort_pairs_narrow(ids, B)))
        print(f"{2048 // b} | {B} | {b} | {t_topk:.4f} | {t_uns:.4f} | {t_sort:.4f} | {same:.4f} | "
              f"{t_p:.4f} | {t_n:.4f} | {ident}", flush=True)


def profile_at(step_at):
    from profutil import prof
    plain = S.train_step

    def train_step(model, ds, cfg, run, st, bad):
        if st.step == step_at:
            label = f"train loop at step {step_at}: {cfg.selector} g {cfg.g} impl {cfg.impl}"
            prof(lambda: plain(model, ds, cfg, run, st, bad), 10, label, top=30)
        return plain(model, ds, cfg, run, st, bad)
    S.train_step = train_step


if __name__ == "__main__":
    if "--bench" in sys.argv:
        bench()
    else:
        if os.environ.get("INT64SORT") == "1":
            S.sort_pairs = sort_pairs_int64
        if os.environ.get("PROF_AT"):
            profile_at(int(os.environ["PROF_AT"]))
        print("fastsel: INT64SORT", os.environ.get("INT64SORT"), "PROF_AT",
              os.environ.get("PROF_AT"), flush=True)
        S.main(sys.argv[sys.argv.index("--") + 1:])
