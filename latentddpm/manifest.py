"""Reproducibility manifest: what produced a checkpoint or a saved pipeline."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

MANIFEST_FILE = "manifest.json"
_PACKAGES = ("latentddpm", "torch", "diffusers", "transformers", "accelerate", "datasets", "safetensors", "numpy")


def git_commit(path: str | Path = ".") -> str | None:
    """The git commit of the checkout at `path` (with `-dirty` when it has changes), or None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(config: dict, seed: int, dataset_fingerprint: str | None = None, **extra) -> dict:
    """A JSON-able record of the config, package versions, git commit, dataset fingerprint and seeds."""
    return {
        "config": config,
        "seed": seed,
        "dataset_fingerprint": dataset_fingerprint,
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        **extra,
    }


def write_manifest(manifest: dict, folder: str | Path) -> Path:
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path
