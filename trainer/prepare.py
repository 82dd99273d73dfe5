"""Data and tokenizer for labrat's training core. Fixed: the agent may read this file, never change it.

    python -m trainer.prepare --out data/                  # embedded synthetic corpus (default)
    python -m trainer.prepare --out data/ --data notes/    # local text files or a directory
    python -m trainer.prepare --out data/ --data https://host/shard.parquet --sha256 HEX

    python -m trainer.prepare --out data/ --tokenizer bpe --vocab-size 4096   # BPE tokens instead of bytes

Writes `train.bin` and `val.bin` (the tokens: uint8 bytes, or uint16 BPE ids) and `meta.json` (sizes,
checksums, the tokenizer, and for the synthetic source the exact entropy floor and the unigram baseline
in bits per byte). With BPE, also `tokenizer.json`: a byte-level BPE (Hugging Face `tokenizers`) trained
on the training split alone, so it is fixed with the data; meta.json's `token_bytes` gives each id's
length in bytes, which keeps bits per byte exact (a row's bits over the bytes its targets cover).

The synthetic source (trainer/synthetic.py) is a Markov chain over words whose entropy floor is known
exactly; meta.json records it, and the attainable floor per evaluation context length.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from trainer.contract import EVAL_SEQ_LENS, VOCAB_SIZE
from trainer.synthetic import ATTAINABLE_WINDOWS, MarkovWordSource

# ---- knobs -------------------------------------------------------------------------------------
SYNTH_TRAIN_BYTES = 4_000_000
SYNTH_VAL_BYTES = 262_144
# Synthetic corpus sizes (train, held-out bytes) per size class (trainer/contract.py's EVAL_SEQ_LENS): a GPU
# trains ~1 M tokens/s, so 4 MB would be 75 epochs of one 300 s run; 1 GB is about 3 (~1 minute to generate).
SYNTH_BYTES = {"cpu-tiny": (SYNTH_TRAIN_BYTES, SYNTH_VAL_BYTES), "gpu": (1_000_000_000, 8_388_608)}
REAL_VAL_FRACTION = 0.05  # of a real corpus, the tail held out for validation
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".tex", ".csv", ".json", ".html"}
PARQUET_TEXT_COLUMN = "text"  # the column read from .parquet shards (FineWeb-style)
DOWNLOAD_CHUNK = 1 << 20
TRAIN_DEADLINE_ENV = "LABRAT_DEADLINE"  # unix time (host clock) by which a training run must have exited
ATTAINABLE_SEQ_LENS = tuple(EVAL_SEQ_LENS.values())  # meta.json reports the floor at each evaluation context length
TOKENIZERS = ("bytes", "bpe")
BPE_VOCAB_SIZE = 4096  # the default; the evaluation's answers grow with it (rows x columns x vocabulary floats)
BPE_MAX_VOCAB = 65_536  # ids are stored as uint16
BPE_SAMPLE_CHARS = 64 << 20  # the merges are learnt from at most this much of the training split
BPE_CHUNK_CHARS = 1 << 20  # text is encoded in chunks of this many characters, in parallel
TOKENIZER_FILE = "tokenizer.json"


class DataError(Exception):
    """Missing, empty, corrupt or mismatched data; the message names the file."""


# ---- tokenizer: byte-level, token id == byte value (trainer/contract.py) -----------------------
def encode(text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).copy()


def decode(tokens) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8)).decode("utf-8", errors="replace")


def unigram_bpb(train: np.ndarray, val: np.ndarray, vocab_size: int = VOCAB_SIZE,
                token_bytes: np.ndarray | None = None) -> float:
    """Cross-entropy of `val` under the token frequencies of `train` (add-one smoothed), in bits per byte:
    the baseline to beat."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log2(counts / counts.sum())
    if token_bytes is None:
        return float(-log_p[val].mean())
    return float(-log_p[val].sum() / token_bytes[val].sum())


# ---- tokenizer: byte-level BPE (optional) ------------------------------------------------------
def train_bpe(text: str, vocab_size: int):
    """A byte-level BPE tokenizer learnt from `text` (its first BPE_SAMPLE_CHARS characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    sample = text[:BPE_SAMPLE_CHARS]
    tokenizer.train_from_iterator((sample[i : i + BPE_CHUNK_CHARS] for i in range(0, len(sample), BPE_CHUNK_CHARS)),
                                  trainer)
    return tokenizer


def bpe_encode(tokenizer, text: str) -> np.ndarray:
    chunks = [text[i : i + BPE_CHUNK_CHARS] for i in range(0, len(text), BPE_CHUNK_CHARS)]
    ids = [np.asarray(e.ids, dtype=np.uint16) for e in tokenizer.encode_batch(chunks, add_special_tokens=False)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint16)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """Each id's length in bytes: byte-level BPE writes every byte as one character (GPT-2's table)."""
    return np.array([len(tokenizer.id_to_token(i)) for i in range(tokenizer.get_vocab_size())], dtype=np.int64)


def _bpe_tokens(tokenizer, data: bytes, what: str, token_bytes: np.ndarray) -> np.ndarray:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"the {what} split is not UTF-8 text (byte {exc.start}): BPE needs text; use "
                        "tokenizer = \"bytes\"") from None
    tokens = bpe_encode(tokenizer, text)
    if int(token_bytes[tokens].sum()) != len(data):  # bits per byte divides by these: they must be exact
        raise DataError(f"the BPE tokens of the {what} split cover {int(token_bytes[tokens].sum())} bytes, not "
                        f"{len(data)}: the tokenizer is not lossless on this text")
    return tokens


# ---- real data ---------------------------------------------------------------------------------
def read_text_source(path: Path) -> bytes:
    """The bytes of a text file, or of every text file below a directory (sorted, so splits are stable)."""
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    suffixes = TEXT_SUFFIXES | {".parquet"}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise DataError(f"no text or parquet files ({', '.join(sorted(suffixes))}) under {path}")
    chunks = []
    for file in files:
        data = read_parquet_text(file) if file.suffix == ".parquet" else file.read_bytes()
        if b"\x00" in data[:65536]:
            raise DataError(f"{file} looks binary (NUL bytes), not text")
        if not data.strip():
            raise DataError(f"{file} is empty")
        chunks.append(data)
    return b"\n".join(chunks)


def read_parquet_text(path: Path) -> bytes:
    """The `text` column of a parquet shard, documents joined by newlines (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path} is parquet: install pyarrow (pip install pyarrow) to read it") from None
    try:
        table = pq.read_table(path, columns=[PARQUET_TEXT_COLUMN])
    except Exception as exc:  # pyarrow raises several types for a corrupt file or a missing column
        raise DataError(f"{path} is not a readable parquet shard with a {PARQUET_TEXT_COLUMN!r} column: {exc}") from None
    return "\n".join(str(doc) for doc in table.column(PARQUET_TEXT_COLUMN).to_pylist()).encode("utf-8")


def download(url: str, dest: Path, sha256: str | None, timeout: float = 60.0) -> Path:
    """Fetch `url` into `dest`, resuming a partial download (HTTP Range), verifying the checksum."""
    partial = dest.with_name(dest.name + ".partial")
    if dest.exists() and (sha256 is None or _sha256(dest) == sha256):
        return dest
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            resumed = response.status == 206
            length = response.headers.get("Content-Length")
            expected = (have if resumed else 0) + int(length) if length else None
            with open(partial, "ab" if resumed else "wb") as out:
                while chunk := response.read(DOWNLOAD_CHUNK):
                    out.write(chunk)
        got = partial.stat().st_size
        if expected is not None and got < expected:
            raise DataError(f"downloading {url} failed: connection dropped after {got} of {expected} bytes (rerun to resume)")
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # already complete
            pass
        else:
            raise DataError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DataError(f"downloading {url} failed: {getattr(exc, 'reason', exc)} (rerun to resume)") from None
    if sha256 is not None:
        actual = _sha256(partial)
        if actual != sha256:
            partial.unlink()
            raise DataError(f"checksum mismatch for {url}: expected {sha256}, got {actual}; the partial file was removed")
    partial.rename(dest)
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(DOWNLOAD_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the prepared directory --------------------------------------------------------------------
def prepare(out: Path, data: str = "synthetic", seed: int = 1337, sha256: str | None = None,
            train_bytes: int = SYNTH_TRAIN_BYTES, val_bytes: int = SYNTH_VAL_BYTES, tokenizer: str = "bytes",
            vocab_size: int = BPE_VOCAB_SIZE) -> dict:
    """Write train.bin, val.bin and meta.json (and tokenizer.json, with BPE) into `out`; returns the meta dict."""
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}: expected one of {', '.join(TOKENIZERS)}")
    if tokenizer == "bpe" and not VOCAB_SIZE < vocab_size <= BPE_MAX_VOCAB:
        raise DataError(f"a BPE vocabulary needs more than {VOCAB_SIZE} and at most {BPE_MAX_VOCAB} ids, not {vocab_size}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meta: dict = {"vocab_size": VOCAB_SIZE, "tokenizer": "bytes", "token_dtype": "uint8", "seed": seed}
    if data == "synthetic":
        source = MarkovWordSource.from_seed(seed)
        train = source.sample(train_bytes, seed=seed + 1)
        val = source.sample(val_bytes, seed=seed + 2)  # an independent stream, never seen in training
        attainable = {str(n): list(source.attainable_bpb(n, ATTAINABLE_WINDOWS, seed=seed + 3))
                      for n in ATTAINABLE_SEQ_LENS}  # a third stream, independent of train and val
        meta.update(source="synthetic", floor_bpb=source.floor_bpb, attainable_bpb=attainable)
    else:
        if data.startswith(("http://", "https://")):
            path = download(data, out / Path(data.split("?")[0]).name, sha256)
        else:
            path = Path(data)
        corpus = read_text_source(path)
        n_val = max(1, int(len(corpus) * REAL_VAL_FRACTION))
        if len(corpus) < 1024:
            raise DataError(f"{path} holds only {len(corpus)} bytes; at least 1024 are needed")
        train, val = encode(corpus[:-n_val]), encode(corpus[-n_val:])
        meta.update(source=str(data), floor_bpb=None, attainable_bpb=None)
    meta.update(train_bytes=int(train.size), val_bytes=int(val.size))
    token_bytes = None
    if tokenizer == "bpe":
        bpe = train_bpe(bytes(train).decode("utf-8", errors="replace"), vocab_size)
        token_bytes = token_byte_lengths(bpe)
        train, val = (_bpe_tokens(bpe, bytes(split), what, token_bytes) for split, what in ((train, "training"), (val, "held-out")))
        bpe.save(str(out / TOKENIZER_FILE))
        # The attainable floors above are per context of n *bytes*; n BPE tokens see more. The entropy floor
        # holds for any tokenization (the evaluation falls back to it).
        meta.update(tokenizer="bpe", token_dtype="uint16", vocab_size=bpe.get_vocab_size(), attainable_bpb=None,
                    token_bytes=token_bytes.tolist(), tokenizer_sha256=_sha256(out / TOKENIZER_FILE))
    vocab = meta["vocab_size"]
    meta.update(unigram_bpb=unigram_bpb(train, val, vocab, token_bytes), train_tokens=int(train.size), val_tokens=int(val.size))
    for name, tokens in (("train", train), ("val", val)):
        (out / f"{name}.bin").write_bytes(tokens.tobytes())
        meta[f"{name}_sha256"] = hashlib.sha256(tokens.tobytes()).hexdigest()
    meta["seconds"] = round(time.perf_counter() - started, 3)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_tokens(path: Path, expected_sha256: str | None = None, dtype: str = "uint8") -> np.ndarray:
    """A prepared split as tokens of `dtype` (meta.json's token_dtype); a missing, empty or altered file is one
    clear error."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path} (run `python -m trainer.prepare --out {path.parent}`)")
    data = path.read_bytes()
    if not data:
        raise DataError(f"data file is empty: {path}")
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise DataError(f"data file {path} does not match its checksum in meta.json (corrupt or altered)")
    if len(data) % np.dtype(dtype).itemsize:
        raise DataError(f"data file {path} is not a whole number of {dtype} tokens (corrupt)")
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))


def token_bytes_of(meta: dict) -> np.ndarray | None:
    """Each token id's length in bytes (None for byte tokens: one each)."""
    lengths = meta.get("token_bytes")
    return np.asarray(lengths, dtype=np.int64) if lengths is not None else None


def load_meta(directory: Path) -> dict:
    path = Path(directory) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found (run `python -m trainer.prepare --out {directory}`)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupt: {exc}") from None


# ---- the training budget -----------------------------------------------------------------------
def training_deadline(time_budget: float) -> float:
    """When this training run must have exited, in time.time() seconds: the harness's deadline when it set
    one (it kills the run there: the budget is all-in and the same for every experiment), else
    `time_budget` seconds from now (a bare run)."""
    if value := os.environ.get(TRAIN_DEADLINE_ENV):
        return float(value)
    return time.time() + time_budget


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=os.environ.get("LABRAT_DATA", "synthetic"))
    parser.add_argument("--sha256", default=None, help="expected checksum of a downloaded file")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--train-bytes", type=int, default=SYNTH_TRAIN_BYTES)
    parser.add_argument("--val-bytes", type=int, default=SYNTH_VAL_BYTES)
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="bytes")
    parser.add_argument("--vocab-size", type=int, default=BPE_VOCAB_SIZE, help="BPE vocabulary size (with --tokenizer bpe)")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.out, args.data, args.seed, args.sha256, args.train_bytes, args.val_bytes, args.tokenizer,
                       args.vocab_size)
    except DataError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2
    floor = f", floor {meta['floor_bpb']:.4f} bpb" if meta["floor_bpb"] is not None else ""
    print(f"prepared {meta['train_tokens']} train / {meta['val_tokens']} val tokens in {meta['seconds']} s: "
          f"unigram {meta['unigram_bpb']:.4f} bpb{floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
