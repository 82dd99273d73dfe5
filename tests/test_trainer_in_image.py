"""The training core runs the same bare on the host and inside the CPU sandbox image."""

import subprocess
import sys
from pathlib import Path

from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox
from tests.conftest import SESSION

ROOT = Path(__file__).parent.parent
RUN = ("python -m trainer.prepare --out {d} --train-bytes 300000 --val-bytes 40000 >/dev/null"
       " && python -m trainer.train --config cpu-tiny --data {d} --out {o} --deterministic --steps 6 >/dev/null"
       " && python -c \"import hashlib, torch; s = torch.load('{o}/ckpt.pt', weights_only=True)['model'];"
       " print(hashlib.sha256(b''.join(t.numpy().tobytes() for t in s.values())).hexdigest())\""
       " && python -m trainer.evaluate --checkpoint {o}/ckpt.pt --data {d} --eval-tokens 4096 --seed 5eed")  # the same secret draws on both sides


def test_bare_and_in_container_give_bit_identical_results(image, tmp_path):
    bare = subprocess.run(["bash", "-c", RUN.format(d=tmp_path / "data", o=tmp_path / "out").replace(
        "python ", f"{sys.executable} ")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bare.returncode == 0, bare.stderr
    with Sandbox.start(SandboxPolicy(image=image), session=SESSION) as box:
        inside = box.exec(RUN.format(d="/tmp/data", o="/tmp/out"), timeout=600)
    assert inside.exit_code == 0, inside.stderr
    digest_bare, result_bare = bare.stdout.strip().splitlines()[-2:]
    digest_inside, result_inside = inside.stdout.strip().splitlines()[-2:]
    assert digest_bare == digest_inside
    assert '"val_bpb"' in result_bare
    assert result_bare.split('"seconds"')[0] == result_inside.split('"seconds"')[0]
