"""train.py's device handling, loader and MFU, on the CPU (CI has no GPU): device strings, the exact-SKU
peak table, the uint8 loader, knob overrides, deterministic mode's CUDA settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import hardware
from trainer import train as tr

ROOT = Path(__file__).parent.parent


# ---- MFU: the exact SKU's dense bf16 peak, or none -------------------------------------------------
@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0),
])
def test_each_sku_has_its_own_peak(name, tflops):
    assert hardware.dense_bf16_peak(name) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA H100", "H100 PCIe", "NVIDIA H100 PCIe-ish", "NVIDIA GeForce RTX 4090", "cpu", ""])
def test_a_device_not_named_exactly_gets_no_mfu(name):
    # Substring matching counted an H100 PCIe as an SXM (989 instead of 756 TFLOP/s): a guess is worse than none.
    assert hardware.dense_bf16_peak(name) is None
    assert hardware.mfu(1e6, 1e9, name) is None


def test_mfu_is_achieved_flops_over_the_peak():
    assert hardware.mfu(1.53e6, 239.1e6, "NVIDIA H100 80GB HBM3") == pytest.approx(1.53e6 * 239.1e6 / 989.4e12)
    assert hardware.mfu(1.53e6, 239.1e6, "NVIDIA H100 PCIe") > hardware.mfu(1.53e6, 239.1e6, "NVIDIA H100 80GB HBM3")


# ---- the loader keeps the stored dtype ---------------------------------------------------------------
def test_the_loader_gathers_windows_from_the_uint8_split_without_widening_it():
    tokens = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8)
    batches = tr.Batches(tokens, batch_size=8, seq_len=32, seed=3, device=torch.device("cpu"))
    assert batches.data.dtype == torch.uint8 and batches.data.data_ptr() == tokens.ctypes.data  # no copy at all
    inputs, targets = next(batches)
    assert inputs.shape == targets.shape == (8, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    haystack = tokens.tobytes()
    for row_in, row_out in zip(inputs, targets, strict=True):
        window = bytes(row_in.tolist()) + bytes([row_out[-1]])
        assert window in haystack  # a real window of the split, shifted by one token
    again = tr.Batches(tokens, batch_size=8, seq_len=32, seed=3, device=torch.device("cpu"))
    assert torch.equal(next(again)[0], inputs)  # the seed fixes the windows


def test_the_loader_keeps_bpe_ids_in_two_bytes_and_gives_them_back_whole():
    """uint16 ids are held as int16 (a dtype every device gathers) and unmasked after the gather: ids of
    32768 and above come back as themselves, not negative."""
    tokens = np.random.default_rng(1).integers(0, 65_536, 50_000, dtype=np.uint16)
    tokens[:40] = [65_535, 32_768, 32_767, 0] * 10
    batches = tr.Batches(tokens, batch_size=64, seq_len=16, seed=5, device=torch.device("cpu"))
    assert batches.data.dtype == torch.int16 and batches.data.data_ptr() == tokens.ctypes.data
    inputs, targets = next(batches)
    assert inputs.min() >= 0 and inputs.max() < 65_536 and inputs.max() >= 32_768
    starts = [int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(tokens, 16) == row.numpy(), axis=1))[0])
              for row in inputs[:4]]
    for start, row_out in zip(starts, targets[:4], strict=True):
        assert np.array_equal(tokens[start + 1 : start + 17], row_out.numpy())  # a real window, shifted by one
    assert torch.equal(batches.data[:4].long() & 0xFFFF, torch.tensor([65_535, 32_768, 32_767, 0]))


def test_a_memory_mapped_split_is_not_loaded_whole(tmp_path):
    path = tmp_path / "train.bin"
    np.random.default_rng(1).integers(0, 256, 64 << 20, dtype=np.uint8).tofile(path)
    probe = (
        "import resource, sys, numpy as np, torch\n"
        "from trainer import train as tr\n"
        "tokens = np.memmap(sys.argv[1], dtype=np.uint8, mode='c')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "b = tr.Batches(tokens, 16, 128, 0, torch.device('cpu'))\n"
        "for _ in range(50): next(b)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 16 << 20  # 50 batches touch ~800 pages of a 64 MiB split, not all of it (int64: 512 MiB)


# ---- devices, knobs, deterministic mode ---------------------------------------------------------------
def _train_cli(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.train", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("device", "message"), [
    ("cuda:1", "--device cuda:1: this machine has 0 CUDA device(s)"),
    ("cuda", "--device cuda: this machine has 0 CUDA device(s)"),
    ("tpu", "--device tpu"),
])
def test_a_device_this_machine_lacks_is_one_line(tmp_path, device, message):
    done = _train_cli(tmp_path, "--device", device)
    assert done.returncode == 2 and message in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


def test_knob_overrides_are_checked_and_typed():
    cfg = dict(tr.CONFIGS["gpu"])
    assert tr.parse_setting("n_layer=2", cfg) == ("n_layer", 2)
    assert tr.parse_setting("compile=false", cfg) == ("compile", False)
    assert tr.parse_setting("dtype=float32", cfg) == ("dtype", "float32")
    with pytest.raises(ValueError, match="key one of"):
        tr.parse_setting("n_layers=2", cfg)
    with pytest.raises(ValueError, match="expected key=value"):
        tr.parse_setting("n_layer", cfg)


def test_deterministic_mode_fixes_cublas_before_cuda_starts(tmp_path):
    # cuBLAS raises at the first matmul under use_deterministic_algorithms unless its workspace is fixed
    # before CUDA initialises; train() sets it. (Bit-identical reruns on CPU: test_trainer.py.)
    probe = (
        "import json, os, sys, numpy as np\n"
        "from pathlib import Path\n"
        "from trainer import train as tr\n"
        "os.environ.pop('CUBLAS_WORKSPACE_CONFIG', None)\n"
        "cfg = dict(tr.CONFIGS['cpu-tiny'], n_layer=1, n_embd=32, n_head=2, seq_len=16, batch_size=2)\n"
        "tokens = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)\n"
        "s = tr.train(cfg, tokens, Path(sys.argv[1]), 'cpu', steps=2, deterministic=True)\n"
        "print(json.dumps([os.environ.get('CUBLAS_WORKSPACE_CONFIG'), s['deterministic'], s['compiled']]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CUBLAS_WORKSPACE_CONFIG": ""})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [":4096:8", True, False]
