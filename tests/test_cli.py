"""The `latentddpm` command line: one flag convention, `--help` for every command, exit codes, the demo's stages."""

import os
import re
import subprocess
import sys

import pytest
import yaml

from latentddpm.cli import COMMANDS, _underscore_keys, main, run_main
from latentddpm.config import ConfigError, parse_config
from latentddpm.configs import config_path
from latentddpm.runs import Preempted
from latentddpm.training.demo import DemoConfig, stage_arguments
from latentddpm.training.train_ldm import TrainLDMConfig
from latentddpm.training.train_vae import TrainVAEConfig


def help_text(argv: list[str], capsys) -> str:
    """What `latentddpm ARGV` prints for help, whether argparse prints it or `parse_config` exits with it."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return captured.out + captured.err + (exit_info.value.code if isinstance(exit_info.value.code, str) else "")


def test_help_lists_every_command_with_one_line(capsys):
    text = help_text(["--help"], capsys)
    for name, command in COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(command.__doc__.splitlines()[0])}$", text, re.MULTILINE)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_help_uses_underscore_keys(command, capsys):
    flags = re.findall(r"--[\w.\-]+", help_text([command, "--help"], capsys))
    keys = [flag for flag in flags if flag != "--help" and flag != "--config"]
    assert len(keys) >= 3
    assert [flag for flag in keys if not re.fullmatch(r"--[a-z0-9_]+", flag)] == []


def test_dashes_in_keys_are_aliases_and_values_are_untouched():
    argv = ["--negative-prompt", "a well-lit room", "--num-images=2", "--prompt", "--x-y"]
    assert _underscore_keys(argv) == ["--negative_prompt", "a well-lit room", "--num_images=2", "--prompt", "--x_y"]


def test_run_main_exits_2_with_one_line_on_a_config_error(capsys):
    def bad(argv):
        raise ConfigError("Config key 'steps' must be > 0, got 0.")

    with pytest.raises(SystemExit) as exit_info:
        run_main(bad, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: Config key 'steps' must be > 0, got 0.\n"


def test_run_main_exits_0_when_preempted():
    def preempted(argv):
        raise Preempted("checkpoint-7 saved")

    with pytest.raises(SystemExit) as exit_info:
        run_main(preempted, None)
    assert exit_info.value.code == 0


def test_run_main_lets_other_exceptions_through_and_passes_argv():
    seen = []

    def crash(argv):
        seen.append(argv)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run_main(crash, ["--a", "1"])
    assert seen == [["--a", "1"]]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "latentddpm.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_a_config_error_prints_one_line_and_exits_2():
    result = run_cli("evaluate", "--model", "unused", "--steps", "0")
    assert result.returncode == 2
    assert result.stderr == "error: Config key 'steps' must be positive integers, got [0].\n"


def test_a_crash_exits_1_with_its_traceback(tmp_path):
    result = run_cli("sample", "--model", str(tmp_path), "--prompt", "a red circle")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "model_index.json" in result.stderr


# --- the demo's stages ---------------------------------------------------------------------------------------------


def test_demo_stages_without_overrides_are_the_shipped_configs_in_the_demo_folders(tmp_path):
    vae = parse_config(TrainVAEConfig, stage_arguments("shapes_vae.yaml", None, {"output_dir": tmp_path / "vae"}))
    assert vae == parse_config(
        TrainVAEConfig, ["--config", str(config_path("shapes_vae.yaml")), "--output_dir", str(tmp_path / "vae")]
    )
    demo_keys = {"unet_config": config_path("unet/shapes.json"), "vae": tmp_path / "vae", "cache_dir": tmp_path}
    ldm = parse_config(TrainLDMConfig, stage_arguments("shapes_ldm.yaml", None, demo_keys))
    assert (ldm.unet_config, ldm.vae, ldm.cache_dir) == (
        str(config_path("unet/shapes.json")),
        str(tmp_path / "vae"),
        str(tmp_path),
    )
    assert ldm.max_train_steps == yaml.safe_load(config_path("shapes_ldm.yaml").read_text())["max_train_steps"]


def test_demo_override_files_beat_the_shipped_config_and_the_demo_keys(tmp_path):
    override = tmp_path / "vae.yaml"
    override.write_text("max_train_steps: 7\noutput_dir: elsewhere\n")
    argv = stage_arguments("shapes_vae.yaml", str(override), {"output_dir": tmp_path / "vae"})
    vae = parse_config(TrainVAEConfig, argv)
    assert (vae.max_train_steps, vae.output_dir) == (7, "elsewhere")
    assert vae.learning_rate == yaml.safe_load(config_path("shapes_vae.yaml").read_text())["learning_rate"]


def test_demo_rejects_a_missing_override_file():
    with pytest.raises(ConfigError, match="'ldm_config': no file 'missing.yaml'"):
        parse_config(DemoConfig, ["--ldm_config", "missing.yaml"])


def test_a_resume_path_that_is_no_checkpoint_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "latentddpm.cli", "train-ldm", "--vae", str(tmp_path), "--resume_from_checkpoint",
         str(tmp_path / "nope")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: resume_from_checkpoint={str(tmp_path / 'nope')!r} is not a complete checkpoint (no "
        "training_state.json). Complete checkpoints: []"
    ]
