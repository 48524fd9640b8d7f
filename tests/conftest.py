"""Shared test setup: the repository root is importable (data, nano_*.py), torch runs
single-threaded and deterministic, and the data loader uses ../shared when it is there."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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
