"""CLIP score (Hessel et al. 2021, https://arxiv.org/abs/2104.08718): how well images match their prompts.

`100 * max(cos(image embedding, text embedding), 0)` per image-prompt pair, as torchmetrics' `CLIPScore` defines
it, with any transformers `CLIPModel` on disk (e.g. a saved `openai/clip-vit-base-patch32`): nothing is fetched
when running offline, so the score is measured only where such a model is available locally.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel


class CLIPScorer:
    """A CLIP model with its tokenizer and image processor, scoring batches of generated images against prompts.

    Args:
        name_or_path (`str` or `os.PathLike`): a folder saved by `CLIPModel.save_pretrained` with the tokenizer and
            image processor files (or a Hub id when online).
        device (`str`, defaults to `"cpu"`): where the model runs.
    """

    def __init__(self, name_or_path: str | os.PathLike, device: str = "cpu"):
        self.model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.image_processor = AutoImageProcessor.from_pretrained(name_or_path)
        self.device = device
        self.description = f"CLIP score with {name_or_path}"

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """CLIP score of each image with its prompt.

        Args:
            images (`torch.Tensor` of shape `(N, 3, H, W)`): images in `[0, 1]`.
            prompts (`list[str]`): N prompts, one per image.

        Returns:
            `torch.Tensor` of shape `(N,)`: scores in `[0, 100]`.
        """
        if len(prompts) != images.shape[0]:
            raise ValueError(f"Got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image.")
        max_length = self.model.config.text_config.max_position_embeddings
        out = []
        for start in range(0, len(prompts), batch_size):
            pixels = self.image_processor(
                images=list(images[start : start + batch_size].float()), do_rescale=False, return_tensors="pt"
            ).pixel_values
            text = self.tokenizer(
                prompts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            output = self.model(
                input_ids=text.input_ids.to(self.device),
                attention_mask=text.attention_mask.to(self.device),
                pixel_values=pixels.to(self.device),
            )
            # text_embeds and image_embeds come L2-normalised: their dot product is the cosine
            cosine = (output.image_embeds * output.text_embeds).sum(dim=-1)
            out.append(100 * cosine.clamp(min=0).float().cpu())
        return torch.cat(out)
