"""Model cards for pipelines pushed to the Hugging Face Hub."""

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

if TYPE_CHECKING:
    from .pipeline_latent_ddpm import LatentDDPMPipeline

SAMPLE_GRID_FILENAME = "sample_grid.png"
CARD_TAGS = ["latentddpm", "text-to-image", "diffusion"]
# `latentddpm evaluate`'s model-level metrics that describe the model (group -> metrics), for the card's results.
MODEL_METRICS = {"reconstruction": ("psnr", "ssim"), "likelihood": ("latent_bpd",)}


def write_model_card(
    save_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    sample_grid: PIL.Image.Image | None = None,
    training_config: dict[str, Any] | None = None,
    license: str = "apache-2.0",
    eval_results: list[EvalResult] | None = None,
    extra_sections: list[str] | None = None,
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
        eval_results (`list[EvalResult]`, *optional*): metrics, written to the metadata as its `model-index`.
        extra_sections (`list[str]`, *optional*): more Markdown sections (e.g. [`TrainingRecipe.to_markdown`]), placed
            after the samples.

    Returns:
        `Path`: the written `README.md`.
    """
    save_dir = Path(save_dir)
    name = repo_id or save_dir.name
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=CARD_TAGS,
        license=license,
        base_model=base_model,
        datasets=[dataset] if dataset is not None else None,
        model_name=name if eval_results else None,  # the model-index names the model its results belong to
        eval_results=eval_results or None,
    )
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
    sections.extend(extra_sections or [])
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


def hub_repo_id(name: str | None) -> str | None:
    """`name` when it names a Hub repository (an `owner/name` id, not a local path), else None: the card's metadata
    (`base_model`, `datasets`) takes Hub ids only, and the Hub rejects a card with anything else there."""
    if name is None or name.count("/") != 1 or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


@dataclasses.dataclass
class TrainingRecipe:
    """How a pipeline was trained, for its model card ([`write_training_model_card`])."""

    dataset: str  # as configured: a Hub id, a local path, or "shapes"
    num_images: int | None  # training rows (held-out rows excluded); None: streamed, not counted
    steps: int  # optimizer steps taken
    max_train_steps: int  # optimizer steps planned
    train_batch_size: int  # per process and micro-batch
    gradient_accumulation_steps: int
    num_processes: int
    learning_rate: float  # peak
    lr_scheduler: str
    mixed_precision: str  # "no", "fp16" or "bf16"
    hardware: str  # e.g. "8 x NVIDIA H100 80GB HBM3"
    train_minutes: float  # in training steps (without validation, evaluation and checkpointing)
    base_model: str | None = None  # the pipeline fine-tuned from (a Hub id or a path); None: trained from scratch

    def to_markdown(self) -> str:
        """The `## Training` section: one row per setting."""
        batch = self.train_batch_size * self.gradient_accumulation_steps * self.num_processes
        rows = [
            ("Base model", f"`{self.base_model}`" if self.base_model else "none (trained from scratch)"),
            ("Data", f"`{self.dataset}`, " + ("streamed" if self.num_images is None else f"{self.num_images} images")),
            ("Steps", f"{self.steps} of {self.max_train_steps}" if self.steps < self.max_train_steps else self.steps),
            (
                "Batch size",
                f"{batch} ({self.train_batch_size} per process x {self.gradient_accumulation_steps} accumulation "
                f"steps x {self.num_processes} processes)",
            ),
            ("Learning rate", f"{self.learning_rate:g} ({self.lr_scheduler} schedule)"),
            ("Precision", "fp32" if self.mixed_precision == "no" else f"{self.mixed_precision} mixed precision"),
            ("Hardware", self.hardware),
            ("Training time", f"{self.train_minutes:.3g} minutes"),
        ]
        table = "\n".join(f"| {name} | {value} |" for name, value in rows)
        return f"## Training\n\n| | |\n|---|---|\n{table}"


def _measured_metrics(rows: list[dict]) -> list[str]:
    """The metrics of `latentddpm evaluate` (its `METRICS`, in their column order) that `rows` hold."""
    from latentddpm.eval.report import METRICS  # here: importing the pipeline must not import the evaluation stack

    return [metric for metric in METRICS if any(metric in row for row in rows)]


def _setting(row: dict) -> str:
    return f"{row['scheduler']}, {row['steps']} steps, guidance {row['guidance']:g}"


def evaluation_results(evaluation: dict) -> list[EvalResult]:
    """The metrics of a `latentddpm evaluate` run (its `metrics.json`) as the Hub's `EvalResult`s: the quality metrics
    of every sampler setting and the model-level ones (VAE reconstruction, likelihood bound), each with the number of
    samples it was measured on in its `args`. Timings are left out: they describe the machine, not the model."""
    config = evaluation["config"]
    dataset = {"task_type": "text-to-image", "dataset_type": config["data"], "dataset_name": config["data"]}
    dataset["dataset_split"] = config["split"]
    results = []
    for row in evaluation["rows"]:
        for metric in _measured_metrics([row]):
            if metric == "seconds_per_image" or not math.isfinite(row[metric]):
                continue
            args = {"num_samples": config["num_samples"], "scheduler": row["scheduler"]}
            args |= {"num_inference_steps": row["steps"], "guidance_scale": row["guidance"]}
            if metric in ("fid", "kid"):
                args["num_reference"] = evaluation["num_reference"]
            results.append(
                EvalResult(
                    **dataset,
                    metric_type=metric,
                    metric_value=row[metric],
                    metric_name=f"{metric} ({_setting(row)})",
                    metric_config=f"{row['scheduler']}-{row['steps']}-cfg{row['guidance']:g}",
                    metric_args=args,
                )
            )
    for group, metrics in evaluation["model_metrics"].items():
        for metric in MODEL_METRICS.get(group, ()):
            results.append(
                EvalResult(
                    **dataset,
                    metric_type=metric,
                    metric_value=metrics[metric],
                    metric_name=f"{metric} ({group})",
                    metric_config=group,
                    metric_args={"num_samples": metrics["n"]},
                )
            )
    return results


def evaluation_section(evaluation: dict, step: int) -> str:
    """The `## Evaluation` section: what was measured, on how many samples, and the table of every setting."""
    config, rows = evaluation["config"], evaluation["rows"]
    measured = _measured_metrics(rows)
    lines = [
        f"## Evaluation\n\n`latentddpm evaluate` at step {step} on `{config['data']}` (split `{config['split']}`): "
        f"{config['num_samples']} samples per setting, seed {config['seed']}."
    ]
    if evaluation["num_reference"] is not None:
        lines.append(f"FID and KID against {evaluation['num_reference']} reference images ({evaluation['features']}).")
    header = ["sampler", "steps", "guidance", "samples", *measured]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["scheduler"], row["steps"], f"{row['guidance']:g}", config["num_samples"]]
        cells += [f"{row[m]:.4g}" if m in row else "" for m in measured]
        table.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("\n" + "\n".join(table))
    for group, metrics in evaluation["model_metrics"].items():
        values = ", ".join(f"{m} {metrics[m]:.4g}" for m in MODEL_METRICS.get(group, ()))
        lines.append(f"\n{group.capitalize()} on {metrics['n']} images: {values}.")
    return "\n".join(lines)


def training_sections(recipe: TrainingRecipe, evaluation: dict | None = None) -> list[str]:
    """The card sections of a training run: its recipe (`## Training`) and, when it was evaluated, the metrics."""
    sections = [recipe.to_markdown()]
    if evaluation is not None:
        sections.append(evaluation_section(evaluation, recipe.steps))
    return sections


def write_training_model_card(
    save_dir: str | os.PathLike,
    recipe: TrainingRecipe,
    *,
    evaluation: dict | None = None,
    repo_id: str | None = None,
    sample_grid: PIL.Image.Image | None = None,
    training_config: dict[str, Any] | None = None,
    license: str = "apache-2.0",
) -> Path:
    """The card of a training run: [`write_model_card`] with the recipe (`## Training`) and, when the run was
    evaluated, the metrics as a table (`## Evaluation`) and as the metadata's `model-index`.

    Args:
        save_dir (`str` or `os.PathLike`): the folder the pipeline was saved to.
        recipe (`TrainingRecipe`): how it was trained; its `base_model` and `dataset` go into the metadata when they
            are Hub ids.
        evaluation (`dict`, *optional*): the `metrics.json` of `latentddpm evaluate` on the trained pipeline.
        repo_id, sample_grid, training_config, license: as in [`write_model_card`].

    Returns:
        `Path`: the written `README.md`.
    """
    return write_model_card(
        save_dir,
        repo_id=repo_id,
        base_model=hub_repo_id(recipe.base_model),
        dataset=hub_repo_id(recipe.dataset),
        sample_grid=sample_grid,
        training_config=training_config,
        license=license,
        eval_results=evaluation_results(evaluation) if evaluation is not None else None,
        extra_sections=training_sections(recipe, evaluation),
    )


def write_lora_model_card(
    save_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    trigger_words: list[str] | None = None,
    sample_grid: PIL.Image.Image | None = None,
    license: str = "apache-2.0",
    extra_sections: list[str] | None = None,
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
        extra_sections (`list[str]`, *optional*): more Markdown sections (e.g. [`TrainingRecipe.to_markdown`]), placed
            after the samples.

    Returns:
        `Path`: the written `README.md`.
    """
    save_dir = Path(save_dir)
    # The Hub's metadata takes a repo id for `base_model`: a local base folder is named in the text only.
    on_hub = hub_repo_id(base_model) is not None
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
    sections.extend(extra_sections or [])
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
