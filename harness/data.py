"""The lab's data, prepared on the host by the harness's own trainer/prepare.py.

Two directories, because they reach containers in different ways:

* `data/train/` (train.bin, meta.json without the held-out checksum, and tokenizer.json with BPE) is
  bind-mounted read-only at /data into the working and training containers;
* `data/heldout/` (val.bin, meta.json) never enters any container: the evaluation's driver runs in
  the harness and sends its workers input batches only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel

from harness.config import LabConfig
from trainer.prepare import SYNTH_BYTES, TOKENIZER_FILE, DataError, load_meta, prepare

DATA_DIR = "data"
KEY_FILE = "key.json"


class PreparedData(BaseModel):
    train_dir: Path
    heldout_dir: Path
    meta: dict

    @property
    def floor_bpb(self) -> float | None:
        return self.meta.get("floor_bpb")


def ensure_data(lab: Path, config: LabConfig, on_step=lambda line: None) -> PreparedData:
    """Prepare the lab's data once (again only when `data`, `data_sha256` or `seed` change)."""
    root = Path(lab) / DATA_DIR
    train_bytes, val_bytes = SYNTH_BYTES[config.trainer_config]
    key = {"data": config.data, "sha256": config.data_sha256, "seed": config.seed}
    if config.data == "synthetic" and config.trainer_config != "cpu-tiny":  # (cpu-tiny labs keep their old key)
        key["synthetic_bytes"] = [train_bytes, val_bytes]
    if config.tokenizer != "bytes":  # (byte labs keep their old key)
        key.update(tokenizer=config.tokenizer, vocab_size=config.vocab_size)
    train_dir, heldout_dir = root / "train", root / "heldout"
    key_file = root / KEY_FILE
    if not (key_file.exists() and json.loads(key_file.read_text()) == key and (heldout_dir / "val.bin").exists()):
        on_step(f"preparing data: {config.data}")
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as scratch:
            try:
                meta = prepare(Path(scratch), config.data, config.seed, config.data_sha256, train_bytes, val_bytes,
                               config.tokenizer, config.vocab_size)
            except DataError as exc:
                raise DataError(f"data = {config.data!r}: {exc}") from None
            for directory in (train_dir, heldout_dir):
                shutil.rmtree(directory, ignore_errors=True)
                directory.mkdir()
            os.replace(Path(scratch) / "train.bin", train_dir / "train.bin")
            os.replace(Path(scratch) / "val.bin", heldout_dir / "val.bin")
            if (Path(scratch) / TOKENIZER_FILE).exists():
                shutil.copy(Path(scratch) / TOKENIZER_FILE, heldout_dir / TOKENIZER_FILE)
                os.replace(Path(scratch) / TOKENIZER_FILE, train_dir / TOKENIZER_FILE)
            public = {k: v for k, v in meta.items() if not k.startswith("val_")}
            (train_dir / "meta.json").write_text(json.dumps(public, indent=2))
            (heldout_dir / "meta.json").write_text(json.dumps(meta, indent=2))
        key_file.write_text(json.dumps(key))
    # The agent's uid reads the training split through the bind mount; nobody else needs the held-out one.
    train_dir.chmod(0o755)
    for path in train_dir.iterdir():
        path.chmod(0o644)
    heldout_dir.chmod(0o700)
    return PreparedData(train_dir=train_dir.resolve(), heldout_dir=heldout_dir.resolve(), meta=load_meta(heldout_dir))
