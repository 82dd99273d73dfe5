"""Data and tokenizer for labrat's training core. Fixed: the agent may read this file, never change it.

    python -m trainer.prepare --out data/                  # embedded synthetic corpus (default)
    python -m trainer.prepare --out data/ --data notes/    # local text files or a directory
    python -m trainer.prepare --out data/ --data https://host/shard.parquet --sha256 HEX

Writes `train.bin` and `val.bin` (uint8 byte tokens) and `meta.json` (sizes, checksums, and for
the synthetic source the exact entropy floor and the unigram baseline in bits per byte).

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


class DataError(Exception):
    """Missing, empty, corrupt or mismatched data; the message names the file."""


# ---- tokenizer: byte-level, token id == byte value (trainer/contract.py) -----------------------
def encode(text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).copy()


def decode(tokens) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8)).decode("utf-8", errors="replace")


def unigram_bpb(train: np.ndarray, val: np.ndarray) -> float:
    """Cross-entropy of `val` under the byte frequencies of `train` (add-one smoothed): the baseline to beat."""
    counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    log_p = np.log2(counts / counts.sum())
    return float(-log_p[val].mean())


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
            train_bytes: int = SYNTH_TRAIN_BYTES, val_bytes: int = SYNTH_VAL_BYTES) -> dict:
    """Write train.bin, val.bin and meta.json into `out`; returns the meta dict."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meta: dict = {"vocab_size": VOCAB_SIZE, "tokenizer": "bytes", "seed": seed}
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
    meta.update(unigram_bpb=unigram_bpb(train, val), train_tokens=int(train.size), val_tokens=int(val.size))
    for name, tokens in (("train", train), ("val", val)):
        (out / f"{name}.bin").write_bytes(tokens.tobytes())
        meta[f"{name}_sha256"] = hashlib.sha256(tokens.tobytes()).hexdigest()
    meta["seconds"] = round(time.perf_counter() - started, 3)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_tokens(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """A prepared split as uint8 tokens; a missing, empty or altered file is one clear error."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path} (run `python -m trainer.prepare --out {path.parent}`)")
    data = path.read_bytes()
    if not data:
        raise DataError(f"data file is empty: {path}")
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise DataError(f"data file {path} does not match its checksum in meta.json (corrupt or altered)")
    return np.frombuffer(data, dtype=np.uint8)


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
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.out, args.data, args.seed, args.sha256, args.train_bytes, args.val_bytes)
    except DataError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2
    floor = f", floor {meta['floor_bpb']:.4f} bpb" if meta["floor_bpb"] is not None else ""
    print(f"prepared {meta['train_tokens']} train / {meta['val_tokens']} val tokens in {meta['seconds']} s: "
          f"unigram {meta['unigram_bpb']:.4f} bpb{floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
