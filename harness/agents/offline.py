"""The offline agent: a seeded hill climb over train.py's knobs, with no API key and no network.

It works through the same tools as a language model: it views trainer/train.py with the editor,
rewrites one knob of the lab's config block with str_replace, and calls run_experiment. The
harness keeps or discards the result exactly as for any other agent. The search repeats a move
that was just kept (momentum), never retries a move already tried from the same base, and
prefers the matrices' learning rate, the knob that matters most at small budgets.
"""

from __future__ import annotations

import ast
import random
import re

import structlog

from harness.config import LabConfig
from harness.session import LabView
from harness.tools import Toolbox

log = structlog.get_logger(__name__)

TRAIN_FILE = "trainer/train.py"
# knob -> (moves as multipliers or absolute candidates, lower bound, upper bound, prior weight)
MOVES: dict[str, tuple[tuple[float, ...], float, float, float]] = {
    "matrix_lr": ((2.0, 0.5), 1e-3, 0.2, 3.0),  # Muon's rate for the blocks' matrices
    "embed_lr": ((2.0, 0.5), 1e-2, 2.0, 1.0),
    "head_lr": ((2.0, 0.5), 1e-4, 0.1, 1.0),
    "batch_size": ((2.0, 0.5), 4, 128, 1.0),
    "n_embd": ((1.5, 2 / 3), 32, 512, 1.0),
    "n_layer": ((+1, -1), 1, 8, 1.0),
    "warmdown_frac": ((0.2, 0.35, 0.5, 0.7), 0.0, 1.0, 0.5),
    "final_lr_frac": ((0.0, 0.05, 0.2), 0.0, 0.5, 0.5),
    "mlp_ratio": ((2, 3, 4, 6), 1, 8, 0.5),
}
ADDITIVE = {"n_layer"}
ABSOLUTE = {"warmdown_frac", "final_lr_frac", "mlp_ratio"}
DESCRIPTION = re.compile(r"^(\w+): (\S+) -> (\S+)")


def _block(source: str, config_name: str) -> tuple[str, dict]:
    """The text of CONFIGS[config_name] = dict(...) in train.py, and its parsed knobs."""
    match = re.search(rf'"{re.escape(config_name)}":\s*dict\((.*?)\),\s*\n', source, re.S)
    if not match:
        raise ValueError(f"no {config_name!r} config block in {TRAIN_FILE}")
    knobs = {}
    for name, value in re.findall(r"(\w+)=([^,\n]+)", match.group(1)):
        try:
            knobs[name] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            continue
    return match.group(0), knobs


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else repr(value)


class OfflineAgent:
    name = "offline"
    model = None

    def __init__(self, config: LabConfig, lane: int = 0):
        self.config = config
        self.lane = lane  # lanes are hill climbers with different seeds

    def run(self, toolbox: Toolbox, lab: LabView) -> str:
        while not (reason := lab.stop_reason()):
            if lab.base is None and not any(e.metric is not None for e in lab.experiments()):
                toolbox.call("run_experiment", {"description": "baseline: train.py as shipped"})
                continue
            if failure := self._step(toolbox, lab):
                return failure
        return reason

    def _step(self, toolbox: Toolbox, lab: LabView) -> str | None:
        """One edit and its experiment; or why the agent cannot go on."""
        view = toolbox.call("str_replace_based_edit_tool", {"command": "view", "path": TRAIN_FILE})
        if view.is_error:
            return f"offline agent cannot read {TRAIN_FILE}: {view.text[:200]}"
        source = "\n".join(line.split("\t", 1)[1] if "\t" in line else "" for line in view.text.splitlines()) + "\n"
        try:
            block, knobs = _block(source, self.config.trainer_config)
        except ValueError as exc:
            return f"offline agent: {exc}"
        move = self._choose(lab, knobs)
        if move is None:
            return "offline agent: every move from the current base has been tried"
        knob, old, new = move
        new_block = re.sub(rf"\b{knob}=[^,\n]+", f"{knob}={_fmt(new)}", block, count=1)
        edit = toolbox.call("str_replace_based_edit_tool",
                            {"command": "str_replace", "path": TRAIN_FILE, "old_str": block, "new_str": new_block})
        if edit.is_error:
            return f"offline agent could not edit {TRAIN_FILE}: {edit.text[:200]}"
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
        direction = ("larger" if new > old else "smaller") if numeric else "different"
        toolbox.call("run_experiment", {"description": f"{knob}: {_fmt(old)} -> {_fmt(new)}",
                                        "hypothesis": f"a {direction} {knob} trains better in this budget "
                                                      "(a hill-climbing step; no expectation of its size)"})
        return None

    def _choose(self, lab: LabView, knobs: dict) -> tuple[str, object, object] | None:
        experiments = [e for e in lab.experiments() if e.replicate_of is None]  # its own moves, not the reruns
        base_id = lab.base_id
        # Deterministic, also across a resume; each lane draws its own moves (lane 0 as a lab without lanes).
        rng = random.Random(f"{self.config.seed}:{len(experiments)}" + (f":lane{self.lane}" if self.lane else ""))
        tried = {m.groups()[::2] for e in experiments if e.parent_id == base_id and (m := DESCRIPTION.match(e.description))}
        candidates: list[tuple[float, tuple[str, object, object]]] = []
        for knob, (moves, low, high, weight) in MOVES.items():
            if knob not in knobs:
                continue
            old = knobs[knob]
            for move in moves:
                if knob in ABSOLUTE:
                    new = move
                elif knob in ADDITIVE:
                    new = old + move
                else:
                    new = old * move
                if isinstance(old, int) and not isinstance(old, bool):
                    new = int(round(new))
                if knob == "n_embd":  # heads must split it into an even head dimension (RoPE)
                    step = 2 * knobs.get("n_head", 1)
                    new = max(step, int(round(new / step)) * step)
                if new == old or not low <= new <= high or (knob, _fmt(new)) in tried:
                    continue
                candidates.append((weight, (knob, old, new)))
        if not candidates:
            return None
        last = experiments[-1] if experiments else None
        if last and last.status == "keep" and (m := DESCRIPTION.match(last.description)):
            # Momentum: a move that just paid off is tried once more in the same direction.
            knob, before, after = m.groups()
            for _, (k, old, new) in candidates:
                if k == knob and (new > old) == (float(after) > float(before)) and k not in ABSOLUTE:
                    return k, old, new
        weights = [w for w, _ in candidates]
        return rng.choices([c for _, c in candidates], weights=weights, k=1)[0]
