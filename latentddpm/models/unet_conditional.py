"""`ConditionalUNet`: the text-conditional noise-prediction U-Net of latentddpm.

Our own assembly of the U-Net of Ho et al. 2020 (https://arxiv.org/abs/2006.11239) with the cross-attention text
conditioning of latent diffusion (Rombach et al. 2022, https://arxiv.org/abs/2112.10752), built from the blocks in
`unet_blocks.py` and diffusers' `Attention`, `FeedForward`, `Timesteps` and `TimestepEmbedding`.
"""

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin, UNet2DConditionLoadersMixin
from diffusers.models.activations import get_activation
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import (
    CROSS_ATTENTION_PROCESSORS,
    Attention,
    AttentionProcessor,
    AttnProcessor,
    FusedAttnProcessor2_0,
)
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.peft_utils import apply_lora_scale
from torch import nn

from .unet_blocks import DownBlock, MidBlock, UpBlock

# SDXL's micro-conditioning: original height and width, crop top and left, target height and width.
NUM_TIME_IDS = 6


@dataclass
class ConditionalUNetOutput(BaseOutput):
    """
    The output of [`ConditionalUNet`].

    Args:
        sample (`torch.Tensor` of shape `(B, out_channels, H, W)`): The model prediction (noise, sample or velocity,
            depending on the scheduler's `prediction_type`; with a learned variance, also the variance values in the
            second half of the channels).
    """

    sample: torch.Tensor


def _per_level(name: str, value: int | Sequence[int], num_levels: int) -> tuple[int, ...]:
    """Broadcasts an int config value to one value per resolution level, or checks a sequence has one per level."""
    if isinstance(value, int):
        return (value,) * num_levels
    if len(value) != num_levels:
        raise ValueError(f"`{name}`={list(value)} must be an int or have one entry per level ({num_levels}).")
    return tuple(value)


class ConditionalUNet(ModelMixin, AttentionMixin, ConfigMixin, UNet2DConditionLoadersMixin, PeftAdapterMixin):
    r"""
    A text-conditional U-Net that predicts from a noisy latent, a timestep and text hidden states.

    Each resolution level of the encoder has `layers_per_block` ResNet blocks (each followed by a spatial transformer
    with self-attention, cross-attention to the text and a GEGLU feed-forward where `attention_levels` says so) and a
    stride-2 downsampling except at the last level. The middle is ResNet, transformer, ResNet (a single ResNet block
    without `mid_block_attention`). The decoder mirrors the encoder with `layers_per_block + 1` ResNet blocks per
    level, each consuming one skip connection. The sinusoidal timestep embedding goes through an MLP; optional
    class-label, pooled-text and image size-and-crop embeddings are added to it.

    Attention layers are diffusers' `Attention`, so `attn_processors`, `set_attn_processor`,
    `set_default_attn_processor`, `set_attention_slice` and `enable_xformers_memory_efficient_attention` work as on
    `UNet2DConditionModel` (the default processor is `AttnProcessor2_0`, PyTorch's fused SDPA), and so does
    `enable_gradient_checkpointing` (per ResNet block and spatial transformer).

    The module and parameter names are those of diffusers' `UNet2DConditionModel`, so the state dict of the
    `UNet2DConditionModel` built from [`to_unet2d_condition_config`] loads into this model and vice versa. (Stable
    Diffusion 1.x checkpoints use 1x1 convolutions for `proj_in`/`proj_out`; their `(C, C, 1, 1)` weights load
    into our linear layers once reshaped to `(C, C)`.) `forward` takes `UNet2DConditionModel.forward`'s parameters
    in its order, so the model drops into diffusers' Stable Diffusion, ControlNet, T2I-Adapter and LCM pipelines,
    and diffusers' loaders work on it: `load_attn_procs`/`save_attn_procs` and IP-Adapter weights
    (`UNet2DConditionLoadersMixin`), LoRA and other peft adapters (`PeftAdapterMixin`: `add_adapter`,
    `load_lora_adapter`, `set_adapters`; needs `pip install latentddpm[lora]`), and `enable_freeu`.

    Deliberate differences from `UNet2DConditionModel`:

    - The config describes this one architecture (ResNet levels with optional spatial transformers, linear
      projections, GEGLU feed-forward), not diffusers' block-type vocabulary: keys such as `down_block_types` are
      not accepted, and values the architecture cannot honour (e.g. a per-level tuple `cross_attention_dim`) are
      refused with a `ValueError` naming the key. `attention_head_dim` is the head width, not the head count.
    - `from_single_file` (`FromOriginalModelMixin`) is not offered: diffusers' single-file loader knows only its
      own classes. Convert original checkpoints to this model's state dict instead.
    - `added_cond_kwargs` takes `text_embeds` (with `pooled_projection_dim`), `time_ids` (with
      `addition_time_embed_dim`) and `image_embeds` (with an IP-Adapter loaded); the other addition embeddings do
      not exist here. With both `pooled_projection_dim` and `addition_time_embed_dim`, `add_time_proj` and
      `add_embedding` are those of `addition_embed_type="text_time"` (SDXL); a U-Net with either has no
      [`to_unet2d_condition_config`].
    - The legacy way of feeding T2I-Adapter features through `down_block_additional_residuals` without
      `mid_block_additional_residual` is refused (diffusers deprecates it); pass them as
      `down_intrablock_additional_residuals`.
      T2I-Adapter features enter every level before its downsampling (diffusers adds them after the downsampling on
      levels without attention, where the adapter's features do not have that resolution), and the caller's list is
      not emptied.
    - GLIGEN (`cross_attention_kwargs["gligen"]`) is not supported: there is no `position_net`.

    Args:
        sample_size (`int` or `tuple[int, int]`, *optional*): Height and width of the latents the model is trained
            on. Only read by pipelines (`unet.config.sample_size`) to pick a default size; any size works, odd ones
            included.
        in_channels (`int`, defaults to 4): Channels of the input latents.
        out_channels (`int`, defaults to 4): Channels of the output. Set it to `2 * in_channels` when the scheduler
            learns the variance (`variance_type="learned_range"`, Nichol & Dhariwal 2021,
            https://arxiv.org/abs/2102.09672): the first half is the prediction, the second the variance values.
        flip_sin_to_cos (`bool`, defaults to `True`): Put the cosines before the sines in the timestep embedding.
        freq_shift (`int`, defaults to 0): Frequency shift of the timestep embedding (diffusers' `Timesteps`).
        block_out_channels (`tuple[int]`, defaults to `(320, 640, 1280, 1280)`): Channels of each resolution level.
        attention_levels (`tuple[bool]`, defaults to `(True, True, True, False)`): Whether each level (of the
            encoder and the matching decoder level) has spatial transformers.
        mid_block_attention (`bool`, defaults to `True`): Whether the middle block has a spatial transformer (and a
            second ResNet block after it).
        layers_per_block (`int`, defaults to 2): ResNet blocks per encoder level (the decoder has one more).
        transformer_layers_per_block (`int` or `tuple[int]`, defaults to 1): Transformer blocks in each spatial
            transformer, per level; the middle block uses the last level's value.
        attention_head_dim (`int` or `tuple[int]`, defaults to `(40, 80, 160, 160)`): Channels per attention head,
            per level; the middle block uses the last level's value. Note that `UNet2DConditionModel`'s
            `attention_head_dim` is, for historical reasons, the number of heads
            (https://github.com/huggingface/diffusers/issues/2011); ours is the head dimension, so the default gives
            the 8 heads of Stable Diffusion 1.x.
        cross_attention_dim (`int`, defaults to 768): Width of the text hidden states.
        norm_num_groups (`int`, defaults to 32): GroupNorm groups; must divide every entry of `block_out_channels`.
        norm_eps (`float`, defaults to 1e-5): GroupNorm epsilon of the ResNet blocks and the output norm.
        dropout (`float`, defaults to 0.0): Dropout probability in the ResNet blocks.
        act_fn (`str`, defaults to `"silu"`): Activation of the ResNet blocks, time embedding and output.
        resnet_time_scale_shift (`str`, defaults to `"default"`): `"default"` adds the projected time embedding to
            the ResNet features; `"scale_shift"` uses it to scale and shift the normalized features (AdaGN,
            Dhariwal & Nichol 2021, https://arxiv.org/abs/2105.05233).
        num_class_embeds (`int`, *optional*): If set, `class_labels` in `[0, num_class_embeds)` are embedded and
            added to the time embedding.
        pooled_projection_dim (`int`, *optional*): If set, a pooled text embedding of this width, passed as
            `added_cond_kwargs={"text_embeds": pooled}`, is projected by an MLP and added to the time embedding.
        time_cond_proj_dim (`int`, *optional*): If set, a `timestep_cond` embedding of this width (e.g. the guidance
            scale embedding of latent consistency models, Luo et al. 2023, https://arxiv.org/abs/2310.04378) is
            projected and added to the timestep features before the time MLP, as in `UNet2DConditionModel`.
        addition_time_embed_dim (`int`, *optional*): If set, the six numbers of SDXL's micro-conditioning on image
            size and crop, passed as `added_cond_kwargs={"time_ids": time_ids}`, each get a sinusoidal embedding of
            this width; their concatenation (after the pooled text embedding, if any) is projected by an MLP and
            added to the time embedding (Podell et al. 2023, section 2.2, https://arxiv.org/abs/2307.01952).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResnetBlock", "TransformerBlock", "UpBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        attention_levels: tuple[bool, ...] = (True, True, True, False),
        mid_block_attention: bool = True,
        layers_per_block: int = 2,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        attention_head_dim: int | tuple[int, ...] = (40, 80, 160, 160),
        cross_attention_dim: int = 768,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        act_fn: str = "silu",
        resnet_time_scale_shift: Literal["default", "scale_shift"] = "default",
        num_class_embeds: int | None = None,
        pooled_projection_dim: int | None = None,
        time_cond_proj_dim: int | None = None,
        addition_time_embed_dim: int | None = None,
    ):
        super().__init__()
        for name, value in (
            ("cross_attention_dim", cross_attention_dim),
            ("layers_per_block", layers_per_block),
            ("norm_num_groups", norm_num_groups),
        ):
            if not isinstance(value, int):
                raise ValueError(f"`{name}`={value!r} must be an int: this U-Net has one value for every block.")
        for name, value in (
            ("num_class_embeds", num_class_embeds),
            ("pooled_projection_dim", pooled_projection_dim),
            ("time_cond_proj_dim", time_cond_proj_dim),
            ("addition_time_embed_dim", addition_time_embed_dim),
        ):
            if value is not None and not isinstance(value, int):
                raise ValueError(f"`{name}`={value!r} must be an int or None.")
        num_levels = len(block_out_channels)
        if len(attention_levels) != num_levels:
            raise ValueError(
                f"`attention_levels`={list(attention_levels)} must have one entry per level of "
                f"`block_out_channels`={list(block_out_channels)}."
            )
        if resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(
                f"`resnet_time_scale_shift`={resnet_time_scale_shift!r} must be one of ['default', 'scale_shift']."
            )
        head_dims = _per_level("attention_head_dim", attention_head_dim, num_levels)
        transformer_layers = _per_level("transformer_layers_per_block", transformer_layers_per_block, num_levels)
        for channels, head_dim in zip(block_out_channels, head_dims):
            if channels % norm_num_groups != 0 or channels % head_dim != 0:
                raise ValueError(
                    f"`block_out_channels`={list(block_out_channels)} must be multiples of `norm_num_groups`="
                    f"{norm_num_groups} and of `attention_head_dim`={list(head_dims)} at each level."
                )

        # 1. Embeddings: sinusoidal timestep features -> MLP, plus optional class embeddings and one MLP over the
        # pooled text embedding and the sinusoidal features of the size-and-crop ids, concatenated (as SDXL's).
        time_embed_dim = 4 * block_out_channels[0]
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(
            block_out_channels[0], time_embed_dim, act_fn=act_fn, cond_proj_dim=time_cond_proj_dim
        )
        self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim) if num_class_embeds else None
        self.add_time_proj = None
        if addition_time_embed_dim is not None:
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
        add_embed_dim = (pooled_projection_dim or 0) + NUM_TIME_IDS * (addition_time_embed_dim or 0)
        self.add_embedding = TimestepEmbedding(add_embed_dim, time_embed_dim, act_fn=act_fn) if add_embed_dim else None

        # 2. Encoder, middle, decoder.
        resnet_kwargs = {
            "temb_channels": time_embed_dim,
            "groups": norm_num_groups,
            "eps": norm_eps,
            "dropout": dropout,
            "act_fn": act_fn,
            "time_scale_shift": resnet_time_scale_shift,
        }

        def attention_kwargs(level: int, enabled: bool) -> dict[str, Any] | None:
            if not enabled:
                return None
            return {
                "num_heads": block_out_channels[level] // head_dims[level],
                "num_layers": transformer_layers[level],
                "cross_attention_dim": cross_attention_dim,
                "groups": norm_num_groups,
            }

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        skip_channels = [block_out_channels[0]]  # channels of the skip connections, in the order they are made
        for level, channels in enumerate(block_out_channels):
            is_last = level == num_levels - 1
            block_in = block_out_channels[max(level - 1, 0)]
            self.down_blocks.append(
                DownBlock(
                    block_in,
                    channels,
                    layers_per_block,
                    not is_last,
                    resnet_kwargs,
                    attention_kwargs(level, attention_levels[level]),
                )
            )
            skip_channels += [channels] * (layers_per_block + (0 if is_last else 1))

        # Registered before the middle block, as in UNet2DConditionModel: `attn_processors` then lists the layers in
        # diffusers' order (down, up, middle), which IP-Adapter checkpoints number their weights by.
        self.up_blocks = nn.ModuleList()
        self.mid_block = MidBlock(
            block_out_channels[-1], resnet_kwargs, attention_kwargs(num_levels - 1, mid_block_attention)
        )

        block_in = block_out_channels[-1]
        for resolution_idx, level in enumerate(reversed(range(num_levels))):
            # Each decoder level consumes layers_per_block + 1 skips, last made first.
            level_skips = skip_channels[-(layers_per_block + 1) :][::-1]
            skip_channels = skip_channels[: -(layers_per_block + 1)]
            self.up_blocks.append(
                UpBlock(
                    resolution_idx,
                    block_in,
                    block_out_channels[level],
                    level_skips,
                    level > 0,
                    resnet_kwargs,
                    attention_kwargs(level, attention_levels[level]),
                )
            )
            block_in = block_out_channels[level]

        # 3. Output.
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.nonlinearity = get_activation(act_fn)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

        # 4. IP-Adapter image projection: set by `load_ip_adapter` (`UNet2DConditionLoadersMixin`), which also swaps
        # the cross-attention processors for ones that attend to the projected image tokens.
        self.encoder_hid_proj = None
        # The processors `unfuse_qkv_projections` restores.
        self.original_attn_processors: dict[str, AttentionProcessor] | None = None

    def set_default_attn_processor(self) -> None:
        """Disables custom attention processors and sets the classic attention implementation (`AttnProcessor`)."""
        processors = self.attn_processors.values()
        if not all(isinstance(processor, CROSS_ATTENTION_PROCESSORS) for processor in processors):
            raise ValueError(
                "Cannot call `set_default_attn_processor` when attention processors are of type "
                f"{next(iter(processors))}"
            )
        self.set_attn_processor(AttnProcessor())

    def set_attention_slice(self, slice_size: str | int | list[int] | None = "auto") -> None:
        r"""
        Enables sliced attention: each attention layer computes its `batch * heads` attention maps in chunks of
        `slice_size`, saving memory for some speed. This is what pipelines' `enable_attention_slicing` calls.

        Args:
            slice_size (`str`, `int`, `list[int]` or `None`, defaults to `"auto"`): `"auto"` halves each layer's
                heads, `"max"` computes one map at a time, an int is used for every layer, a list gives one size per
                attention layer (in `self.modules()` order), and `None` turns slicing off.
        """
        attentions = [module for module in self.modules() if isinstance(module, Attention)]
        if slice_size == "auto":
            sizes = [max(attention.sliceable_head_dim // 2, 1) for attention in attentions]
        elif slice_size == "max":
            sizes = [1] * len(attentions)
        elif isinstance(slice_size, list):
            if len(slice_size) != len(attentions):
                raise ValueError(
                    f"`slice_size` has {len(slice_size)} entries but the model has {len(attentions)} attention layers."
                )
            sizes = slice_size
        elif slice_size is None or isinstance(slice_size, int):
            sizes = [slice_size] * len(attentions)
        else:
            raise ValueError(f"`slice_size`={slice_size!r} must be 'auto', 'max', an int, a list of ints or None.")
        for attention, size in zip(attentions, sizes):
            attention.set_attention_slice(size)

    def fuse_qkv_projections(self) -> None:
        """
        Fuses the query, key and value projections of self-attention (key and value of cross-attention) into one
        matrix multiplication each and sets `FusedAttnProcessor2_0`, as `UNet2DConditionModel` does.
        """
        if any("Added" in type(processor).__name__ for processor in self.attn_processors.values()):
            raise ValueError("`fuse_qkv_projections()` is not supported for models having added KV projections.")
        self.original_attn_processors = self.attn_processors
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_projections(fuse=True)
        self.set_attn_processor(FusedAttnProcessor2_0())

    def unfuse_qkv_projections(self) -> None:
        """Restores the attention processors that were set before [`fuse_qkv_projections`]."""
        if self.original_attn_processors is not None:
            self.set_attn_processor(self.original_attn_processors)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        r"""
        Enables FreeU (Si et al. 2023, https://arxiv.org/abs/2309.11497) in the first two decoder levels, as
        `UNet2DConditionModel.enable_freeu` does.

        Args:
            s1, s2 (`float`): Scales that damp the low frequencies of the skip connections of the first and second
                decoder levels.
            b1, b2 (`float`): Scales that amplify the backbone features of the first and second decoder levels.
        """
        for block in self.up_blocks:
            block.freeu = {"s1": s1, "s2": s2, "b1": b1, "b2": b2}

    def disable_freeu(self) -> None:
        """Disables FreeU."""
        for block in self.up_blocks:
            block.freeu = None

    @apply_lora_scale("cross_attention_kwargs")
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ConditionalUNetOutput | tuple[torch.Tensor]:
        r"""
        The parameters are those of `UNet2DConditionModel.forward`, in the same order (see the class docstring for
        the few deliberate differences).

        Args:
            sample (`torch.Tensor` of shape `(B, in_channels, H, W)`): The noisy latents.
            timestep (`torch.Tensor`, `float` or `int`): The timestep, a number, a 0-d tensor or a tensor of shape
                `(B,)` or `(1,)`.
            encoder_hidden_states (`torch.Tensor` of shape `(B, S, cross_attention_dim)`): Text hidden states.
            class_labels (`torch.LongTensor` of shape `(B,)`, *optional*): Class labels; required exactly when the
                config has `num_class_embeds`.
            timestep_cond (`torch.Tensor` of shape `(B, time_cond_proj_dim)`, *optional*): An embedding added to the
                timestep features through a projection (e.g. LCM's guidance scale embedding); only with
                `time_cond_proj_dim`.
            attention_mask (`torch.Tensor` of shape `(B, N)`, *optional*): 1 keeps a key token, 0 discards it, in the
                self-attention layers (as in `UNet2DConditionModel`, where `N` must match every attention level).
            cross_attention_kwargs (`dict`, *optional*): Passed to every attention processor; `"scale"` is the
                weight of loaded LoRA layers.
            added_cond_kwargs (`dict`, *optional*): `{"text_embeds": pooled}` with `pooled` of shape
                `(B, pooled_projection_dim)`, required exactly when the config has `pooled_projection_dim`;
                `{"time_ids": time_ids}` with `time_ids` of shape `(B, 6)`, each image's original height and width,
                crop top and left, and target height and width in pixels (SDXL's order), required exactly when the
                config has `addition_time_embed_dim`; and `{"image_embeds": ...}`, required exactly when an
                IP-Adapter is loaded.
            down_block_additional_residuals (`tuple[torch.Tensor]`, *optional*): ControlNet residuals, one per skip
                connection of the encoder, added to them.
            mid_block_additional_residual (`torch.Tensor`, *optional*): ControlNet residual added to the middle
                block's output; required with `down_block_additional_residuals`.
            down_intrablock_additional_residuals (`tuple[torch.Tensor]`, *optional*): T2I-Adapter features, one per
                encoder level (added before its downsampling), and possibly one more of the middle block's shape
                (added to its output, as for T2I-Adapter-XL).
            encoder_attention_mask (`torch.Tensor` of shape `(B, S)`, *optional*): 1 keeps a text token, 0 discards
                it (padding) in cross-attention.
            return_dict (`bool`, defaults to `True`): Return a [`ConditionalUNetOutput`] instead of a tuple.

        Returns:
            [`ConditionalUNetOutput`] or `tuple`: the prediction of shape `(B, out_channels, H, W)`.
        """
        batch = sample.shape[0]
        added_cond_kwargs = added_cond_kwargs or {}
        text_embeds = added_cond_kwargs.get("text_embeds")
        time_ids = added_cond_kwargs.get("time_ids")
        if (class_labels is None) != (self.class_embedding is None):
            raise ValueError(
                "`class_labels` must be passed exactly when `num_class_embeds` is set; got class_labels="
                f"{'None' if class_labels is None else 'a tensor'}, num_class_embeds={self.config.num_class_embeds}."
            )
        if timestep_cond is not None and self.config.time_cond_proj_dim is None:
            raise ValueError("`timestep_cond` needs a model with `time_cond_proj_dim` set.")
        if down_block_additional_residuals is not None and mid_block_additional_residual is None:
            raise ValueError(
                "`down_block_additional_residuals` (ControlNet) need `mid_block_additional_residual`; pass T2I-Adapter"
                " features as `down_intrablock_additional_residuals`."
            )
        if ("image_embeds" in added_cond_kwargs) != (self.encoder_hid_proj is not None):
            raise ValueError(
                "`added_cond_kwargs={'image_embeds': ...}` must be passed exactly when an IP-Adapter is loaded; got"
                f" added_cond_kwargs keys {sorted(added_cond_kwargs)} with"
                f" {'an' if self.encoder_hid_proj is not None else 'no'} IP-Adapter."
            )
        if (text_embeds is None) != (self.config.pooled_projection_dim is None):
            raise ValueError(
                "`added_cond_kwargs={'text_embeds': pooled}` must be passed exactly when `pooled_projection_dim` is "
                f"set; got added_cond_kwargs keys {sorted(added_cond_kwargs)} with pooled_projection_dim="
                f"{self.config.pooled_projection_dim}."
            )
        if (time_ids is None) != (self.add_time_proj is None):
            raise ValueError(
                "`added_cond_kwargs={'time_ids': time_ids}` must be passed exactly when `addition_time_embed_dim` is "
                f"set; got added_cond_kwargs keys {sorted(added_cond_kwargs)} with addition_time_embed_dim="
                f"{self.config.addition_time_embed_dim}."
            )
        if time_ids is not None and tuple(time_ids.shape) != (batch, NUM_TIME_IDS):
            raise ValueError(f"`time_ids` must have shape ({batch}, {NUM_TIME_IDS}), got {tuple(time_ids.shape)}.")

        # 1. Conditioning vector: time embedding (+ class embedding) (+ pooled text and size-and-crop embedding).
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if timesteps.shape[0] not in (1, batch):
            raise ValueError(f"`timestep` has {timesteps.shape[0]} values for a batch of {batch}; pass 1 or {batch}.")
        # `Timesteps` always returns float32; cast to the model's dtype.
        emb = self.time_embedding(self.time_proj(timesteps.expand(batch)).to(sample.dtype), timestep_cond)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels)
        if self.add_embedding is not None:
            add_embeds = [] if text_embeds is None else [text_embeds]
            if time_ids is not None:
                # (B, 6) -> (B * 6, addition_time_embed_dim) -> (B, 6 * addition_time_embed_dim)
                add_embeds.append(self.add_time_proj(time_ids.flatten()).reshape(batch, -1))
            emb = emb + self.add_embedding(torch.cat(add_embeds, dim=-1).to(sample.dtype))
        # Every ResNet block activates the embedding before its projection (Ho et al. 2020); do it once here.
        temb = self.nonlinearity(emb)

        # (B, S) keep/discard masks -> (B, 1, S) additive biases broadcast over the query tokens, as in
        # UNet2DConditionModel: keep -> 0, discard -> -10000.
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if self.encoder_hid_proj is not None:
            # IP-Adapter: its cross-attention processors take the text and the projected image tokens apart.
            encoder_hidden_states = (encoder_hidden_states, self.encoder_hid_proj(added_cond_kwargs["image_embeds"]))
        conditioning = (encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs)

        # 2. Encoder: every intermediate output is kept as a skip connection for the decoder; T2I-Adapter features
        # join each level, and an extra one of the middle block's shape joins its output (T2I-Adapter-XL).
        intrablock_residuals = list(down_intrablock_additional_residuals or [])
        sample = self.conv_in(sample)
        skips = [sample]
        for block in self.down_blocks:
            residual = intrablock_residuals.pop(0) if intrablock_residuals else None
            sample, block_skips = block(sample, temb, *conditioning, additional_residual=residual)
            skips.extend(block_skips)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"`down_block_additional_residuals` has {len(down_block_additional_residuals)} tensors but the"
                    f" encoder makes {len(skips)} skip connections."
                )
            skips = [skip + residual for skip, residual in zip(skips, down_block_additional_residuals)]

        # 3. Middle.
        sample = self.mid_block(sample, temb, *conditioning)
        if intrablock_residuals and intrablock_residuals[0].shape == sample.shape:
            sample = sample + intrablock_residuals.pop(0)
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual

        # 4. Decoder: each level pops its skip connections, last made first.
        for block in self.up_blocks:
            sample = block(sample, skips, temb, *conditioning)

        # 5. Output.
        sample = self.conv_out(self.nonlinearity(self.conv_norm_out(sample)))
        if not return_dict:
            return (sample,)
        return ConditionalUNetOutput(sample=sample)


def to_unet2d_condition_config(config: Mapping[str, Any]) -> dict[str, Any]:
    r"""
    The arguments of the diffusers `UNet2DConditionModel` with the same architecture and state-dict keys as the
    [`ConditionalUNet`] of `config` (used by the tests as an oracle and by `benchmarks/unet.py` as the baseline).

    Args:
        config (`Mapping`): The `config` of a `ConditionalUNet`: `unet.config`, or a config file's keys (those it
            leaves out take `ConditionalUNet`'s defaults, as `from_config` gives them).

    Returns:
        `dict` of keyword arguments for `UNet2DConditionModel`.
    """
    parameters = inspect.signature(ConditionalUNet.__init__).parameters.values()
    config = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty} | dict(config)
    for key in ("pooled_projection_dim", "addition_time_embed_dim"):
        if config[key] is not None:
            raise ValueError(f"`{key}`={config[key]} has no `UNet2DConditionModel` equivalent; set it to None.")
    channels = tuple(config["block_out_channels"])
    head_dims = _per_level("attention_head_dim", config["attention_head_dim"], len(channels))
    levels = tuple(config["attention_levels"])
    return {
        "sample_size": config["sample_size"],
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "flip_sin_to_cos": config["flip_sin_to_cos"],
        "freq_shift": config["freq_shift"],
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels),
        "mid_block_type": "UNetMidBlock2DCrossAttn" if config["mid_block_attention"] else "UNetMidBlock2D",
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
        "block_out_channels": channels,
        "layers_per_block": config["layers_per_block"],
        "transformer_layers_per_block": config["transformer_layers_per_block"],
        # UNet2DConditionModel's `attention_head_dim` is the number of heads (diffusers issue #2011).
        "attention_head_dim": tuple(c // d for c, d in zip(channels, head_dims)),
        "cross_attention_dim": config["cross_attention_dim"],
        "norm_num_groups": config["norm_num_groups"],
        "norm_eps": config["norm_eps"],
        "dropout": config["dropout"],
        "act_fn": config["act_fn"],
        "resnet_time_scale_shift": config["resnet_time_scale_shift"],
        "num_class_embeds": config["num_class_embeds"],
        "time_cond_proj_dim": config["time_cond_proj_dim"],
        "use_linear_projection": True,
    }
