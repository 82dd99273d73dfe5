"""The evaluation driver keeps the validation file from the model: METR's pattern, in a real container.

The driver runs as root (no capabilities but SETUID, SETGID and KILL) and holds val.bin readable by root only;
the worker runs the agent's model as the agent's user. A model that reads val.bin from disk is
causal, so the causality probe cannot catch it: the test shows it scores below the source's entropy
floor (impossible honestly) when it can read the file, and learns nothing when it cannot.
"""

import json
from pathlib import Path

import torch

from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox
from tests.conftest import SESSION

MODELS = Path(__file__).parent / "models"
PREPARE = ("python -m trainer.prepare --out /tmp/eval --train-bytes 20000 --val-bytes 60000 >/dev/null"
           " && chmod 700 /tmp/eval && chmod 600 /tmp/eval/*")
EVALUATE = "python -m trainer.evaluate --checkpoint /tmp/ckpt.pt --data /tmp/eval --eval-tokens 4096"


def _peeker_checkpoint(tmp_path: Path) -> bytes:
    path = tmp_path / "peek.pt"
    torch.save({"source": (MODELS / "peeker.py").read_text(), "source_name": "peeker.py",
                "config": {"val_path": "/tmp/eval/val.bin"}, "model": {}}, path)
    return path.read_bytes()


def test_the_model_cannot_read_the_validation_data(image, tmp_path):
    policy = SandboxPolicy(image=image, cap_add=("SETUID", "SETGID", "KILL"))
    with Sandbox.start(policy, session=SESSION, role="eval") as box:
        assert box.exec(PREPARE, user="root", timeout=120).exit_code == 0
        box.exec("cat > /tmp/ckpt.pt && chmod 644 /tmp/ckpt.pt", input=_peeker_checkpoint(tmp_path), user="root")
        floor = json.loads(box.exec("cat /tmp/eval/meta.json", user="root").stdout)["floor_bpb"]
        same_user = box.exec(EVALUATE, user="root", timeout=300)
        isolated = box.exec(EVALUATE + " --worker-user agent", user="root", timeout=300)
        assert box.exec("cat /tmp/eval/val.bin").exit_code != 0  # the agent's user cannot read it
    cheated = json.loads(same_user.stdout.strip().splitlines()[-1])
    blind = json.loads(isolated.stdout.strip().splitlines()[-1])
    assert cheated["causal"] and cheated["val_bpb"] < floor  # the threat is real
    assert blind["causal"] and abs(blind["val_bpb"] - 8.0) < 1e-6  # as another user it knows nothing
