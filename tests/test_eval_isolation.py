"""The held-out data never enter a container: the evaluation's workers, run by the harness.s own LocalExecutor
in their real containers, hunt their file systems for it and find nothing to use.

Where the file can be read (the same model bare, in tests/test_evaluator.py), a causal model that reads
it scores below what any model can attain; here it must learn nothing at all.
"""

from pathlib import Path

import torch

from harness.config import LabConfig
from harness.data import ensure_data
from harness.runner import LocalExecutor, TrainingResult
from sandbox.snapshots import SnapshotStore
from tests.conftest import SESSION
from trainer import evaluate as ev

MODELS = Path(__file__).parent / "models"


def test_the_evaluation_workers_hold_no_held_out_data(image, tmp_path):
    config = LabConfig(eval_tokens=4096)
    runner = LocalExecutor(config, image, ensure_data(tmp_path / "lab", config), SnapshotStore(), SESSION)
    ckpt = tmp_path / "hunter.pt"
    torch.save({"source": (MODELS / "hunter.py").read_text(), "source_name": "hunter.py", "config": {},
                "model": {"anchor": torch.zeros(())}}, ckpt)
    trained = TrainingResult(status="ok", log_tail="", seconds=0.0, peak_memory_bytes=None,
                             checkpoint=ev.Checkpoint.from_file(ckpt))
    evaluated = runner.evaluate(trained)
    assert evaluated.ok, evaluated.reason
    assert evaluated.metric >= 8.0 - 1e-6  # uniform: nothing it found told it anything
    assert evaluated.result["causal"] and evaluated.result["rows"] == 32
