"""Typed script configs: a dataclass, filled from a YAML file and then `--key value` overrides.

Every training script declares one dataclass whose fields are its settings. `parse_config` reads
`--config file.yaml` first, then applies `--key value` pairs from the command line, converting each value
to the field's declared type. Unknown keys and values of the wrong type are errors that name the key (and
suggest the closest valid one), raised before any data is read. A config's own `validate()` checks ranges.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

ConfigT = TypeVar("ConfigT")


class ConfigError(ValueError):
    """A config key or value that cannot be used. Raised before any work starts."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key_error(key: str, valid: list[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"Unknown config key '{key}' in {source}.{hint} Valid keys: {', '.join(sorted(valid))}.")


def check_ranges(
    config: Any,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    unit_interval: tuple[str, ...] = (),
) -> None:
    """Raise `ConfigError` naming the first key out of range: `positive` > 0, `non_negative` >= 0, `unit_interval`
    in [0, 1). `None` (an optional setting switched off) is always in range."""
    for name in positive + non_negative + unit_interval:
        value = getattr(config, name)
        if value is None:
            continue
        if name in positive and value <= 0:
            allowed = "> 0"
        elif name in non_negative and value < 0:
            allowed = ">= 0"
        elif name in unit_interval and not 0 <= value < 1:
            allowed = "in [0, 1)"
        else:
            continue
        raise ConfigError(f"Config key '{name}' must be {allowed}, got {value}.")


def convert_value(key: str, value: Any, annotation: Any) -> Any:
    """Convert `value` (from YAML or a command-line string) to `annotation`, or raise `ConfigError` naming `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_value(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"Config key '{key}': {value!r} matches none of {annotation}.")

    if origin is Literal:
        if value in args:
            return value
        if isinstance(value, str):
            for arg in args:
                if str(arg) == value:
                    return arg
        raise ConfigError(f"Config key '{key}' must be one of {list(args)}, got {value!r}.")

    if origin in (list, tuple):
        if isinstance(value, str):
            # Command line: "a,b,c" or a YAML flow list "[a, b]".
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Config key '{key}' must be a list, got {value!r}.")
        item_type = args[0] if args else Any
        items = [convert_value(key, v, item_type) for v in value]
        return items if origin is list else tuple(items)

    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"Config key '{key}' must be a bool (true/false), got {value!r}.")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"Config key '{key}' must be an int, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"Config key '{key}' must be an int, got {value!r}.")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"Config key '{key}' must be a float, got {value!r}.")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"Config key '{key}' must be a string, got {value!r}.")
    raise ConfigError(f"Config key '{key}' has an unsupported type {annotation}.")


def config_from_dict(cls: type[ConfigT], values: dict[str, Any], source: str = "config") -> ConfigT:
    """Build `cls` from a mapping, converting and checking every value."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown_key_error(key, list(types_), source)
        kwargs[key] = convert_value(key, value, types_[key])
    config = cls(**kwargs)
    if hasattr(config, "validate"):
        config.validate()
    return config


def parse_config(cls: type[ConfigT], argv: list[str] | None = None) -> ConfigT:
    """Parse `[--config FILE.yaml] [--key value ...]` into an instance of the dataclass `cls`.

    YAML first, then command-line overrides. `--flag` alone sets a bool field to true. Keys may use `-` or `_`.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        raise SystemExit(config_help(cls))
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"Expected '--key value', got {arg!r}.")
        key = arg[2:].replace("-", "_")
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        if key == "config":
            loaded = yaml.safe_load(Path(value).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"Config file {value} must hold a mapping of keys to values.")
            for k in loaded:
                if k not in types_:
                    raise _unknown_key_error(k, list(types_), value)
            values.update(loaded)
        else:
            if key not in types_:
                raise _unknown_key_error(key, list(types_), "the command line")
            overrides[key] = value
    values.update(overrides)
    return config_from_dict(cls, values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML-safe mapping of a config dataclass (tuples become lists)."""

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML; `--config path` reproduces it."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def config_help(cls: type) -> str:
    """A `--help` text listing every key with its type and default."""
    lines = [f"{cls.__name__} keys (set in --config YAML or as --key value):"]
    for name, annotation in _field_types(cls).items():
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        lines.append(f"  --{name}  ({annotation}, default {default!r})")
    return "\n".join(lines)


@dataclasses.dataclass
class DataConfig:
    """Data settings shared by the training scripts (each script's config extends this)."""

    dataset: str = "shapes"  # "shapes" (embedded), a Hub dataset name, an imagefolder path, or parquet file(s)
    image_column: str = "image"  # column holding the images
    caption_column: str = "text"  # column holding a caption or a list of captions (one is drawn per step)
    max_train_samples: int | None = None  # truncate the dataset (debugging, quick runs)
    resolution: int = 32  # images are resized (shorter side) and cropped to this square size
    center_crop: bool = True  # center crop (True) or seeded random crop (False)
    random_flip: bool = False  # horizontal flips; leave off when captions name left/right
    min_image_size: int = 8  # images with a side below this are skipped (counted in the log)
    shapes_num_images: int = 20000  # shapes dataset: number of images generated
    shapes_holdout: list[str] = dataclasses.field(default_factory=list)  # shapes: captions never trained on

    def validate(self) -> None:
        check_ranges(self, positive=("max_train_samples", "resolution", "min_image_size", "shapes_num_images"))

    def load_dataset(self, seed: int):
        """The raw `datasets.Dataset` this config names (images not yet decoded or checked)."""
        from .data.sources import load_image_caption_dataset

        shapes_kwargs = {}
        if self.dataset == "shapes":
            shapes_kwargs = dict(
                num_images=self.shapes_num_images, size=self.resolution, seed=seed, holdout=self.shapes_holdout
            )
        return load_image_caption_dataset(
            self.dataset,
            image_column=self.image_column,
            caption_column=self.caption_column,
            max_train_samples=self.max_train_samples,
            **shapes_kwargs,
        )


def tracker_config(config: Any) -> dict[str, Any]:
    """The config as trackers accept it (TensorBoard's hparams take only scalars): lists become strings."""
    return {k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in config_to_dict(config).items()}
