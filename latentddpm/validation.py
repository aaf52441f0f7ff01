"""Validation during training: a sample grid, a held-out loss and (on shapes) the pixel-judge scores."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import PIL.Image
import torch
from diffusers.utils import make_image_grid

from .batching import step_generator
from .data.shapes import shapes_prompts
from .eval.sampling import grid_shape
from .eval.shapes_judge import score_shapes_prompts
from .latents import scale_latents
from .losses import Objective, training_loss
from .trackers import log_images


@torch.no_grad()
def validation_loss(
    unet,
    scheduler,
    cache,
    rows: torch.Tensor,
    vae,
    objective: Objective,
    seed: int = 0,
    text: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> float:
    """The training loss (`training_loss`, the same objective) on held-out rows, with fixed draws so that numbers
    compare across steps.

    `text` maps caption rows of `cache` to `(hidden, mask)` (mask None: attend to every token); the cached embeddings
    (`cache.text`) by default.
    """
    generator = step_generator(seed, micro_step=0, process_index=10_000)
    device = next(unet.parameters()).device
    total = 0.0
    for size_rows in cache.rows_by_size().values():  # a batch per latent size (aspect-ratio bucket)
        size_rows = rows[torch.isin(rows, size_rows)]
        if not len(size_rows):
            continue
        drawn = cache.draw(size_rows, generator, caption_dropout=0.0)
        hidden, mask = (text or cache.text)(drawn["caption_ids"])
        hidden, mask = hidden.to(device), None if mask is None else mask.to(device)
        latents = scale_latents(vae, drawn["latents"]).to(device)
        loss, _ = training_loss(
            unet, scheduler, latents, hidden, mask, objective, generator, drawn["loss_mask"], drawn["time_ids"]
        )
        total += loss.item() * len(size_rows)
    return total / len(rows)


@contextlib.contextmanager
def ema_weights(model: torch.nn.Module, ema) -> Iterator[None]:
    """Swap the EMA weights into `model` (when `ema` is a diffusers `EMAModel`), restoring the trained ones after.
    The EMA averages the parameters that train: all of the model's, or its LoRA adapters."""
    trained = [p for p in model.parameters() if p.requires_grad]
    if ema is not None:
        ema.store(trained)
        ema.copy_to(trained)
    try:
        yield
    finally:
        if ema is not None:
            ema.restore(trained)


def run_validation(
    config, accelerator, unet, ema, make_pipeline, scheduler, cache, validation_rows, vae, step: int, text=None
) -> dict:
    """Sample the validation prompts (EMA weights swapped in, then restored) and compute validation metrics.

    Runs on the main process; returns the metrics logged (plus `grid`, the sample grid, when there is one). `text`
    is passed on to `validation_loss`.
    """
    metrics: dict = {}
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return metrics
    model = accelerator.unwrap_model(unet)
    model.eval()
    with ema_weights(model, ema):
        if len(validation_rows):
            metrics["val_loss"] = validation_loss(
                model, scheduler, cache, validation_rows, vae, config.objective(), config.seed, text
            )
        pipeline = make_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        out_dir = Path(config.output_dir) / "validation"
        out_dir.mkdir(parents=True, exist_ok=True)
        if config.validation_prompts:
            images = pipeline(
                config.validation_prompts,
                num_inference_steps=config.validation_inference_steps,
                guidance_scale=config.validation_guidance_scale,
                generator=torch.Generator().manual_seed(config.seed),
            ).images
            grid = make_image_grid(images, *grid_shape(len(images)))
            grid.save(out_dir / f"step-{step}.png")
            metrics["grid"] = grid
            log_images(accelerator, "validation", images, config.validation_prompts, step)
        if config.validation_shapes_score:
            scores, shape_images = score_shapes_prompts(
                pipeline, config.validation_inference_steps, config.validation_guidance_scale, seed=config.seed
            )
            make_image_grid(shape_images, rows=6, cols=15).save(out_dir / f"shapes-step-{step}.png")
            log_images(accelerator, "validation/shapes", shape_images, shapes_prompts(), step)
            metrics.update({f"shapes_{k}": v for k, v in scores.items()})

    accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
    numbers = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    if numbers:  # a run with only a sample grid has nothing to print
        accelerator.print(f"validation @ step {step}: {numbers}")
    accelerator.wait_for_everyone()
    return metrics


def evaluation_dir(output_dir: str | Path, step: int) -> Path:
    """Where `run_evaluation` at `step` writes its report (`metrics.json`, `report.html`, grids)."""
    return Path(output_dir) / "evaluation" / f"step-{step}"


def run_evaluation(evaluation_config: str, accelerator, unet, ema, make_pipeline, output_dir: str, step: int) -> dict:
    """`latentddpm evaluate` on the model being trained (EMA weights swapped in), its metrics logged to the trackers.

    Args:
        evaluation_config (`str`): YAML file of `latentddpm.eval.sweep.EvaluateConfig` keys (data, classifier,
            schedulers, steps, guidance, num_samples, ...); `model` and `out` are set here.
        output_dir (`str`): the run's folder; the report goes to `output_dir/evaluation/step-{step}/`.

    Returns:
        `dict` of the logged metrics, `eval/{scheduler}-{steps}-cfg{guidance}/{metric}` (plus `eval/{group}/{metric}`
        for the model-level ones such as VAE reconstruction), on the main process; `{}` elsewhere.
    """
    from .config import parse_config
    from .eval.report import METRICS
    from .eval.sweep import EvaluateConfig, evaluate

    metrics: dict = {}
    if accelerator.is_main_process:
        eval_config = parse_config(
            EvaluateConfig,
            [
                "--config",
                evaluation_config,
                "--model",
                str(output_dir),
                "--out",
                str(evaluation_dir(output_dir, step)),
                "--device",
                str(accelerator.device),
            ],
        )
        model = accelerator.unwrap_model(unet)
        model.eval()
        with ema_weights(model, ema):
            results = evaluate(eval_config, pipeline=make_pipeline())
        # One caption for each setting's grid: its prompts in reading order (every setting samples the same ones).
        caption = " | ".join(results["grid_prompts"])
        for row in results["rows"]:
            setting = f"{row['scheduler']}-{row['steps']}-cfg{row['guidance']:g}"
            metrics.update({f"eval/{setting}/{k}": v for k, v in row.items() if k in METRICS})
            with PIL.Image.open(Path(eval_config.out) / row["grid"]) as grid:
                log_images(accelerator, f"eval/{setting}/samples", [grid], [caption], step)
        for group, values in results["model_metrics"].items():
            metrics.update({f"eval/{group}/{k}": v for k, v in values.items() if isinstance(v, (int, float))})
        accelerator.log(metrics, step=step)
        accelerator.print(f"evaluation @ step {step}: {results['report']}")
    accelerator.wait_for_everyone()
    return metrics
