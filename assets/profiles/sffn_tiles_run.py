# usage: python assets/profiles/sffn_tiles_run.py BM BN BK BD -- nano_sffn args...   (TILES set before main())
import sys
sys.path.insert(0, ".")  # run from the repository root
import nano_sffn as m
m.TILES.update(BM=int(sys.argv[1]), BN=int(sys.argv[2]), BK=int(sys.argv[3]), BD=int(sys.argv[4]))
print("TILES", m.TILES, flush=True)
m.main(sys.argv[6:])
