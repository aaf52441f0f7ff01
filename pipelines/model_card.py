"""Model cards for pipelines pushed to the Hugging Face Hub."""

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image
import yaml
from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from .pipeline_latent_ddpm import LatentDDPMPipeline

SAMPLE_GRID_FILENAME = "sample_grid.png"
CARD_TAGS = ["latentddpm", "text-to-image", "diffusion"]


def write_model_card(
    save_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    sample_grid: PIL.Image.Image | None = None,
    training_config: dict[str, Any] | None = None,
    license: str = "apache-2.0",
) -> Path:
    """Write `README.md` (YAML metadata and a usage section) and, when given, the sample grid into `save_dir`.

    Args:
        save_dir (`str` or `os.PathLike`): the folder the pipeline was saved to.
        repo_id (`str`, *optional*): the Hub repository, used in the title and the usage snippet.
        base_model (`str`, *optional*): Hub id of the model this one was fine-tuned from.
        dataset (`str`, *optional*): Hub id of the training dataset.
        sample_grid (`PIL.Image.Image`, *optional*): samples, saved as `sample_grid.png` and shown on the card.
        training_config (`dict`, *optional*): the resolved training config, shown as YAML.
        license (`str`, defaults to `"apache-2.0"`): license identifier for the metadata.

    Returns:
        `Path`: the written `README.md`.
    """
    save_dir = Path(save_dir)
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=CARD_TAGS,
        license=license,
        base_model=base_model,
        datasets=[dataset] if dataset is not None else None,
    )
    name = repo_id or save_dir.name
    sections = [
        f"# {name}\n\nA text-to-image latent diffusion model (`LatentDDPMPipeline`) made with `latentddpm`: a VAE,"
        " a text encoder, a conditional U-Net and a DDPM scheduler on the Hugging Face stack."
        + (f" Trained on [{dataset}](https://huggingface.co/datasets/{dataset})." if dataset else "")
        + (f" Fine-tuned from [{base_model}](https://huggingface.co/{base_model})." if base_model else ""),
        "## Usage\n\n```python\nimport torch\nfrom latentddpm import LatentDDPMPipeline\n\n"
        f'pipe = LatentDDPMPipeline.from_pretrained("{repo_id or "path/to/this/folder"}")\n'
        'image = pipe("a red circle above a blue square", generator=torch.Generator().manual_seed(0)).images[0]\n'
        "```",
    ]
    if sample_grid is not None:
        sample_grid.save(save_dir / SAMPLE_GRID_FILENAME)
        sections.append(f"## Samples\n\n![samples]({SAMPLE_GRID_FILENAME})")
    if training_config is not None:
        config_yaml = yaml.safe_dump(training_config, sort_keys=False)
        sections.append(f"## Training configuration\n\n```yaml\n{config_yaml}```")

    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    path = save_dir / "README.md"
    card.save(path)
    return path


def prepare_hub_folder(
    pipeline: "LatentDDPMPipeline",
    save_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    sample_grid: PIL.Image.Image | None = None,
    training_config: dict[str, Any] | None = None,
    license: str = "apache-2.0",
) -> Path:
    """Everything `push_to_hub` uploads: the pipeline in safetensors plus its model card (see [`write_model_card`]).

    Returns:
        `Path`: `save_dir`.
    """
    pipeline.save_pretrained(save_dir, safe_serialization=True)
    write_model_card(
        save_dir,
        repo_id=repo_id,
        base_model=base_model,
        dataset=dataset,
        sample_grid=sample_grid,
        training_config=training_config,
        license=license,
    )
    return Path(save_dir)
