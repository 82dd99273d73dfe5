"""labrat init and labrat.toml validation: real files, one-line errors naming the key."""

import pytest

from harness.config import NEW_LAB_SETTINGS, ConfigError, LabConfig, load_config
from harness.lab import LEDGER_FILE, PROGRAM_FILE, init_lab


def test_init_writes_a_loadable_config_program_and_ledger(tmp_path):
    lab = tmp_path / "my-lab"
    init_lab(lab)
    assert load_config(lab) == LabConfig(**NEW_LAB_SETTINGS)  # a new lab's defaults: the significant keep rule
    assert "val_bpb" in (lab / PROGRAM_FILE).read_text()
    assert (lab / LEDGER_FILE).exists()
    with pytest.raises(ConfigError, match="already exists"):
        init_lab(lab)


@pytest.mark.parametrize(("text", "message"), [
    ("time_budget = -5", "time_budget: Input should be greater than 0"),
    ("agent = 'gpt'", "agent: Input should be 'offline' or 'claude'"),
    ("budget = 30", "budget: Extra inputs are not permitted"),
    ("time_budget = ", "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    (tmp_path / "labrat.toml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_config(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="labrat init"):
        load_config(tmp_path / "nowhere")


def test_cli_init_and_its_one_line_refusal(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    labrat = str(Path(sys.executable).parent / "labrat")
    first = subprocess.run([labrat, "init", str(tmp_path / "lab")], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "lab ready" in first.stdout
    again = subprocess.run([labrat, "init", str(tmp_path / "lab")], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert again.stderr.strip().startswith("labrat: error:") and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_a_gpu_lab_gets_the_gpu_size_class_defaults_unless_it_sets_them(tmp_path):
    # 4 GB could not hold CUDA and inductor's compile workers; 131k held-out tokens at seq 2048 give a
    # standard error (~0.0035 bpb) larger than most improvements.
    (tmp_path / "labrat.toml").write_text('trainer_config = "gpu"\nmemory_gb = 12\n')
    config = load_config(tmp_path)
    assert config.memory_gb == 12  # what the lab says wins
    assert (config.time_budget, config.eval_tokens) == (300.0, 2_097_152)
    assert LabConfig().memory_gb == 4.0 and LabConfig().eval_tokens == 131_072  # cpu-tiny unchanged

