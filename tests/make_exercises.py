"""Make a student copy of the three scripts with chosen exercises blanked.

An exercise is a marked region inside a script:

    def cummean(v):
        '''C V, the causal running mean (Eq. 5).  v: (B, H, T, dh)'''
        # BEGIN EXERCISE sb_cummean: divide the running sum (a float32 cumsum over T) by 1..T
        ...the solution...
        # END EXERCISE sb_cummean

Blanking keeps both marker lines (the hint stays visible) and replaces the lines between them with
`raise NotImplementedError("exercise ID: HINT")` at the marker's indentation. Everything else in the
copy is byte-identical to the repository.

    python tests/make_exercises.py --list                      # ID<TAB>SCRIPT<TAB>description
    python tests/make_exercises.py --out DIR [--only ID,...]    # copy with the exercises blanked
    NANO_SRC=DIR python -m pytest -q --exercise ID              # grade one exercise of the copy
"""
import argparse
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("nano_sffn.py", "nano_simple_block.py", "nano_prune.py")
BEGIN = re.compile(r"^(\s*)# BEGIN EXERCISE ([a-z0-9_]+): (.+?)\s*$")
END = re.compile(r"^\s*# END EXERCISE ([a-z0-9_]+)\s*$")


class ExerciseError(Exception):
    """A malformed region or a bad request: one line, exit 2."""


def find_exercises(root=ROOT):
    """[(id, script, hint, begin_line, end_line)] in file order; checks the markers pair up."""
    found, seen = [], set()
    for script in SCRIPTS:
        path = os.path.join(root, script)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        open_ex = None
        for i, line in enumerate(lines):
            m, e = BEGIN.match(line), END.match(line)
            if m:
                if open_ex:
                    raise ExerciseError(f"{script}:{i + 1}: BEGIN inside exercise {open_ex[0]}")
                open_ex = (m.group(2), m.group(3), i)
            elif e:
                if not open_ex or e.group(1) != open_ex[0]:
                    raise ExerciseError(f"{script}:{i + 1}: END EXERCISE {e.group(1)} without BEGIN")
                ex_id, hint, b = open_ex
                if ex_id in seen:
                    raise ExerciseError(f"{script}:{b + 1}: exercise id {ex_id} used twice")
                if i == b + 1:
                    raise ExerciseError(f"{script}:{b + 1}: exercise {ex_id} is empty")
                seen.add(ex_id)
                found.append((ex_id, script, hint, b, i))
                open_ex = None
        if open_ex:
            raise ExerciseError(f"{script}: exercise {open_ex[0]} has no END line")
    return found


def blank(text, regions):
    """text with the given regions' bodies replaced by the NotImplementedError line."""
    lines = text.split("\n")
    for ex_id, _, hint, b, e in sorted(regions, key=lambda r: -r[3]):  # bottom-up keeps indices
        indent = BEGIN.match(lines[b]).group(1)
        msg = f"exercise {ex_id}: {hint}".replace("\\", "\\\\").replace('"', '\\"')
        lines[b + 1:e] = [f'{indent}raise NotImplementedError("{msg}")']
    return "\n".join(lines)


def make_copy(out, only=None, root=ROOT):
    """Write the student copy into `out` (new or empty); returns the blanked exercise ids."""
    exercises = find_exercises(root)
    ids = [x[0] for x in exercises]
    chosen = ids if not only else only
    unknown = [i for i in chosen if i not in ids]
    if unknown:
        raise ExerciseError(f"unknown exercise id {unknown[0]} (see --list)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExerciseError(f"{out} exists and is not an empty directory")
    os.makedirs(out, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "cache", ".pytest_cache")
    for d in ("data", "tests"):
        shutil.copytree(os.path.join(root, d), os.path.join(out, d), ignore=ignore)
    for name in ("README.md", "requirements.txt"):
        if os.path.exists(os.path.join(root, name)):
            shutil.copy2(os.path.join(root, name), os.path.join(out, name))
    for script in SCRIPTS:
        with open(os.path.join(root, script), encoding="utf-8", newline="") as f:
            text = f.read()
        regions = [x for x in exercises if x[1] == script and x[0] in chosen]
        with open(os.path.join(out, script), "w", encoding="utf-8", newline="") as f:
            f.write(blank(text, regions))
    return chosen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--list", action="store_true", help="print ID<TAB>SCRIPT<TAB>description")
    p.add_argument("--out", help="directory for the student copy (new or empty)")
    p.add_argument("--only", default="", help="comma list of exercise ids (default: all)")
    a = p.parse_args(argv)
    try:
        if a.list:
            for ex_id, script, hint, _, _ in find_exercises():
                print(f"{ex_id}\t{script}\t{hint}")
            return
        if not a.out:
            raise ExerciseError("give --list or --out DIR")
        only = [s.strip() for s in a.only.split(",") if s.strip()]
        done = make_copy(a.out, only)
        print(f"wrote {a.out} with {len(done)} exercises blanked; grade one with "
              f"NANO_SRC={a.out} python -m pytest -q --exercise ID")
    except ExerciseError as e:
        print(f"make_exercises.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
