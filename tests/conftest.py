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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to a busy machine; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_text(tmp_path):
    """A small UTF-8 text file for smoke runs through main()."""
    p = tmp_path / "tiny.txt"
    line = "To be, or not to be, that is the question: whether 'tis nobler in the mind.\n"
    p.write_text(line * 200, encoding="utf-8")
    return str(p)


# ---- classroom: `pytest --exercise ID` grades one exercise (see tests/make_exercises.py) ----------
def pytest_addoption(parser):
    parser.addoption("--exercise", default="",
                     help="run only the tests of this exercise id (python tests/make_exercises.py --list)")


def pytest_configure(config):
    config.addinivalue_line("markers", "exercise(id): the test grades this classroom exercise")


def pytest_collection_modifyitems(config, items):
    want = config.getoption("--exercise")
    if not want:
        return
    keep = [it for it in items if want in _exercise_ids(it)]
    if not keep:
        raise pytest.UsageError(f"no tests are marked for exercise {want!r} "
                                "(python tests/make_exercises.py --list)")
    config.hook.pytest_deselected(items=[it for it in items if it not in keep])
    items[:] = keep


def _exercise_ids(item):
    return {m.args[0] for m in item.iter_markers("exercise")}


def _needs_other_exercise(item, outcome):
    """No cascade: a test (or its fixture) that hits another exercise's blank, i.e.
    NotImplementedError("exercise X: ..."), is skipped with "needs exercise X"; the tests marked
    for X still fail."""
    exc = outcome.excinfo[1] if outcome.excinfo else None
    while exc is not None and not isinstance(exc, NotImplementedError):
        exc = exc.__cause__ or exc.__context__
    if exc is None or not str(exc).startswith("exercise "):
        return
    ex_id = str(exc).split()[1].rstrip(":")
    if ex_id not in _exercise_ids(item):
        outcome.force_exception(pytest.skip.Exception(f"needs exercise {ex_id}",
                                                      _use_item_location=True))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    _needs_other_exercise(item, (yield))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _needs_other_exercise(item, (yield))
