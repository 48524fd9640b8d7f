"""nano_sffn training with other TILES for --impl triton (issue 12), set before main():
    python assets/profiles/sffn_tiles_run.py BM BN BK BD -- <nano_sffn args>        (session 20)
    python assets/profiles/sffn_tiles_run.py BM=128 warps=8 stages=4 -- <nano_sffn args>
Run from the repository root."""
import sys
sys.path.insert(0, ".")
import nano_sffn as m  # noqa: E402

cut = sys.argv.index("--")
keys = sys.argv[1:cut]
if all("=" in k for k in keys):
    m.TILES.update({k.split("=")[0]: int(k.split("=")[1]) for k in keys})
else:
    m.TILES.update(zip(("BM", "BN", "BK", "BD"), map(int, keys)))
print("TILES", m.TILES, flush=True)
m.main(sys.argv[cut + 1:])
