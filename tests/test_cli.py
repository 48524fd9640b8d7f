"""The common command line of the three scripts (../shared/CONVENTIONS.md), one table for all.

- `--help` of every script lists the common flags;
- bad input: one line on stderr, exit status 2, no traceback, nothing written;
- divergence: a non-finite loss stops training with exit 3 and keeps the last good checkpoint;
- Ctrl-C: one line, exit 130, the checkpoint intact.

Scripts run in-process through `main(argv)`, so the table stays fast; one case per script also runs
as a real subprocess to check the exit status and the output the user sees."""
import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

SCRIPTS = ("nano_sffn", "nano_simple_block", "nano_prune")
COMMON = ("--device", "--dtype", "--compile", "--no-compile", "--seed", "--out_dir", "--dataset",
          "--tokenizer", "--data_dir", "--n_layer", "--n_head", "--n_embd", "--block_size",
          "--batch_size", "--grad_accum", "--max_iters", "--lr", "--min_lr", "--warmup_iters",
          "--weight_decay", "--beta1", "--beta2", "--grad_clip", "--eval_interval", "--eval_iters",
          "--resume", "--stop_at", "--preset", "--progress", "--no-progress", "--compare", "--bench")

# A tiny CPU run of each script: 6 steps, a checkpoint every 2.
BASE = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "4", "--max_iters", "6",
        "--eval_interval", "2", "--eval_iters", "1", "--warmup_iters", "1", "--device", "cpu",
        "--no-progress", "--seed", "1"]
TEXT = ["--dataset", "{text}", "--tokenizer", "char", "--block_size", "16"]
TINY = {
    "nano_sffn": BASE + TEXT + ["--d_ff", "64", "--d_m", "256", "--g", "16", "--sample_tokens", "0"],
    "nano_simple_block": BASE + TEXT + ["--sample_tokens", "0"],
    "nano_prune": BASE + ["--no-analysis"],
}

# (name, extra argv): appended after the tiny run's flags, so they override it.
BAD = [
    ("lr negative", ["--lr", "-1"]),
    ("lr zero", ["--lr", "0"]),
    ("lr nan", ["--lr", "nan"]),
    ("lr inf", ["--lr", "inf"]),
    ("lr not a number", ["--lr", "abc"]),
    ("min_lr negative", ["--min_lr", "-1"]),
    ("min_lr above lr", ["--lr", "1e-3", "--min_lr", "1e-2"]),
    ("beta1 above 1", ["--beta1", "1.5"]),
    ("beta2 above 1", ["--beta2", "1.5"]),
    ("beta2 negative", ["--beta2", "-0.1"]),
    ("weight_decay negative", ["--weight_decay", "-0.1"]),
    ("grad_clip negative", ["--grad_clip", "-1"]),
    ("seed negative", ["--seed", "-1"]),
    ("seed too large", ["--seed", str(2 ** 64)]),
    ("n_layer zero", ["--n_layer", "0"]),
    ("n_embd zero", ["--n_embd", "0"]),
    ("n_embd not divisible by n_head", ["--n_head", "3"]),
    ("block_size zero", ["--block_size", "0"]),
    ("batch_size zero", ["--batch_size", "0"]),
    ("grad_accum zero", ["--grad_accum", "0"]),
    ("max_iters negative", ["--max_iters", "-1"]),
    ("warmup_iters negative", ["--warmup_iters", "-1"]),
    ("eval_interval zero", ["--eval_interval", "0"]),
    ("eval_iters zero", ["--eval_iters", "0"]),
    ("stop_at negative", ["--stop_at", "-1"]),
    ("unknown device", ["--device", "tpu"]),
    ("unknown dtype", ["--dtype", "int8"]),
    ("float16 on cpu", ["--dtype", "float16"]),
    ("unknown preset", ["--preset", "nope"]),
    ("unknown tokenizer", ["--tokenizer", "nope"]),
    ("unknown flag", ["--no_such_flag", "1"]),
    ("missing dataset file", ["--dataset", "{tmp}/no/such/file.txt"]),
    ("out_dir is a file", ["--out_dir", "{tmp}/afile"]),
    ("out_dir under a file", ["--out_dir", "{tmp}/afile/sub"]),
    ("resume without a checkpoint", ["--resume", "--out_dir", "{tmp}/empty_dir"]),
]
CKPT_BAD = [  # (name, how the checkpoint in out_dir is damaged)
    ("empty checkpoint", "empty"),
    ("garbage checkpoint", "garbage"),
    ("truncated checkpoint", "truncated"),
    ("other script's checkpoint", "other_script"),
    ("other architecture", "other_arch"),
]


def _fmt(argv, tmp, text):
    return [a.replace("{tmp}", str(tmp)).replace("{text}", text) for a in argv]


def _run_main(mod, argv, capsys):
    """main(argv) in-process -> (exit code, stdout, stderr). An escaping exception fails the test."""
    try:
        mod.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line(code, out, err, want=2):
    assert code == want, f"exit {code}, want {want}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"want one line on stderr, got {len(lines)}:\n{err}"


def _snapshot(path):
    """Every file under path with its size and mtime (nothing written = same snapshot)."""
    if not os.path.exists(path):
        return None
    snap = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            snap[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return snap


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "tiny.txt"
    p.write_text("To be, or not to be, that is the question: whether 'tis nobler.\n" * 300,
                 encoding="utf-8")
    return str(p)


@pytest.fixture(scope="module")
def good_runs(tmp_path_factory, text_file):
    """One finished tiny run (with its ckpt.pt) of every script, made once for the module."""
    runs = {}
    for name in SCRIPTS:
        out = tmp_path_factory.mktemp(name) / "run"
        mod = importlib.import_module(name)
        mod.main(_fmt(TINY[name], out, text_file) + ["--out_dir", str(out)])
        assert os.path.isfile(out / "ckpt.pt")
        runs[name] = out
    return runs


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_common_flags(name, capsys):
    mod = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    missing = [f for f in COMMON if not re.search(rf"(?<![\w-]){f}(?![\w-])", out)]
    assert not missing, f"{name} --help lacks {missing}"


@pytest.mark.parametrize("case,extra", BAD, ids=[c for c, _ in BAD])
@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_input(name, case, extra, tmp_path, text_file, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty_dir").mkdir()
    out_dir = tmp_path / "out"
    argv = _fmt(TINY[name] + ["--out_dir", str(out_dir)] + extra, tmp_path, text_file)
    before = _snapshot(tmp_path)
    code, out, err = _run_main(importlib.import_module(name), argv, capsys)
    _assert_one_line(code, out, err)
    assert _snapshot(tmp_path) == before, "a failed run left files behind"


def _damage(ckpt, how, other_ckpt, mod, tiny_argv, tmp_path, capsys):
    if how == "empty":
        open(ckpt, "wb").close()
    elif how == "garbage":
        with open(ckpt, "wb") as f:
            f.write(b"this is not a checkpoint" * 100)
    elif how == "truncated":
        data = open(ckpt, "rb").read()
        with open(ckpt, "wb") as f:
            f.write(data[: len(data) // 2])
    elif how == "other_script":
        shutil.copy(other_ckpt, ckpt)
    return tiny_argv + (["--n_embd", "16"] if how == "other_arch" else [])


@pytest.mark.parametrize("case,how", CKPT_BAD, ids=[c for c, _ in CKPT_BAD])
@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_checkpoint(name, case, how, good_runs, tmp_path, text_file, capsys):
    out_dir = tmp_path / "run"
    shutil.copytree(good_runs[name], out_dir)
    other = SCRIPTS[(SCRIPTS.index(name) + 1) % len(SCRIPTS)]
    mod = importlib.import_module(name)
    argv = _damage(str(out_dir / "ckpt.pt"), how, good_runs[other] / "ckpt.pt", mod,
                   _fmt(TINY[name], tmp_path, text_file), tmp_path, capsys)
    before = _snapshot(tmp_path)
    code, out, err = _run_main(mod, argv + ["--out_dir", str(out_dir), "--resume"], capsys)
    _assert_one_line(code, out, err)
    if how == "other_arch":
        assert "n_embd" in err, "the message should name the setting that differs"
    assert _snapshot(tmp_path) == before, "a failed resume changed the run directory"


@pytest.mark.parametrize("name", SCRIPTS)
def test_checkpoint_whose_weights_do_not_fit(name, good_runs, tmp_path, text_file, capsys):
    """The config passes the checks but a tensor has another shape: one line, exit 2."""
    out_dir = tmp_path / "run"
    shutil.copytree(good_runs[name], out_dir)
    ck = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    key = next(k for k, v in ck["model"].items() if v.dim() == 2)
    ck["model"][key] = ck["model"][key][:-1]
    torch.save(ck, out_dir / "ckpt.pt")
    before = _snapshot(tmp_path)
    argv = _fmt(TINY[name], tmp_path, text_file) + ["--out_dir", str(out_dir), "--resume"]
    code, out, err = _run_main(importlib.import_module(name), argv, capsys)
    _assert_one_line(code, out, err)
    assert "does not fit this model" in err and key in err, err
    after = _snapshot(tmp_path)  # (nano_simple_block rewrites params.json, the same table)
    assert after.keys() == before.keys() and after["run/ckpt.pt"] == before["run/ckpt.pt"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_out_of_memory_is_one_line(name, tmp_path, text_file, capsys, monkeypatch):
    """Out of memory while training: one line (one wording) naming the sizes, exit 2."""
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    mod = importlib.import_module(name)
    monkeypatch.setattr(mod, "train", oom)
    argv = _fmt(TINY[name], tmp_path, text_file) + ["--out_dir", str(tmp_path / "run")]
    code, out, err = _run_main(mod, argv, capsys)
    _assert_one_line(code, out, err)
    block = 64 if name == "nano_prune" else 16    # (TINY's sizes: the line names them)
    assert (f"{name}.py: error: out of memory at batch_size 4, block_size {block}, n_embd 32, "
            "n_layer 2; lower them (or raise --grad_accum)") in err, err
    assert not (tmp_path / "run").exists()


def _finite_ckpt(path):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    state = ck["model"]
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v)
               and v.is_floating_point())


@pytest.mark.parametrize("fault,want", [("nan", 3), ("ctrl_c", 130)])
@pytest.mark.parametrize("name", SCRIPTS)
def test_fault_keeps_last_good_checkpoint(name, fault, want, tmp_path, text_file, capsys,
                                          monkeypatch):
    """From the 4th training loss on (after the step-2 checkpoint), the loss is NaN or Ctrl-C is
    pressed: one line, exit 3 / 130, and the checkpoint on disk is the good one."""
    calls = {"n": 0}
    real = F.cross_entropy

    def faulty(*a, **k):
        loss = real(*a, **k)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] >= 4:
                if fault == "ctrl_c":
                    raise KeyboardInterrupt
                return loss * float("nan")
        return loss

    monkeypatch.setattr(F, "cross_entropy", faulty)
    out_dir = tmp_path / "run"
    mod = importlib.import_module(name)
    code, out, err = _run_main(mod, _fmt(TINY[name], tmp_path, text_file)
                               + ["--out_dir", str(out_dir)], capsys)
    _assert_one_line(code, out, err, want=want)
    assert calls["n"] >= 4, "the fault was never injected"
    assert _finite_ckpt(out_dir / "ckpt.pt")
    ck = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 2


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_input_subprocess(name, tmp_path, text_file):
    """What the user sees: exactly one line, exit 2, no out_dir created."""
    out_dir = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    argv = _fmt(TINY[name], tmp_path, text_file) + ["--out_dir", str(out_dir), "--beta2", "1.5"]
    src = os.path.dirname(importlib.import_module(name).__file__)
    r = subprocess.run([sys.executable, os.path.join(src, name + ".py")] + argv, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "beta2" in r.stderr
    assert not out_dir.exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_line_over_100_characters(name):
    """A reader's file: no line over 100 characters (URLs and a student copy's blanks aside)."""
    path = importlib.import_module(name).__file__
    long = [i + 1 for i, ln in enumerate(open(path, encoding="utf-8").read().split("\n"))
            if len(ln) > 100 and "http" not in ln and 'NotImplementedError("exercise ' not in ln]
    assert not long, f"{name}.py lines over 100 characters: {long[:10]}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_git_commit_is_head_or_the_override(name, monkeypatch):
    """config.json's git_commit: $NANO_GIT_COMMIT wins, else HEAD (+ "-dirty"); None outside git."""
    mod = importlib.import_module(name)
    monkeypatch.setenv("NANO_GIT_COMMIT", "abc1234")
    assert mod.git_commit() == "abc1234"
    monkeypatch.delenv("NANO_GIT_COMMIT")
    src = os.path.dirname(mod.__file__)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=src)
    if head.returncode != 0:
        assert mod.git_commit() is None
    else:
        assert mod.git_commit() in (head.stdout.strip(), head.stdout.strip() + "-dirty")
