"""Model cards for pipelines pushed to the Hugging Face Hub."""

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

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


def is_hub_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hub repository id (`"user/name"` or `"name"`) and is no local path."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists()


def write_lora_model_card(
    save_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    trigger_words: list[str] | None = None,
    sample_grid: PIL.Image.Image | None = None,
    license: str = "apache-2.0",
) -> Path:
    """Write the `README.md` of a LoRA adapter folder (`pytorch_lora_weights.safetensors`, no base model) and, when
    given, its sample grid: YAML metadata in the Hub's LoRA conventions (`base_model`, `instance_prompt`, tag
    `lora`), the trigger words and how to load the adapter onto its base.

    Args:
        save_dir (`str` or `os.PathLike`): the adapter's folder.
        repo_id (`str`, *optional*): the Hub repository, used in the title and the usage snippet.
        base_model (`str`, *optional*): the pipeline (Hub id or path) the adapter was trained on.
        trigger_words (`list[str]`, *optional*): the prompts or words that call up what it learned (a DreamBooth
            run's `instance_prompt`); the first is the card's `instance_prompt`.
        sample_grid (`PIL.Image.Image`, *optional*): samples, saved as `sample_grid.png` and shown on the card.
        license (`str`, defaults to `"apache-2.0"`): license identifier for the metadata.

    Returns:
        `Path`: the written `README.md`.
    """
    save_dir = Path(save_dir)
    # The Hub's metadata takes a repo id for `base_model`: a local base folder is named in the text only.
    on_hub = base_model is not None and is_hub_repo_id(base_model)
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=[*CARD_TAGS, "lora"],
        license=license,
        base_model=base_model if on_hub else None,
        instance_prompt=trigger_words[0] if trigger_words else None,
    )
    name = repo_id or save_dir.name
    base = base_model or "path/to/the/base/pipeline"
    sections = [
        f"# {name}\n\nLoRA adapter weights (Hu et al. 2021, https://arxiv.org/abs/2106.09685) for"
        + (f" [{base}](https://huggingface.co/{base})" if on_hub else f" `{base}`")
        + ", trained with `latentddpm`'s `train_ldm` (`lora_rank`). Only the adapter is here: load it onto its base"
        " pipeline."
    ]
    if trigger_words:
        words = "\n".join(f"- `{word}`" for word in trigger_words)
        sections.append(f"## Trigger words\n\nUse these in the prompt to call up what the adapter learned:\n\n{words}")
    if sample_grid is not None:
        sample_grid.save(save_dir / SAMPLE_GRID_FILENAME)
        sections.append(f"## Samples\n\n![samples]({SAMPLE_GRID_FILENAME})")
    prompt = trigger_words[0] if trigger_words else "a red circle above a blue square"
    sections.append(
        "## Usage\n\n```python\nimport torch\nfrom latentddpm import LatentDDPMPipeline\n\n"
        f'pipe = LatentDDPMPipeline.from_pretrained("{base}")\n'
        f'pipe.load_lora_weights("{repo_id or "path/to/this/folder"}")\n'
        f'image = pipe("{prompt}", generator=torch.Generator().manual_seed(0)).images[0]\n'
        "```\n\nOn a Stable Diffusion base, diffusers' `StableDiffusionPipeline.load_lora_weights` loads the same"
        " file; `pipe.fuse_lora()` folds it into the weights, `pipe.unload_lora_weights()` removes it."
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    path = save_dir / "README.md"
    card.save(path)
    return path
