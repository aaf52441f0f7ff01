"""Typed script configs: a dataclass, filled from a YAML file and then `--key value` overrides.

Every training script declares one dataclass whose fields are its settings. `parse_config` reads
`--config file.yaml` first (a file may `extends: other.yaml` and override some of its keys), then applies
`--key value` pairs from the command line, converting each value to the field's declared type. Unknown keys,
values of the wrong type and values out of the range declared on the field (`positive(...)`, `non_negative(...)`,
`fraction(...)`, `config_file(...)`) are errors that name the key (and suggest the closest valid one), raised before
any data is read. A config's own `validate()` checks what involves several keys.

Config files are looked up as given, then among the shipped configs (`configs/` of the checkout, installed with the
package), so `--config configs/shapes_ldm.yaml` and `unet_config: configs/unet/small.json` work from any folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from .configs import config_path

ConfigT = TypeVar("ConfigT")
# The key of a config file that names the file it extends (relative to its own folder, or a shipped config).
EXTENDS_KEY = "extends"


class ConfigError(ValueError):
    """A config key or value that cannot be used. Raised before any work starts."""


# Ranges, declared on the fields: `train_batch_size: int = positive(64)`. `None` (a setting switched off) is in range.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0, "> 0"),
    "non_negative": (lambda v: v >= 0, ">= 0"),
    "fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def positive(default: Any) -> Any:
    """A field whose value must be > 0 (or None)."""
    return dataclasses.field(default=default, metadata={"range": "positive"})


def non_negative(default: Any) -> Any:
    """A field whose value must be >= 0 (or None)."""
    return dataclasses.field(default=default, metadata={"range": "non_negative"})


def fraction(default: Any) -> Any:
    """A field whose value must be in [0, 1) (or None)."""
    return dataclasses.field(default=default, metadata={"range": "fraction"})


def config_file(default: str | None) -> Any:
    """A field naming a config file (e.g. a U-Net's JSON): it must exist, as given or among the shipped configs, and is
    replaced by its resolved path."""
    return dataclasses.field(default=default, metadata={"config_file": True})


def resolve_config_file(path: str | Path, key: str = "config") -> Path:
    """`path` if it is a file, else the shipped config of that name (`configs/unet/small.json`, `unet/small.json`).

    Raises:
        ConfigError: neither exists.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_absolute():
        name = path.relative_to("configs") if path.parts[0] == "configs" and len(path.parts) > 1 else path
        with contextlib.suppress(FileNotFoundError):
            return config_path(str(name))
    raise ConfigError(f"Config key '{key}': no such file {str(path)!r} (nor a shipped config of that name).")


def check_fields(config: Any) -> None:
    """Check every field's declared range and resolve its config files; `ConfigError` names the first bad key."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        if "range" in f.metadata:
            in_range, allowed = _RANGES[f.metadata["range"]]
            if not in_range(value):
                raise ConfigError(f"Config key '{f.name}' must be {allowed}, got {value}.")
        if f.metadata.get("config_file"):
            setattr(config, f.name, str(resolve_config_file(value, f.name)))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key_error(key: str, valid: list[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"Unknown config key '{key}' in {source}.{hint} Valid keys: {', '.join(sorted(valid))}.")


def _is_mapping(annotation: Any) -> bool:
    return annotation is dict or typing.get_origin(annotation) is dict


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

    if _is_mapping(annotation):
        if isinstance(value, str):  # command line: a YAML flow mapping, "{prediction_type: epsilon}"
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, dict):
            raise ConfigError(f"Config key '{key}' must be a mapping ({{key: value, ...}}), got {value!r}.")
        return dict(value)

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
    check_fields(config)
    if hasattr(config, "validate"):
        config.validate()
    return config


def merge_values(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`; a mapping (a nested section such as `noise_scheduler`) over a mapping merges key by key."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = merged[key] | value
        merged[key] = value
    return merged


def load_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The keys of a YAML config file, with those of the file it `extends` (recursively) underneath its own."""
    path = resolve_config_file(path).resolve()
    if path in _seen:
        raise ConfigError(f"Config file {path} extends itself (through {' -> '.join(map(str, _seen))}).")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file {path} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(loaded, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys to values.")
    parent = loaded.pop(EXTENDS_KEY, None)
    if parent is None:
        return loaded
    parent_path = path.parent / parent if (path.parent / parent).is_file() else Path(parent)
    return merge_values(load_config_file(parent_path, (*_seen, path)), loaded)


def parse_config(cls: type[ConfigT], argv: list[str] | None = None) -> ConfigT:
    """Parse `[--config FILE.yaml] [--key value ...]` into an instance of the dataclass `cls`.

    YAML first, then command-line overrides. `--flag` alone sets a bool field to true. Keys may use `-` or `_`.
    A nested section (a `dict` field) given on the command line as a YAML mapping, `--noise_scheduler
    "{prediction_type: epsilon}"`, is merged into the file's section key by key.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(config_help(cls))
        raise SystemExit(0)
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"Expected '--key value', got {arg!r}.")
        key, equals, value = arg[2:].partition("=")
        key = key.replace("-", "_")  # only the key: a value such as a path keeps its dashes
        if equals:
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        if key == "config":
            loaded = load_config_file(value)
            for k in loaded:
                if k not in types_:
                    raise _unknown_key_error(k, list(types_), value)
            values = merge_values(values, loaded)
        else:
            if key not in types_:
                raise _unknown_key_error(key, list(types_), "the command line")
            if _is_mapping(types_[key]):
                value = convert_value(key, value, types_[key])
            overrides[key] = value
    return config_from_dict(cls, merge_values(values, overrides))


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
    """A `--help` text listing every key with its type, default and range."""
    lines = [f"{cls.__name__} keys (set in --config YAML, which may `extends: other.yaml`, or as --key value):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = f", {_RANGES[f.metadata['range']][1]}" if "range" in f.metadata else ""
        annotation = _field_types(cls)[f.name]
        type_name = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
        lines.append(f"  --{f.name}  ({type_name}, default {default!r}{allowed})")
    return "\n".join(lines)


@dataclasses.dataclass
class DataConfig:
    """Data settings shared by the training scripts (each script's config extends this)."""

    dataset: str = "shapes"  # "shapes" or "polygons" (embedded), a Hub dataset name, an imagefolder path, or parquet
    image_column: str = "image"  # column holding the images
    caption_column: str = "text"  # column holding a caption or a list of captions (one is drawn per step)
    max_train_samples: int | None = positive(None)  # truncate the dataset (debugging, quick runs)
    resolution: int = positive(32)  # images are resized (shorter side) and cropped to this square size
    center_crop: bool = True  # center crop (True) or seeded random crop (False)
    random_flip: bool = False  # horizontal flips; leave off when captions name left/right
    min_image_size: int = positive(8)  # images with a side below this are skipped (counted in the log)
    shapes_num_images: int = positive(20000)  # shapes or polygons dataset: number of images generated
    shapes_holdout: list[str] = dataclasses.field(default_factory=list)  # shapes: captions never trained on
    polygons_shapes_fraction: float = fraction(0.25)  # polygons dataset: fraction that are shapes images

    def load_dataset(self, seed: int, streaming: bool = False):
        """The raw `datasets.Dataset` this config names (images not yet decoded or checked); with `streaming`, a
        `datasets.IterableDataset` of it whose images are never decoded when read (`load_streaming_dataset`)."""
        from .data.sources import load_image_caption_dataset
        from .streaming import load_streaming_dataset

        generator_kwargs = {}
        if self.dataset in ("shapes", "polygons"):
            generator_kwargs = dict(
                num_images=self.shapes_num_images, size=self.resolution, seed=seed, holdout=self.shapes_holdout
            )
        if self.dataset == "polygons":
            generator_kwargs["shapes_fraction"] = self.polygons_shapes_fraction
        load = load_streaming_dataset if streaming else load_image_caption_dataset
        return load(
            self.dataset,
            image_column=self.image_column,
            caption_column=self.caption_column,
            max_train_samples=self.max_train_samples,
            **generator_kwargs,
        )


def tracker_config(config: Any) -> dict[str, Any]:
    """The config as trackers accept it (TensorBoard's hparams take only scalars): lists become strings, a section's
    keys become `section.key`."""
    flat: dict[str, Any] = {}
    for key, value in config_to_dict(config).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, item in items:
            name = key if sub is None else f"{key}.{sub}"
            flat[name] = ", ".join(map(str, item)) if isinstance(item, list) else item
    return flat
