from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from latentddpm.config import ConfigError, config_to_dict, parse_config, save_config


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
