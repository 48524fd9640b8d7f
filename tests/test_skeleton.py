"""The skeleton the scripts share (CONVENTIONS.md, issue 8): each helper in SHARED has one text,
character for character, in every file of FILES, so that a diff of two scripts shows the papers.

A helper that must differ (the paper's metrics, its loss) is simply not in SHARED. To bring a
script into line, add it to FILES."""
import ast
import importlib.util
import itertools

import pytest

FILES = ("nano_sffn.py", "nano_simple_block.py", "nano_prune.py")
SHARED = ("BadInput", "Diverged", "OneLineParser", "need", "build_parser", "make_optimizer",
          "check_finite", "device_name", "git_commit", "write_file", "write_json", "write_csv")


def definitions(file):
    """{name: (first line number, source text)} of the top-level functions and classes of file
    (found where the tests import the scripts from: $NANO_SRC or the repository)."""
    path = importlib.util.find_spec(file.removesuffix(".py")).origin
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return {n.name: (n.lineno, ast.get_source_segment(text, n)) for n in ast.parse(text).body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def first_difference(a, b):
    """(line offset, line of a, line of b) where the texts first differ, or None."""
    pairs = itertools.zip_longest(a.splitlines(), b.splitlines(), fillvalue="<missing>")
    return next(((i, x, y) for i, (x, y) in enumerate(pairs) if x != y), None)


@pytest.mark.parametrize("other", FILES[1:])
@pytest.mark.parametrize("name", SHARED)
def test_shared_helper_has_one_text(name, other):
    first, second = definitions(FILES[0]), definitions(other)
    assert name in first and name in second, f"{name} is not defined in both {FILES[0]}, {other}"
    (la, a), (lb, b) = first[name], second[name]
    diff = first_difference(a, b)
    assert diff is None, (f"{name} differs: {FILES[0]}:{la + diff[0]}: {diff[1].strip()!r} vs "
                          f"{other}:{lb + diff[0]}: {diff[2].strip()!r}")


def test_the_check_can_fail():
    """first_difference names the first line that differs (and a missing line)."""
    assert first_difference("def f():\n    return 1\n", "def f():\n    return 1\n") is None
    assert first_difference("def f():\n    return 1", "def f():\n    return 2") == (
        1, "    return 1", "    return 2")
    assert first_difference("a\nb", "a") == (1, "b", "<missing>")
