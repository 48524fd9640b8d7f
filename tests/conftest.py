"""Shared test setup: the scripts under test are importable, torch runs single-threaded, and the
data loader uses ../shared when it is there.

The scripts (nano_*.py, data/) are imported from $NANO_SRC when it is set (a student's copy made by
tests/make_exercises.py), from this repository otherwise. Every test file imports them plainly
(`import nano_sffn`); none touches sys.path itself."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
SRC = os.path.abspath(os.environ.get("NANO_SRC") or ROOT)  # where the code under test lives
if SRC in sys.path:
    sys.path.remove(SRC)
sys.path.insert(0, SRC)

# Offline copies the CI machine has beside the checkout (never committed).
if os.path.isdir(os.path.join(SHARED, "data")):
    os.environ.setdefault("NANO_DATA_DIR", os.path.join(SHARED, "data"))
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_text(tmp_path):
    """A small UTF-8 text file for smoke runs through main()."""
    p = tmp_path / "tiny.txt"
    line = "To be, or not to be, that is the question: whether 'tis nobler in the mind.\n"
    p.write_text(line * 200, encoding="utf-8")
    return str(p)
