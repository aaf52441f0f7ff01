"""Hugging Face Spaces for pushed pipelines: a folder that runs `latentddpm serve`'s app for one model."""

import importlib.metadata
import os
from pathlib import Path

from huggingface_hub import SpaceCard, SpaceCardData

APP_FILE = "app.py"
DEFAULT_REQUIREMENT = f"latentddpm[app]=={importlib.metadata.version('latentddpm')}"

APP_TEMPLATE = '''"""The web app of `latentddpm serve` for {model}, as a Hugging Face Space.

Written by `latentddpm make-space`; Spaces run `python app.py`.
"""

from latentddpm.app import build_demo

demo = build_demo({model!r})

if __name__ == "__main__":
    demo.launch()
'''


def write_space(
    save_dir: str | os.PathLike, model: str, *, requirement: str = DEFAULT_REQUIREMENT, title: str | None = None
) -> Path:
    """Write a Spaces-ready folder for `model`: `app.py` (the app of `latentddpm serve`), `requirements.txt` and a
    `README.md` whose metadata declares the Gradio SDK, the app file and the model.

    Args:
        save_dir (`str` or `os.PathLike`): the folder to write; created if missing.
        model (`str`): the model the app serves: a Hub repo id (a local folder runs the app locally).
        requirement (`str`, defaults to `latentddpm[app]==<this version>`): the `requirements.txt` line that installs
            latentddpm with Gradio, e.g. a `git+https://` URL.
        title (`str`, *optional*): the Space's title; the model's name when `None`.

    Returns:
        `Path`: `save_dir`.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / APP_FILE).write_text(APP_TEMPLATE.format(model=model))
    (save_dir / "requirements.txt").write_text(requirement + "\n")
    try:  # the Gradio that the app runs with here; without one, the Hub picks its default version
        sdk_version = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        sdk_version = None
    title = title or model.rstrip("/").split("/")[-1]
    card_data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=sdk_version,
        app_file=APP_FILE,
        models=[model],
        tags=["latentddpm", "text-to-image"],
        license="apache-2.0",
    )
    body = (
        f"# {title}\n\nText-to-image with [{model}](https://huggingface.co/{model}), a latentddpm"
        " `LatentDDPMPipeline`. Each image is shown with the `latentddpm sample` command that draws it again.\n\n"
        f"Run it locally:\n\n```bash\npip install 'latentddpm[app]'\nlatentddpm serve --model {model}\n```\n"
    )
    SpaceCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}").save(save_dir / "README.md")
    return save_dir
