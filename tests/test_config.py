from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from latentddpm.config import (
    ConfigError,
    config_file,
    config_to_dict,
    fraction,
    non_negative,
    parse_config,
    positive,
    save_config,
)
from latentddpm.configs import config_path
from latentddpm.training.train_ldm import TrainLDMConfig, build_noise_scheduler


@dataclass
class ToyConfig:
    learning_rate: float = 1e-3
    max_train_steps: int = 10
    use_ema: bool = True
    snr_gamma: float | None = 5.0
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    prompts: list[str] = field(default_factory=list)

    def validate(self):
        if self.max_train_steps <= 0:
            raise ConfigError(f"Config key 'max_train_steps' must be > 0, got {self.max_train_steps}.")


def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"learning_rate": 0.5, "max_train_steps": 3, "prompts": ["a", "b"]}))
    config = parse_config(ToyConfig, ["--config", str(path), "--max_train_steps", "7", "--use-ema", "false"])
    assert config.learning_rate == 0.5
    assert config.max_train_steps == 7
    assert config.use_ema is False
    assert config.prompts == ["a", "b"]


def test_values_are_converted_to_the_declared_types():
    config = parse_config(
        ToyConfig, ["--snr_gamma", "none", "--prediction_type", "v_prediction", "--prompts", "x,y", "--use_ema"]
    )
    assert config.snr_gamma is None
    assert config.prediction_type == "v_prediction"
    assert config.prompts == ["x", "y"]
    assert config.use_ema is True


def test_unknown_key_suggests_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match="Unknown config key 'learning_rte'.*Did you mean 'learning_rate'"):
        parse_config(ToyConfig, ["--learning_rte", "1"])
    path = tmp_path / "c.yaml"
    path.write_text("max_train_step: 3\n")
    with pytest.raises(ConfigError, match="max_train_step.*Did you mean 'max_train_steps'"):
        parse_config(ToyConfig, ["--config", str(path)])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max_train_steps", "ten"], "'max_train_steps' must be an int"),
        (["--learning_rate", "fast"], "'learning_rate' must be a float"),
        (["--use_ema", "maybe"], "'use_ema' must be a bool"),
        (["--prediction_type", "x0"], r"'prediction_type' must be one of \['epsilon', 'v_prediction'\]"),
        (["--max_train_steps", "0"], "'max_train_steps' must be > 0"),
    ],
)
def test_bad_values_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(ToyConfig, args)


def test_saved_config_reproduces_the_run(tmp_path):
    config = parse_config(ToyConfig, ["--learning_rate", "0.25", "--prompts", "a,b", "--snr_gamma", "none"])
    save_config(config, tmp_path / "config.yaml")
    assert parse_config(ToyConfig, ["--config", str(tmp_path / "config.yaml")]) == config
    assert config_to_dict(config)["prompts"] == ["a", "b"]


@dataclass
class RangedConfig:
    batch: int = positive(4)
    warmup: int = non_negative(0)
    dropout: float = fraction(0.1)
    limit: int | None = positive(None)
    unet: str = config_file("configs/unet/tiny.json")
    section: dict = field(default_factory=dict)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "0"], "'batch' must be > 0, got 0"),
        (["--warmup", "-1"], "'warmup' must be >= 0, got -1"),
        (["--dropout", "1"], r"'dropout' must be in \[0, 1\), got 1.0"),
        (["--limit", "-3"], "'limit' must be > 0"),
        (["--unet", "no/such.json"], "'unet': no such file 'no/such.json'"),
        (["--section", "[1, 2]"], "'section' must be a mapping"),
    ],
)
def test_ranges_declared_on_the_fields_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(RangedConfig, args)


def test_shipped_config_files_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    config = parse_config(RangedConfig, ["--limit", "none"])
    assert Path(config.unet) == config_path("unet/tiny.json")
    assert parse_config(RangedConfig, ["--unet", "unet/small.json"]).unet == str(config_path("unet/small.json"))
    ldm = parse_config(TrainLDMConfig, ["--config", "configs/shapes_ldm.yaml"])
    assert ldm.unet_config == str(config_path("unet/shapes.json"))


def test_a_config_file_extends_another_and_sections_merge_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("batch: 8\nwarmup: 2\nsection: {a: 1, b: 2}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nwarmup: 5\nsection: {b: 3}\n")
    config = parse_config(RangedConfig, ["--config", str(tmp_path / "child.yaml"), "--section", "{c: 4}"])
    assert (config.batch, config.warmup) == (8, 5)
    assert config.section == {"a": 1, "b": 3, "c": 4}
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        parse_config(RangedConfig, ["--config", str(tmp_path / "loop.yaml")])


def test_shipped_cifar10_configs_are_the_shapes_recipe_on_other_data():
    shapes = parse_config(TrainLDMConfig, ["--config", "configs/shapes_ldm.yaml"])
    cifar = parse_config(TrainLDMConfig, ["--config", "configs/cifar10_ldm.yaml"])
    assert cifar.noise_scheduler == shapes.noise_scheduler and cifar.learning_rate == shapes.learning_rate
    assert cifar.dataset.endswith("cifar10/train.parquet") and cifar.train_batch_size == 64


@pytest.mark.parametrize(
    "section, message",
    [
        ("{prediction_typ: epsilon}", r"'noise_scheduler' has unknown keys \['prediction_typ'\]"),
        ("{prediction_type: x0}", "'noise_scheduler': prediction_type 'x0' is not supported"),
        ("{beta_schedule: quadratic}", "'noise_scheduler': beta_schedule 'quadratic' is not supported"),
    ],
)
def test_noise_scheduler_section_is_checked_by_the_scheduler(section, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainLDMConfig, ["--config", "configs/shapes_ldm.yaml", "--noise_scheduler", section])


def test_noise_scheduler_section_overrides_the_new_model_schedule():
    config = parse_config(
        TrainLDMConfig, ["--config", "configs/shapes_ldm.yaml", "--noise_scheduler", "{prediction_type: epsilon}"]
    )
    scheduler = build_noise_scheduler(config)
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2" and scheduler.config.clip_sample is False


def test_key_equals_value_keeps_the_dashes_of_the_value(tmp_path):
    config = parse_config(RangedConfig, [f"--unet={config_path('unet/tiny.json')}", "--section={a-b: c-d}"])
    assert config.unet == str(config_path("unet/tiny.json")) and config.section == {"a-b": "c-d"}
    assert parse_config(ToyConfig, ["--prompts=a-b,c-d"]).prompts == ["a-b", "c-d"]
