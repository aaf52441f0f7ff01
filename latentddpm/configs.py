"""Where the shipped configs are: `configs/` of the checkout, installed as `latentddpm/_configs`."""

from __future__ import annotations

from pathlib import Path

_CANDIDATES = (
    Path(__file__).resolve().parent / "_configs",  # installed wheel
    Path(__file__).resolve().parent.parent / "configs",  # source checkout / editable install
)


def config_path(name: str) -> Path:
    """Path of a shipped config, e.g. `config_path("unet/small.json")`."""
    for root in _CANDIDATES:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"No shipped config {name!r}; looked in {[str(c) for c in _CANDIDATES]}.")
