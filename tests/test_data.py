"""Tests of the shared data loader. Network-free: fetches are simulated to fail."""
import glob
import os

import numpy as np
import pytest
import torch

import data

SHAKESPEARE = os.path.join(os.environ.get("NANO_DATA_DIR", ""), "tinyshakespeare", "input.txt")
have_shakespeare = pytest.mark.skipif(not data._shakespeare_ok(SHAKESPEARE),
                                      reason="needs a local Tiny Shakespeare (NANO_DATA_DIR, e.g. ../shared/data)")


def _gpt2_available():
    try:
        data.GPT2Tokenizer()
        return True
    except Exception:
        return False


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own token cache and can never download anything."""
    monkeypatch.setenv("NANO_CACHE_DIR", str(tmp_path / "cache"))

    def no_network(*a, **k):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)


@pytest.fixture
def small_pycode(tmp_path, monkeypatch):
    """Stand-in for the stdlib: 20 small .py files, so pycode tests are fast."""
    root = tmp_path / "lib"
    root.mkdir()
    for i in range(20):
        (root / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x + {i}\n", encoding="utf-8")
    files = [(str(root), f"m{i:02d}.py") for i in range(20)]
    monkeypatch.setattr(data, "_python_files", lambda with_site_packages: files)
    return files


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


# ----------------------------------------------------------------------------- tokenizers
def test_char_round_trip(tmp_path):
    text = "Hello, world! Ünïcödé → ok\n" * 50
    ds = data.load_dataset(write(tmp_path, "t.txt", text), "char")
    assert ds.tokenizer == "char" and ds.vocab_size == len(set(text))
    assert ds.decode(ds.encode("Hello, Ünï")) == "Hello, Ünï"
    assert ds.decode(np.concatenate([ds.train, ds.val])) == text
    with pytest.raises(data.DataError):
        ds.encode("Q")  # not in the vocabulary: a clear error, not a KeyError


@pytest.mark.skipif(not _gpt2_available(), reason="GPT-2 BPE files not available offline (set TIKTOKEN_CACHE_DIR)")
def test_gpt2_round_trip(tmp_path):
    text = "Hello, I'm a language model, and I read Shakespeare.\n" * 40
    ds = data.load_dataset(write(tmp_path, "t.txt", text), "gpt2")
    assert ds.tokenizer == "gpt2" and ds.vocab_size == 50257
    assert ds.encode("Hello, I'm a language model,")[:4] == [15496, 11, 314, 1101]
    assert ds.decode(np.concatenate([ds.train, ds.val])) == text


def test_large_vocab_uses_uint32(tmp_path):
    chars = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000)
    ds = data.load_dataset(write(tmp_path, "wide.txt", chars * 2), "char")
    assert ds.vocab_size > 2**16 and ds.train.dtype == np.uint32
    assert ds.decode(ds.train[:5]) == chars[:5]
    small = data.load_dataset(write(tmp_path, "small.txt", "abc" * 100), "char")
    assert small.train.dtype == np.uint16


# ----------------------------------------------------------------------------- splits
@have_shakespeare
def test_shakespeare_split_sizes(monkeypatch):
    ds = data.load_dataset("shakespeare", "char")
    assert ds.name == "shakespeare" and not ds.notes
    assert (len(ds.train), len(ds.val), ds.vocab_size) == (1_003_854, 111_540, 65)
    assert ds.decode(ds.train[:14]) == "First Citizen:"


@have_shakespeare
@pytest.mark.skipif(not _gpt2_available(), reason="GPT-2 BPE files not available offline")
def test_shakespeare_gpt2_split_sizes():
    ds = data.load_dataset("shakespeare", "gpt2")
    assert (len(ds.train), len(ds.val)) == (301_966, 36_059)  # nanoGPT's data/shakespeare counts


def test_text_file_split_is_90_10_and_deterministic(tmp_path):
    text = "".join(chr(97 + (i * 7) % 26) for i in range(1000))
    path = write(tmp_path, "t.txt", text)
    a, b = data.load_dataset(path), data.load_dataset(path)
    assert (len(a.train), len(a.val)) == (900, 100)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)


def test_pycode_split_by_file(small_pycode):
    ds = data.load_dataset("pycode", "char")
    train, val = ds.decode(ds.train), ds.decode(ds.val)
    assert "def f9(x)" in val and "def f19(x)" in val  # every tenth file is val
    assert "def f9(x)" not in train and "def f0(x)" in train
    assert train.count("def ") == 18 and val.count("def ") == 2


def test_pycode_lists_stdlib_without_tests():
    files = data._python_files(with_site_packages=False)
    rels = [rel for _, rel in files]
    assert len(rels) > 100 and len(set(rels)) == len(rels)
    assert any(rel.endswith("os.py") for rel in rels)
    assert not any(part in ("test", "tests") for rel in rels for part in rel.split(os.sep))


# ----------------------------------------------------------------------------- batches
def test_batch_shapes_dtypes_and_shift(tmp_path):
    ds = data.load_dataset(write(tmp_path, "t.txt", "abcdefghij" * 100), "char")
    g = torch.Generator().manual_seed(0)
    x, y = ds.get_batch("train", 5, 16, generator=g)
    assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # each row is a real window of the split
    train = torch.from_numpy(ds.train.astype(np.int64))
    for row_x, row_y in zip(x, y):
        s = next(i for i in range(len(train) - 16) if torch.equal(train[i:i + 16], row_x))
        assert torch.equal(train[s + 1:s + 17], row_y)


def test_batches_reproducible_with_generator(tmp_path):
    ds = data.load_dataset(write(tmp_path, "t.txt", "".join(chr(97 + i % 26) for i in range(5000))), "char")
    a = ds.get_batch("train", 4, 8, generator=torch.Generator().manual_seed(3))[0]
    b = ds.get_batch("train", 4, 8, generator=torch.Generator().manual_seed(3))[0]
    c = ds.get_batch("train", 4, 8, generator=torch.Generator().manual_seed(4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rank_sharding_is_disjoint(tmp_path):
    # train = 900 'a' then 900 'b'; with two ranks, rank 0 sees only 'a' and rank 1 only 'b'
    ds = data.load_dataset(write(tmp_path, "t.txt", "a" * 900 + "b" * 900 + "c" * 200), "char")
    g = torch.Generator().manual_seed(0)
    a = ds.decode(ds.get_batch("train", 64, 8, generator=g, rank=0, world_size=2)[0].flatten())
    b = ds.decode(ds.get_batch("train", 64, 8, generator=g, rank=1, world_size=2)[0].flatten())
    both = ds.decode(ds.get_batch("train", 64, 8, generator=g)[0].flatten())
    assert set(a) == {"a"} and set(b) == {"b"} and set(both) == {"a", "b"}


# ----------------------------------------------------------------------------- cache
def test_cache_written_atomically_and_rebuilt_on_change(tmp_path):
    path = write(tmp_path, "t.txt", "abc" * 100)
    a = data.load_dataset(path)
    cache = os.environ["NANO_CACHE_DIR"]
    metas = glob.glob(os.path.join(cache, "*.json"))
    assert len(metas) == 1 and not glob.glob(os.path.join(cache, "*.tmp*"))
    assert len(glob.glob(os.path.join(cache, "*.bin"))) == 2
    # a second load reads the cache (same ids, no new files)
    b = data.load_dataset(path)
    assert np.array_equal(a.train, b.train) and len(glob.glob(os.path.join(cache, "*.json"))) == 1
    # editing the source rebuilds: new ids, new vocabulary
    write(tmp_path, "t.txt", "xyz" * 100)
    c = data.load_dataset(path)
    assert c.decode(c.train[:3]) == "xyz" and len(glob.glob(os.path.join(cache, "*.json"))) == 2
    # a different tokenizer is a different cache entry
    if _gpt2_available():
        d = data.load_dataset(path, "gpt2")
        assert d.tokenizer == "gpt2" and len(glob.glob(os.path.join(cache, "*.json"))) == 3


def test_truncated_cache_is_rebuilt(tmp_path):
    path = write(tmp_path, "t.txt", "hello world " * 50)
    a = data.load_dataset(path)
    (train_bin,) = glob.glob(os.path.join(os.environ["NANO_CACHE_DIR"], "*.train.bin"))
    with open(train_bin, "r+b") as f:
        f.truncate(10)
    b = data.load_dataset(path)
    assert np.array_equal(a.train, b.train)


# ----------------------------------------------------------------------------- offline
def test_shakespeare_offline_falls_back_to_pycode(tmp_path, monkeypatch, small_pycode, capsys):
    monkeypatch.setattr(data, "HERE", str(tmp_path / "nowhere"))
    monkeypatch.setenv("NANO_DATA_DIR", str(tmp_path / "empty"))
    ds = data.load_dataset("shakespeare", "char")
    err = capsys.readouterr().err.strip().splitlines()
    assert ds.name == "pycode" and len(err) == 1 and "Tiny Shakespeare" in err[0] and "NANO_DATA_DIR" in err[0]
    assert ds.notes == err


def test_corrupt_local_shakespeare_is_not_used(tmp_path, monkeypatch, small_pycode):
    bad = tmp_path / "d" / "tinyshakespeare"
    bad.mkdir(parents=True)
    (bad / "input.txt").write_text("not shakespeare", encoding="utf-8")
    monkeypatch.setattr(data, "HERE", str(tmp_path / "nowhere"))
    monkeypatch.setenv("NANO_DATA_DIR", str(tmp_path / "d"))
    assert data.load_dataset("shakespeare").name == "pycode"


def test_gpt2_offline_falls_back_to_char(tmp_path, monkeypatch, capsys):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    ds = data.load_dataset(write(tmp_path, "t.txt", "abc" * 100), "gpt2")
    err = capsys.readouterr().err.strip().splitlines()
    assert ds.tokenizer == "char" and ds.vocab_size == 3
    assert len(err) == 1 and "GPT-2" in err[0] and "TIKTOKEN_CACHE_DIR" in err[0]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["missing", "empty", "undecodable", "unknown_dataset", "unknown_tokenizer",
                                  "too_short", "block_too_long", "bad_split"])
def test_bad_input_is_one_clear_line(tmp_path, case):
    with pytest.raises(data.DataError) as e:
        if case == "missing":
            data.load_dataset(str(tmp_path / "nope.txt"))
        elif case == "empty":
            data.load_dataset(write(tmp_path, "e.txt", "  \n"))
        elif case == "undecodable":
            p = tmp_path / "b.txt"
            p.write_bytes(b"abc\xff\xfe def")
            data.load_dataset(str(p))
        elif case == "unknown_dataset":
            data.load_dataset("wikitext")
        elif case == "unknown_tokenizer":
            data.load_dataset("shakespeare", "sentencepiece")
        elif case == "too_short":
            data.load_dataset(write(tmp_path, "s.txt", "abcdefgh"))
        elif case == "block_too_long":
            ds = data.load_dataset(write(tmp_path, "t.txt", "abc" * 100))
            ds.check_block_size(64)
        elif case == "bad_split":
            data.load_dataset(write(tmp_path, "t.txt", "abc" * 100)).get_batch("test", 1, 4)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300 and ("use" in msg or "give" in msg or "convert" in msg)


def test_block_size_checked_in_get_batch(tmp_path):
    ds = data.load_dataset(write(tmp_path, "t.txt", "abc" * 100))  # val has 30 tokens
    ds.check_block_size(29)
    ds.get_batch("val", 2, 29)
    with pytest.raises(data.DataError, match="val"):
        ds.get_batch("val", 2, 30)
