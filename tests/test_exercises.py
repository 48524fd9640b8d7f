"""The classroom kit: marked exercises, student copies, per-exercise grading.

For every exercise: a copy with it blanked fails that exercise's tests, and its tests pass on the
repository (they are part of this suite). One exercise per script is also checked for "no cascade":
the whole test file of its script, run on the blanked copy, fails only that exercise's tests."""
import os
import subprocess
import sys

import pytest

import make_exercises as mx

EXERCISES = mx.find_exercises()
IDS = [x[0] for x in EXERCISES]
HERE = os.path.dirname(os.path.abspath(__file__))
TEST_FILE = {"nano_sffn.py": "test_sffn.py", "nano_simple_block.py": "test_simple_block.py",
             "nano_prune.py": "test_prune.py"}


def _pytest(copy, *args):
    env = dict(os.environ, NANO_SRC=str(copy))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True,
                          timeout=600)


def test_four_to_six_exercises_per_script():
    for script in mx.SCRIPTS:
        n = sum(1 for x in EXERCISES if x[1] == script)
        assert 4 <= n <= 6, f"{script} has {n} exercises"


def test_list_prints_id_script_description(capsys):
    mx.main(["--list"])
    rows = [ln.split("\t") for ln in capsys.readouterr().out.strip().splitlines()]
    assert [r[0] for r in rows] == IDS and all(len(r) == 3 and r[2] for r in rows)


def test_copy_is_byte_identical_outside_the_regions(tmp_path):
    mx.make_copy(str(tmp_path / "c"))
    for script in mx.SCRIPTS:
        orig = open(os.path.join(mx.ROOT, script), encoding="utf-8").read().split("\n")
        new = open(tmp_path / "c" / script, encoding="utf-8").read().split("\n")
        regions = [(b, e) for _, s, _, b, e in EXERCISES if s == script]
        keep = [ln for i, ln in enumerate(orig) if not any(b < i < e for b, e in regions)]
        assert [ln for ln in new if "raise NotImplementedError(\"exercise " not in ln] == keep
        assert sum("raise NotImplementedError(\"exercise " in ln for ln in new) == len(regions)
    assert open(tmp_path / "c" / "data" / "__init__.py").read() == \
        open(os.path.join(mx.ROOT, "data", "__init__.py")).read()


@pytest.mark.parametrize("args,why", [(["--only", "no_such_id"], "unknown exercise"),
                                      (["--only", IDS[0] if IDS else "x"], "not an empty")])
def test_refuses_bad_requests(tmp_path, capsys, args, why):
    out = tmp_path / "c"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(SystemExit) as e:
        mx.main(["--out", str(out)] + args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("ex_id", IDS)
def test_blanked_exercise_fails_its_tests(ex_id, tmp_path):
    copy = tmp_path / "student"
    mx.make_copy(str(copy), [ex_id])
    script = next(x[1] for x in EXERCISES if x[0] == ex_id)
    r = _pytest(copy, os.path.join("tests", TEST_FILE[script]), "-x", "--exercise", ex_id)
    assert r.returncode == 1, r.stdout[-2000:]
    assert f"NotImplementedError: exercise {ex_id}" in r.stdout


@pytest.mark.parametrize("script", mx.SCRIPTS)
def test_no_cascade(script, tmp_path):
    """The first exercise of each script blanked: its script's test file fails only its tests."""
    ex_id = next(x[0] for x in EXERCISES if x[1] == script)
    copy = tmp_path / "student"
    mx.make_copy(str(copy), [ex_id])
    # (the tokenization of every installed package is a data test, slow and exercise-free)
    r = _pytest(copy, os.path.join("tests", TEST_FILE[script]), "-rf", "-k", "not pycode_all")
    failed = [ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("FAILED ")]
    assert failed, r.stdout[-2000:]
    graded = _pytest(copy, os.path.join("tests", TEST_FILE[script]), "--exercise", ex_id,
                     "--collect-only").stdout
    for nodeid in failed:
        assert nodeid in graded, f"{nodeid} failed but does not grade {ex_id}"
