"""Images to the experiment trackers a run logs to: TensorBoard and Weights & Biases, each in its own format."""

from __future__ import annotations

import numpy as np
import PIL.Image


def log_images(accelerator, key: str, images: list[PIL.Image.Image], captions: list[str], step: int) -> None:
    """Log `images` under `key` at `step` to every active tracker that shows images.

    accelerate's own `log_images` drops captions, so each tracker is written to directly: TensorBoard gets one
    batch of images (same size, shown as a strip; it has no captions), wandb one `wandb.Image` per image with its
    caption. Other trackers are left alone. Call it on the main process (the trackers live there).

    Args:
        key (`str`): the panel name, e.g. `"validation"` or `"eval/ddim-25-cfg3/samples"`.
        images (`list[PIL.Image.Image]`): the images, all of one size.
        captions (`list[str]`): one caption per image, e.g. its prompt.
        step (`int`): the optimizer step they belong to.
    """
    if len(captions) != len(images):
        raise ValueError(f"log_images needs one caption per image, got {len(captions)} for {len(images)} images.")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            pixels = np.stack([np.asarray(image.convert("RGB")) for image in images])
            tracker.writer.add_images(key, pixels, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.run.log(
                {key: [wandb.Image(image, caption=caption) for image, caption in zip(images, captions)]}, step=step
            )
