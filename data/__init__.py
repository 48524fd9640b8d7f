"""The one piece of code the three nano scripts share: text in, token batches out.

    ds = data.load_dataset("shakespeare", tokenizer="char")
    x, y = ds.get_batch("train", batch_size=12, block_size=64, device="cpu")
    # x, y: int64 (B, T); y[:, t] is the token that follows x[:, t]

Datasets
    shakespeare  Tiny Shakespeare (1,115,394 bytes), fetched once from the char-rnn
                 repository, checked by size and sha256, kept in data/tinyshakespeare/.
                 A local copy is found first under $NANO_DATA_DIR/tinyshakespeare/input.txt
                 (or the `data_dir` argument, the scripts' --data_dir).
    pycode       The Python source of the running interpreter's standard library
                 (test packages left out), read in sorted order: always there, no network.
    pycode_all   pycode plus the installed packages (site-packages): a larger corpus.
    PATH         Any UTF-8 text file.

Splits are deterministic: the first 90% of the text is train, the last 10% val (as
nanoGPT: char-level Tiny Shakespeare gives 1,003,854 / 111,540). pycode is split by
file instead (every tenth file is val), so no file is cut in two.

Tokenizers: `char` (vocabulary = the sorted characters of the dataset, saved with the
cache) and `gpt2` (tiktoken's BPE; honours TIKTOKEN_CACHE_DIR).

Token ids are cached as uint16 (uint32 when the vocabulary needs it) in $NANO_CACHE_DIR
(default data/cache/) next to a small JSON file; the cache key includes a fingerprint
of the source and the tokenizer, so an edit to either rebuilds it. Files are written
to a temporary name and renamed, so a crash never leaves half a cache.

Offline: if Tiny Shakespeare cannot be fetched, one line says so and pycode is used;
if the GPT-2 BPE files cannot be fetched, one line says so and `char` is used.
Bad input raises DataError, whose message is one line naming the problem and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import torch

DATASETS = ("shakespeare", "pycode", "pycode_all")
TOKENIZERS = ("char", "gpt2")

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_BYTES = 1_115_394
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
HERE = os.path.dirname(os.path.abspath(__file__))
VAL_FRACTION = 0.1
DOC_SEP = "\n\n"  # pycode: files are joined with a blank line


class DataError(ValueError):
    """Bad input for the data loader. str(e) is one line: the problem and the fix."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _atomic_write(path: str, payload: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- sources
def _read_text_file(path: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"text file not found: {path} (give an existing UTF-8 text file or one of {', '.join(DATASETS)})")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. iconv -t utf-8") from None
    if not text.strip():
        raise DataError(f"{path} is empty; give a file with some text in it")
    return text


def _shakespeare_ok(path: str) -> bool:
    if not os.path.isfile(path) or os.path.getsize(path) != SHAKESPEARE_BYTES:
        return False
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest() == SHAKESPEARE_SHA256


def _fetch_shakespeare(data_dir: str | None) -> str | None:
    """Path of a verified input.txt: a local copy, the cached download, or a new download."""
    candidates = [d for d in (data_dir, os.environ.get("NANO_DATA_DIR"), HERE) if d]
    for d in candidates:
        p = os.path.join(d, "tinyshakespeare", "input.txt")
        if _shakespeare_ok(p):
            return p
    dest = os.path.join(HERE, "tinyshakespeare", "input.txt")
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=15) as r:
            payload = r.read()
    except Exception:
        return None
    if len(payload) != SHAKESPEARE_BYTES or hashlib.sha256(payload).hexdigest() != SHAKESPEARE_SHA256:
        return None
    _atomic_write(dest, payload)
    return dest


def _python_files(with_site_packages: bool) -> list[tuple[str, str]]:
    """(root, relative path) of every .py file of the stdlib (and site-packages), sorted."""
    stdlib = sysconfig.get_paths()["stdlib"]
    roots = [stdlib]
    if with_site_packages:
        roots += sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    skip = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
    out = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip)
            for name in sorted(filenames):
                if name.endswith(".py"):
                    out.append((root, os.path.relpath(os.path.join(dirpath, name), root)))
    return out


def _pycode_texts(with_site_packages: bool) -> tuple[str, str, str]:
    """(train text, val text, fingerprint). Every tenth file (sorted order) is val."""
    files = _python_files(with_site_packages)
    if not files:
        raise DataError("no Python source files found for pycode; use --dataset shakespeare or a text file")
    fp = hashlib.sha256()
    train, val = [], []
    for i, (root, rel) in enumerate(files):
        path = os.path.join(root, rel)
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few stdlib files are not UTF-8 on purpose: skip them
        fp.update(rel.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
        (val if i % 10 == 9 else train).append(text)
    return DOC_SEP.join(train), DOC_SEP.join(val), fp.hexdigest()


# ----------------------------------------------------------------------------- tokenizers
class CharTokenizer:
    name = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is not in this dataset's char vocabulary; "
                            "use only characters from the training text or --tokenizer gpt2") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class GPT2Tokenizer:
    name = "gpt2"

    def __init__(self):
        import tiktoken
        self.enc = tiktoken.get_encoding("gpt2")
        self.vocab_size = self.enc.n_vocab  # 50257
        self.chars = None

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


# ----------------------------------------------------------------------------- dataset
@dataclass
class Dataset:
    name: str                    # dataset actually used (after any fallback)
    tokenizer: str               # tokenizer actually used (after any fallback)
    train: np.ndarray            # (N_train,) token ids, uint16 or uint32
    val: np.ndarray              # (N_val,)
    vocab_size: int              # not padded
    tok: object = field(repr=False)
    notes: list = field(default_factory=list)  # one-line fallback messages

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids) -> str:
        return self.tok.decode(ids)

    def check_block_size(self, block_size: int) -> None:
        for split in ("train", "val"):
            n = len(getattr(self, split))
            if block_size + 1 > n:
                raise DataError(f"block_size {block_size} is longer than the {split} split of {self.name} "
                                f"({n} tokens); use --block_size {max(1, n - 1)} or less, or a larger dataset")

    def get_batch(self, split: str, batch_size: int, block_size: int, device="cpu",
                  generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1):
        """Random windows of one split: x (B, T) int64 and y = x shifted left by one.

        With world_size > 1 the split is cut into world_size contiguous shards and rank
        draws only from its own, so DDP ranks see disjoint data."""
        if split not in ("train", "val"):
            raise DataError(f"unknown split {split!r}; use 'train' or 'val'")
        ids = getattr(self, split)
        shard = len(ids) // world_size
        ids = ids[rank * shard:(rank + 1) * shard] if world_size > 1 else ids
        if block_size + 1 > len(ids):
            self.check_block_size(block_size)
            raise DataError(f"block_size {block_size} is longer than one of {world_size} shards of {split} "
                            f"({len(ids)} tokens); use a smaller --block_size")
        starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
        # (B, T+1) windows gathered in numpy, one copy, then viewed as x and y
        win = np.stack([ids[s:s + block_size + 1] for s in starts.tolist()]).astype(np.int64)
        xy = torch.from_numpy(win)
        x, y = xy[:, :-1], xy[:, 1:]
        device = torch.device(device)
        if device.type == "cuda":
            x, y = x.contiguous().pin_memory(), y.contiguous().pin_memory()
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x.contiguous().to(device), y.contiguous().to(device)


def _cache_dir() -> str:
    return os.environ.get("NANO_CACHE_DIR") or os.path.join(HERE, "cache")


def _encode_cached(key_name: str, fingerprint: str, tok, train_text: str, val_text: str):
    """Token ids of both splits, from the cache when its key still matches."""
    key = hashlib.sha256(f"{fingerprint}|{tok.name}|{tok.chars}".encode()).hexdigest()[:16]
    base = os.path.join(_cache_dir(), f"{key_name}-{tok.name}-{key}")
    meta_path = base + ".json"
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            dtype = np.dtype(meta["dtype"])
            out = [np.fromfile(f"{base}.{s}.bin", dtype=dtype) for s in ("train", "val")]
            if [len(a) for a in out] == [meta["train_tokens"], meta["val_tokens"]]:
                return out
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it below
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    out = [np.asarray(tok.encode(t), dtype=dtype) for t in (train_text, val_text)]
    try:
        for s, a in zip(("train", "val"), out):
            _atomic_write(f"{base}.{s}.bin", a.tobytes())
        meta = {"dataset": key_name, "tokenizer": tok.name, "fingerprint": fingerprint, "dtype": np.dtype(dtype).name,
                "train_tokens": len(out[0]), "val_tokens": len(out[1]), "chars": tok.chars}
        _atomic_write(meta_path, json.dumps(meta).encode())  # written last: marks the cache complete
    except OSError:
        pass  # a read-only checkout still works, just without a cache
    return out


def load_dataset(name: str = "shakespeare", tokenizer: str = "char", data_dir: str | None = None) -> Dataset:
    """Load a dataset's train/val token ids (see the module docstring for names)."""
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; use one of {', '.join(TOKENIZERS)}")
    notes = []
    if name == "shakespeare":
        path = _fetch_shakespeare(data_dir)
        if path is None:
            notes.append("note: could not fetch Tiny Shakespeare (offline?); using pycode instead. To get it, download "
                         f"{SHAKESPEARE_URL} to {os.path.join(HERE, 'tinyshakespeare', 'input.txt')} or set NANO_DATA_DIR")
            _say(notes[-1])
            name = "pycode"
    if name == "shakespeare":
        text = _read_text_file(path)
        n = int(len(text) * (1 - VAL_FRACTION))
        train_text, val_text, fingerprint = text[:n], text[n:], SHAKESPEARE_SHA256
    elif name in ("pycode", "pycode_all"):
        train_text, val_text, fingerprint = _pycode_texts(name == "pycode_all")
    elif os.path.sep in name or os.path.exists(name) or name.endswith(".txt"):
        text = _read_text_file(name)
        n = int(len(text) * (1 - VAL_FRACTION))
        train_text, val_text = text[:n], text[n:]
        fingerprint = hashlib.sha256(text.encode()).hexdigest()
        name = os.path.abspath(name)
    else:
        raise DataError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)} or a path to a UTF-8 text file")
    if len(train_text) < 2 or len(val_text) < 2:
        raise DataError(f"{name} is too short to split into train and val; give a longer text")

    tok = None
    if tokenizer == "gpt2":
        try:
            tok = GPT2Tokenizer()
        except Exception:
            notes.append("note: could not load the GPT-2 BPE files (offline?); using the char tokenizer instead. To get "
                         "them, run once online or point TIKTOKEN_CACHE_DIR at a tiktoken cache")
            _say(notes[-1])
    if tok is None:
        tok = CharTokenizer("".join(sorted(set(train_text) | set(val_text))))
    key_name = os.path.basename(name) if os.path.isabs(name) else name
    train, val = _encode_cached(key_name, fingerprint, tok, train_text, val_text)
    return Dataset(name=name, tokenizer=tok.name, train=train, val=val, vocab_size=tok.vocab_size, tok=tok, notes=notes)
