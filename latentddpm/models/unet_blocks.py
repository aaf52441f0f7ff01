"""Building blocks of `ConditionalUNet`: ResNet blocks, spatial transformers and the down/mid/up stages.

The layout follows the U-Net of Ho et al. 2020 (https://arxiv.org/abs/2006.11239) with the text cross-attention of
latent diffusion (Rombach et al. 2022, https://arxiv.org/abs/2112.10752). Module and parameter names are those of
diffusers' `UNet2DConditionModel` blocks, so state dicts load both ways (with `use_linear_projection=True` there).
Attention itself is diffusers' `Attention`, so its processors (SDPA, classic, sliced, xFormers, IP-Adapter, fused
QKV) all apply, and `cross_attention_kwargs` reach them as in diffusers' `BasicTransformerBlock`.

Every attention-bearing `forward` takes the same conditioning, in this order: `encoder_hidden_states` (text hidden
states of shape `(B, S, cross_attention_dim)`, or with an IP-Adapter the pair `(text, [image tokens])` that its
processors take apart), `attention_mask` (additive `(B, 1, N)` bias on the self-attention scores),
`encoder_attention_mask` (additive `(B, 1, S)` bias on the cross-attention scores: 0 keeps a text token, -10000 drops
it) and `cross_attention_kwargs` (extra arguments of the attention processors).
"""

from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.activations import get_activation
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.utils.torch_utils import apply_freeu
from torch import nn

# What `encoder_hidden_states` may be: text hidden states, or (text, [image tokens]) with an IP-Adapter loaded.
EncoderHiddenStates = torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]


class ResnetBlock(nn.Module):
    r"""
    A ResNet block conditioned on the time embedding: GroupNorm, activation, 3x3 conv, time conditioning, GroupNorm,
    activation, dropout, 3x3 conv, plus a (1x1-projected where channels change) shortcut.

    Args:
        in_channels (`int`): Channels of the input.
        out_channels (`int`): Channels of the output.
        temb_channels (`int`): Width of the time embedding.
        groups (`int`): Number of GroupNorm groups.
        eps (`float`): GroupNorm epsilon.
        dropout (`float`): Dropout probability before the second convolution.
        act_fn (`str`): Activation, one of diffusers' `get_activation` names (`"silu"`, `"mish"`, `"gelu"`, ...).
        time_scale_shift (`str`): How the time embedding enters. `"default"` adds a projection of it to the
            features before the second norm (Ho et al. 2020); `"scale_shift"` modulates the second norm's output,
            `norm(h) * (1 + scale) + shift` (AdaGN, Dhariwal & Nichol 2021, https://arxiv.org/abs/2105.05233).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int,
        eps: float,
        dropout: float,
        act_fn: str,
        time_scale_shift: Literal["default", "scale_shift"],
    ):
        super().__init__()
        self.time_scale_shift = time_scale_shift
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        time_out_channels = 2 * out_channels if time_scale_shift == "scale_shift" else out_channels
        self.time_emb_proj = nn.Linear(temb_channels, time_out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = get_activation(act_fn)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(B, in_channels, H, W)`): Input features.
            temb (`torch.Tensor` of shape `(B, temb_channels)`): The time embedding, *already passed through the
                activation* (the U-Net applies it once for all blocks).

        Returns:
            `torch.Tensor` of shape `(B, out_channels, H, W)`.
        """
        # The shortcut first: under no_grad the (in decoder blocks wider) input is then freed after `norm1`.
        shortcut = hidden_states if self.conv_shortcut is None else self.conv_shortcut(hidden_states)
        hidden_states = self.conv1(self.nonlinearity(self.norm1(hidden_states)))
        temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_scale_shift == "scale_shift":
            scale, shift = temb.chunk(2, dim=1)
            hidden_states = torch.addcmul(shift, self.norm2(hidden_states), 1 + scale)
        else:
            # In place: autograd keeps a convolution's input, never its output.
            hidden_states = self.norm2(hidden_states.add_(temb))
        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))
        return hidden_states.add_(shortcut)


class TransformerBlock(nn.Module):
    r"""
    A pre-norm transformer block on image tokens: self-attention, cross-attention to the text, GEGLU feed-forward
    (Shazeer 2020, https://arxiv.org/abs/2002.05202), each with a residual connection. Same computation and parameter
    names as diffusers' `BasicTransformerBlock` with its defaults.

    Args:
        dim (`int`): Token width.
        num_heads (`int`): Number of attention heads (`dim // num_heads` channels each).
        cross_attention_dim (`int`): Width of the text hidden states.
    """

    def __init__(self, dim: int, num_heads: int, cross_attention_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(query_dim=dim, heads=num_heads, dim_head=dim // num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(
            query_dim=dim, cross_attention_dim=cross_attention_dim, heads=num_heads, dim_head=dim // num_heads
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: EncoderHiddenStates,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(B, N, dim)`): Image tokens.
            encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs: The conditioning
                described in the module docstring.

        Returns:
            `torch.Tensor` of shape `(B, N, dim)`.
        """
        cross_attention_kwargs = cross_attention_kwargs or {}
        hidden_states = hidden_states + self.attn1(
            self.norm1(hidden_states), attention_mask=attention_mask, **cross_attention_kwargs
        )
        hidden_states = hidden_states + self.attn2(
            self.norm2(hidden_states),
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **cross_attention_kwargs,
        )
        return hidden_states + self.ff(self.norm3(hidden_states))


class SpatialTransformer(nn.Module):
    r"""
    Transformer on a feature map (Rombach et al. 2022): GroupNorm, linear `proj_in` to tokens, `TransformerBlock`s,
    linear `proj_out`, residual connection around it all.

    Args:
        channels (`int`): Channels of the feature map (and token width).
        num_heads (`int`): Number of attention heads.
        num_layers (`int`): Number of `TransformerBlock`s.
        cross_attention_dim (`int`): Width of the text hidden states.
        groups (`int`): Number of GroupNorm groups.
    """

    def __init__(self, channels: int, num_heads: int, num_layers: int, cross_attention_dim: int, groups: int):
        super().__init__()
        # eps=1e-6 as in diffusers' Transformer2DModel (its value is not configurable there either).
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, num_heads, cross_attention_dim) for _ in range(num_layers)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: EncoderHiddenStates,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(B, C, H, W)`): Feature map.
            encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs: The conditioning
                described in the module docstring.

        Returns:
            `torch.Tensor` of shape `(B, C, H, W)`.
        """
        batch, channels, height, width = hidden_states.shape
        residual = hidden_states
        # (B, C, H, W) -> (B, H*W, C)
        hidden_states = self.norm(hidden_states).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        hidden_states = self.proj_in(hidden_states)
        for block in self.transformer_blocks:
            hidden_states = block(
                hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs
            )
        hidden_states = self.proj_out(hidden_states)
        # (B, H*W, C) -> (B, C, H, W) as a view; the sum takes the layout of its first operand, so it comes out
        # NCHW-contiguous without a separate `.contiguous()` copy.
        return residual + hidden_states.view(batch, height, width, channels).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    r"""Halves the resolution with a stride-2 3x3 convolution (odd sizes round up: 9 -> 5)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden_states)


class Upsample(nn.Module):
    r"""Nearest-neighbour resize to a given size (that of the skip connection it meets next), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
        # An explicit size (not scale_factor=2) undoes the round-up of `Downsample` on odd sizes (5 -> 9).
        return self.conv(F.interpolate(hidden_states, size=output_size, mode="nearest"))


class UNetStage(nn.Module):
    r"""Base of the down/mid/up stages: runs sub-modules under gradient checkpointing when it is enabled."""

    def __init__(self):
        super().__init__()
        # Set by `ModelMixin.enable_gradient_checkpointing`, together with `_gradient_checkpointing_func`.
        self.gradient_checkpointing = False

    def _run(self, module: nn.Module, *args: Any) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)


class DownBlock(UNetStage):
    r"""
    One resolution level of the encoder: `num_layers` ResNet blocks (each followed by a spatial transformer when
    `attention_kwargs` is given), then an optional `Downsample`. Every intermediate output is a skip connection.

    Args:
        in_channels (`int`): Channels of the input.
        out_channels (`int`): Channels of this level.
        num_layers (`int`): Number of ResNet blocks.
        add_downsample (`bool`): Whether to halve the resolution at the end.
        resnet_kwargs (`dict`): Arguments of `ResnetBlock` other than the channels.
        attention_kwargs (`dict`, *optional*): Arguments of `SpatialTransformer` other than the channels; `None`
            for a level without attention.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        add_downsample: bool,
        resnet_kwargs: dict[str, Any],
        attention_kwargs: dict[str, Any] | None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, **resnet_kwargs)
                for i in range(num_layers)
            ]
        )
        self.attentions = None
        if attention_kwargs is not None:
            self.attentions = nn.ModuleList(
                [SpatialTransformer(out_channels, **attention_kwargs) for _ in range(num_layers)]
            )
        # A list of one, named as in diffusers' blocks, so that state dicts match.
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if add_downsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: EncoderHiddenStates,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        additional_residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(B, in_channels, H, W)`): Input features.
            temb (`torch.Tensor` of shape `(B, temb_channels)`): Activated time embedding.
            encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs: The conditioning
                described in the module docstring.
            additional_residual (`torch.Tensor` of shape `(B, out_channels, H, W)`, *optional*): A T2I-Adapter
                feature, added to the output of the last ResNet (and transformer) block, before downsampling.

        Returns:
            The output, of shape `(B, out_channels, H', W')`, and the skip connections in the order they were made.
        """
        skips = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = self._run(resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self._run(
                    self.attentions[i],
                    hidden_states,
                    encoder_hidden_states,
                    attention_mask,
                    encoder_attention_mask,
                    cross_attention_kwargs,
                )
            if i == len(self.resnets) - 1 and additional_residual is not None:
                hidden_states = hidden_states + additional_residual
            skips += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class MidBlock(UNetStage):
    r"""
    The bottleneck: a ResNet block, then, with attention, a spatial transformer and a second ResNet block. Without
    attention it is the single ResNet block of diffusers' `UNetMidBlock2D` in a `UNet2DConditionModel`.

    Args:
        channels (`int`): Channels of the bottleneck.
        resnet_kwargs (`dict`): Arguments of `ResnetBlock` other than the channels.
        attention_kwargs (`dict`, *optional*): Arguments of `SpatialTransformer` other than the channels; `None`
            for no attention.
    """

    def __init__(self, channels: int, resnet_kwargs: dict[str, Any], attention_kwargs: dict[str, Any] | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, **resnet_kwargs)])
        self.attentions = None
        if attention_kwargs is not None:
            self.attentions = nn.ModuleList([SpatialTransformer(channels, **attention_kwargs)])
            self.resnets.append(ResnetBlock(channels, channels, **resnet_kwargs))

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: EncoderHiddenStates,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        r"""Same arguments as `DownBlock.forward`; returns a tensor of the input's shape."""
        hidden_states = self._run(self.resnets[0], hidden_states, temb)
        if self.attentions is not None:
            hidden_states = self._run(
                self.attentions[0],
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                encoder_attention_mask,
                cross_attention_kwargs,
            )
            hidden_states = self._run(self.resnets[1], hidden_states, temb)
        return hidden_states


class UpBlock(UNetStage):
    r"""
    One resolution level of the decoder: one ResNet block per skip connection, each fed the previous output
    concatenated with that skip (and followed by a spatial transformer when `attention_kwargs` is given), then an
    optional `Upsample`.

    Args:
        resolution_idx (`int`): Position of the block in the decoder, 0 for the coarsest level (FreeU scales the
            first two).
        in_channels (`int`): Channels of the block input (the output of the level below).
        out_channels (`int`): Channels of this level.
        skip_channels (`list[int]`): Channels of the skip connections, in the order they are consumed.
        add_upsample (`bool`): Whether to upsample at the end.
        resnet_kwargs (`dict`): Arguments of `ResnetBlock` other than the channels.
        attention_kwargs (`dict`, *optional*): Arguments of `SpatialTransformer` other than the channels; `None`
            for a level without attention.
    """

    def __init__(
        self,
        resolution_idx: int,
        in_channels: int,
        out_channels: int,
        skip_channels: list[int],
        add_upsample: bool,
        resnet_kwargs: dict[str, Any],
        attention_kwargs: dict[str, Any] | None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock((in_channels if i == 0 else out_channels) + skip, out_channels, **resnet_kwargs)
                for i, skip in enumerate(skip_channels)
            ]
        )
        self.attentions = None
        if attention_kwargs is not None:
            self.attentions = nn.ModuleList(
                [SpatialTransformer(out_channels, **attention_kwargs) for _ in skip_channels]
            )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if add_upsample else None
        self.resolution_idx = resolution_idx
        # FreeU's `{"s1", "s2", "b1", "b2"}`, set by `ConditionalUNet.enable_freeu`.
        self.freeu: dict[str, float] | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        encoder_hidden_states: EncoderHiddenStates,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(B, in_channels, H, W)`): Input features.
            skips (`list[torch.Tensor]`): The encoder's skip connections in the order it made them. The block pops
                its own from the end (so a skip is freed as soon as it is used, under `no_grad`) and upsamples to
                the size of the next one, which undoes the round-up of odd sizes in the encoder.
            temb, encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs: See
                `DownBlock.forward`.

        Returns:
            `torch.Tensor` of shape `(B, out_channels, H', W')`.
        """
        for i, resnet in enumerate(self.resnets):
            skip = skips.pop()
            if self.freeu is not None:
                # FreeU (Si et al. 2023, https://arxiv.org/abs/2309.11497): amplify the backbone features and damp
                # the low frequencies of the skip, in the first two decoder levels only.
                hidden_states, skip = apply_freeu(self.resolution_idx, hidden_states, skip, **self.freeu)
            hidden_states = self._run(resnet, torch.cat([hidden_states, skip], dim=1), temb)
            if self.attentions is not None:
                hidden_states = self._run(
                    self.attentions[i],
                    hidden_states,
                    encoder_hidden_states,
                    attention_mask,
                    encoder_attention_mask,
                    cross_attention_kwargs,
                )
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, skips[-1].shape[-2:])
        return hidden_states
