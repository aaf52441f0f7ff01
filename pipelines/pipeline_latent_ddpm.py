"""Text-to-image sampling, SDEdit image-to-image and inpainting with a latent DDPM.

The denoiser runs in the latent space of a VAE (Rombach et al. 2022, https://arxiv.org/abs/2112.10752), conditioned
on text by cross-attention and guided by classifier-free guidance (Ho & Salimans 2022,
https://arxiv.org/abs/2207.12598).
"""

import inspect
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny, DiffusionPipeline, SchedulerMixin, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders.guider_utils import rescale_noise_cfg
from diffusers.image_processor import PipelineImageInput, VaeImageProcessor
from diffusers.loaders import IPAdapterMixin, StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline, retrieve_timesteps
from diffusers.utils import USE_PEFT_BACKEND, BaseOutput, replace_example_docstring
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo, upload_folder
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection, PreTrainedModel, PreTrainedTokenizerBase

from latentddpm import convert
from latentddpm.latents import decode_latents, encode_images, vae_scale_factor
from latentddpm.models import ConditionalUNet
from latentddpm.text import encode_prompt

from .model_card import prepare_hub_folder
from .space import write_space

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from latentddpm import LatentDDPMPipeline

        >>> # a folder written by `pipe.save_pretrained` (e.g. by `latentddpm train-ldm`) or a Hub repo id
        >>> pipe = LatentDDPMPipeline.from_pretrained("outputs/ldm/pipeline")
        >>> generator = torch.Generator().manual_seed(0)
        >>> image = pipe("a red circle above a blue square", guidance_scale=3.0, generator=generator).images[0]
        >>> image.save("sample.png")
        ```
"""

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class LatentDDPMPipelineOutput(BaseOutput):
    """Output of [`LatentDDPMPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` of shape `(B, H, W, 3)` or `torch.Tensor`):
            the samples: PIL images or a float array/tensor in `[0, 1]` (`(B, 3, H, W)` for `"pt"`), or the scaled
            latents of shape `(B, C, H // f, W // f)` for `output_type="latent"`.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class LatentDDPMPipeline(DiffusionPipeline, StableDiffusionMixin, StableDiffusionLoraLoaderMixin, IPAdapterMixin):
    r"""Text-to-image latent diffusion, with SDEdit image-to-image and inpainting.

    It has Stable Diffusion's loaders and switches: `load_lora_weights`, `save_lora_weights`, `fuse_lora`,
    `set_adapters`, `unload_lora_weights` (U-Net and text-encoder LoRAs, with peft: `pip install latentddpm[lora]`),
    `load_ip_adapter` (Ye et al. 2023, https://arxiv.org/abs/2308.06721), `enable_freeu` and `fuse_qkv_projections`.
    `cross_attention_kwargs` reach the U-Net's attention processors, and its `"scale"` weighs the LoRAs of the U-Net
    and the text encoder. A U-Net with `time_cond_proj_dim` (a guidance-distilled, LCM-style model) gets the guidance
    scale as an embedding instead of classifier-free guidance, as in diffusers' Stable Diffusion and LCM pipelines.
    `from_pretrained(path, vae=None, unet=None)` loads only what [`encode_prompt`] needs.

    Deliberate differences from `StableDiffusionPipeline` (and diffusers' common pipeline tests):

    - [`encode_prompt`] returns the attention masks too, `(embeds, mask, negative_embeds, negative_mask)`, and with
      `use_attention_mask=True` refuses `prompt_embeds` without their mask; there is no `clip_skip` (the text encoder
      is any `last_hidden_state` model, see `latentddpm.text`).
    - Text-encoder LoRA weights of a BERT text encoder (our default) cannot be loaded by `load_lora_weights`:
      diffusers' text-encoder loader knows CLIP's layer names only (`q_proj`, `k_proj`, `v_proj`, `out_proj`) and
      fails with "Could not automatically infer state dict type"; U-Net LoRAs load, and LoRA layers put on the text
      encoder with peft are weighed by `cross_attention_kwargs["scale"]`. A CLIP text encoder's LoRA (a Stable
      Diffusion base's, as `train_ldm --text_encoder_lora_rank` trains it) loads.
    - No safety checker, textual inversion (`TextualInversionLoaderMixin`) or `from_single_file`; `guidance_scale`
      defaults to 3.0.
    - `vae_scale_factor`, `image_processor` and `mask_processor` follow `self.vae` and raise without one.

    Args:
        vae (`AutoencoderKL` or `AutoencoderTiny`): maps images to latents and back; its config's `scaling_factor` and
            `shift_factor` scale the latents (see `latentddpm.latents`).
        text_encoder (`PreTrainedModel`): a text encoder returning `last_hidden_state`, such as `BertModel`
            (all-MiniLM-L6-v2), `CLIPTextModel` or `T5EncoderModel`.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer; `tokenizer.model_max_length` is the prompt length.
        unet (`ConditionalUNet`): the denoiser, or any model with `UNet2DConditionModel`'s call signature. When its
            `out_channels` is twice its `in_channels` it also predicts the variance (Nichol & Dhariwal 2021).
        scheduler (`SchedulerMixin`): our `DDPMNoiseScheduler` or any compatible diffusers scheduler, e.g.
            `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`. Only schedulers with a learned
            `variance_type` receive the variance channels. With a learned-variance U-Net, build DPM-Solver with
            `variance_type=None`: diffusers' DPM-Solver keeps the first 3 channels of a learned-variance output
            (written for pixel-space DeepFloyd IF), which is wrong for 4 latent channels.
        use_attention_mask (`bool`, defaults to `True`): how the U-Net was trained, recorded in `model_index.json`
            (a folder saved before this key existed loads as `True`). `True` (latentddpm's training): the text
            encoder gets the tokenizer's attention mask and the U-Net's cross-attention ignores the padding, so
            `prompt_embeds` must come with their `prompt_attention_mask`. `False` (Stable Diffusion's convention):
            the U-Net attends to the padding too, and embeddings are taken without a mask.
        image_encoder (`CLIPVisionModelWithProjection`, *optional*): the IP-Adapter's image encoder, registered by
            `load_ip_adapter` from the adapter's folder.
        feature_extractor (`CLIPImageProcessor`, *optional*): its image preprocessing, created by `load_ip_adapter`.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = ["image_encoder", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL | AutoencoderTiny,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        unet: ConditionalUNet | UNet2DConditionModel,
        scheduler: SchedulerMixin,
        use_attention_mask: bool = True,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_to_config(use_attention_mask=use_attention_mask)

    # The VAE-derived attributes follow `self.vae`, which is `None` in a pipeline loaded for `encode_prompt` only.
    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            raise ValueError("This pipeline was loaded without a `vae`: load one to make or edit images.")
        return vae_scale_factor(self.vae)

    @property
    def image_processor(self) -> VaeImageProcessor:
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def mask_processor(self) -> VaeImageProcessor:
        # Masks stay in [0, 1] and are binarized: 1 marks pixels to repaint, 0 pixels to keep (as in diffusers).
        return VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def do_classifier_free_guidance(self) -> bool:
        # `guidance_scale` is the weight w + 1 of Ho & Salimans 2022, eq. 6: 1 means no guidance. A U-Net with
        # `time_cond_proj_dim` was distilled to take the guidance scale as an input instead (`timestep_cond`).
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def enable_vae_slicing(self):
        """Decode (and encode) one image at a time, to save memory at large batch sizes."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self):
        """Undo [`enable_vae_slicing`]."""
        self.vae.disable_slicing()

    def enable_vae_tiling(self):
        """Decode (and encode) in overlapping tiles, to save memory at large image sizes."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self):
        """Undo [`enable_vae_tiling`]."""
        self.vae.disable_tiling()

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        lora_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        r"""Encode the prompts, and the negative prompts when guiding, repeated `num_images_per_prompt` times.

        Without a negative prompt the unconditional embedding is that of the empty prompt `""`, which is what
        training drops captions to (see `latentddpm.text`). Only the text encoder and the tokenizer are needed: a
        pipeline loaded with `vae=None, unet=None` encodes too, and then returns the text encoder's dtype.

        Args:
            prompt (`str` or `list[str]`, *optional*): the prompts; not needed when `prompt_embeds` is given.
            device (`torch.device`): where the embeddings go.
            num_images_per_prompt (`int`): how many images each prompt makes.
            do_classifier_free_guidance (`bool`): whether to also return the unconditional embeddings.
            negative_prompt (`str` or `list[str]`, *optional*): what to guide away from; `""` when `None`.
            prompt_embeds (`torch.Tensor` of shape `(B, S, D)`, *optional*): precomputed prompt embeddings.
            negative_prompt_embeds (`torch.Tensor` of shape `(B, S', D)`, *optional*): precomputed unconditional
                embeddings.
            prompt_attention_mask (`torch.Tensor` of shape `(B, S)`, *optional*): 1 on real tokens of
                `prompt_embeds`, 0 on padding. Required with `prompt_embeds` when `config.use_attention_mask` is true
                (the model never saw unmasked padding); unused otherwise.
            negative_prompt_attention_mask (`torch.Tensor` of shape `(B, S')`, *optional*): the same for
                `negative_prompt_embeds`.
            lora_scale (`float`, *optional*): the weight of the text encoder's LoRA layers for this call.

        Returns:
            `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)`, each
            with `B * num_images_per_prompt` rows; the negative ones are `None` without guidance.
        """
        if self.config.use_attention_mask:
            for name, embeds, mask in (
                ("prompt", prompt_embeds, prompt_attention_mask),
                ("negative_prompt", negative_prompt_embeds, negative_prompt_attention_mask),
            ):
                if embeds is not None and mask is None:
                    raise ValueError(
                        f"`{name}_embeds` need their `{name}_attention_mask`: this model was trained with masked"
                        " padding (`use_attention_mask=True`); pass the mask, or set `use_attention_mask` to False"
                        " for Stable-Diffusion-style embeddings."
                    )
        # Prompts and negative prompts that still need encoding go through the text encoder in one batch: one call
        # instead of two is a visible share of a short sampling run.
        texts = []
        if prompt_embeds is None:
            texts += [prompt] if isinstance(prompt, str) else prompt
        batch_size = len(texts) or prompt_embeds.shape[0]
        encode_negative = do_classifier_free_guidance and negative_prompt_embeds is None
        if encode_negative:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            texts += [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
        if texts:
            # As in StableDiffusionPipeline.encode_prompt: the text encoder's LoRA layers take the call's scale and
            # get their own back afterwards.
            scale_text_encoder_lora = lora_scale is not None and USE_PEFT_BACKEND
            if scale_text_encoder_lora:
                scale_lora_layers(self.text_encoder, lora_scale)
            try:
                embeds, attention_mask = encode_prompt(
                    texts, self.tokenizer, self.text_encoder, device, use_attention_mask=self.config.use_attention_mask
                )
            finally:
                if scale_text_encoder_lora:
                    unscale_lora_layers(self.text_encoder, lora_scale)
            if prompt_embeds is None:
                prompt_embeds, prompt_attention_mask = embeds[:batch_size], attention_mask[:batch_size]
            if encode_negative:
                negative_prompt_embeds = embeds[-batch_size:]
                negative_prompt_attention_mask = attention_mask[-batch_size:]
        # Missing masks are refused above with `use_attention_mask`; without it the U-Net attends to every token.
        if prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=device)
        if negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(
                negative_prompt_embeds.shape[:2], dtype=torch.long, device=device
            )

        def repeat(tensor: torch.Tensor) -> torch.Tensor:
            # (B, ...) -> (B * num_images_per_prompt, ...), the images of one prompt next to each other
            return tensor.to(device).repeat_interleave(num_images_per_prompt, dim=0)

        dtype = prompt_embeds.dtype if self.unet is None else self.unet.dtype
        prompt_embeds = repeat(prompt_embeds).to(dtype)
        prompt_attention_mask = repeat(prompt_attention_mask)
        if not do_classifier_free_guidance:
            return prompt_embeds, prompt_attention_mask, None, None
        negative_prompt_embeds = repeat(negative_prompt_embeds).to(dtype)
        negative_prompt_attention_mask = repeat(negative_prompt_attention_mask)
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    # Stable Diffusion's IP-Adapter image encoding (zero image embeddings for the unconditional branch) and its
    # guidance embedding, taken as they are, so that the same adapters and guidance-distilled U-Nets behave alike.
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds
    get_guidance_scale_embedding = StableDiffusionPipeline.get_guidance_scale_embedding

    @staticmethod
    def _batch_size(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
        """Number of prompts, before `num_images_per_prompt`."""
        if prompt is None:
            return prompt_embeds.shape[0]
        return 1 if isinstance(prompt, str) else len(prompt)

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        height: int,
        width: int,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        prompt_attention_mask: torch.Tensor | None,
        negative_prompt_attention_mask: torch.Tensor | None,
        image: PipelineImageInput | None,
        mask_image: PipelineImageInput | None,
        strength: float,
        latents: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    ):
        """Raise a `ValueError` naming the first bad argument of [`__call__`]."""
        if height % self.vae_scale_factor != 0 or width % self.vae_scale_factor != 0:
            raise ValueError(
                f"`height` and `width` have to be divisible by the VAE scale factor {self.vae_scale_factor} but are"
                f" {height} and {width}."
            )
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        if prompt is not None and not (isinstance(prompt, str) or isinstance(prompt, list) and prompt):
            raise ValueError(f"`prompt` has to be a `str` or a non-empty `list` of them but is {prompt!r}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")

        batch_size = self._batch_size(prompt, prompt_embeds)
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} prompts but `prompt` has {batch_size}; pass one"
                " negative prompt per prompt, or a single `str`."
            )
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape[0] != negative_prompt_embeds.shape[0] or (
                prompt_embeds.shape[2] != negative_prompt_embeds.shape[2]
            ):
                raise ValueError(
                    f"`prompt_embeds` of shape {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` of shape"
                    f" {tuple(negative_prompt_embeds.shape)} must agree in batch size and embedding size."
                )
        for name, embeds, mask in (
            ("prompt", prompt_embeds, prompt_attention_mask),
            ("negative_prompt", negative_prompt_embeds, negative_prompt_attention_mask),
        ):
            if mask is not None and (embeds is None or mask.shape != embeds.shape[:2]):
                raise ValueError(
                    f"`{name}_attention_mask` of shape {tuple(mask.shape)} needs `{name}_embeds` of shape (B, S, D)"
                    f" with (B, S) equal to it, but `{name}_embeds` is"
                    f" {None if embeds is None else tuple(embeds.shape)}."
                )

        if not 0 <= strength <= 1:
            raise ValueError(f"`strength` has to be in [0.0, 1.0] but is {strength}.")
        if mask_image is not None and image is None:
            raise ValueError("`mask_image` needs the `image` to inpaint.")
        if image is not None and latents is not None:
            raise ValueError("`latents` cannot be combined with `image`: image editing starts from the encoded image.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` has to be one of {OUTPUT_TYPES} but is {output_type!r}.")
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("Pass at most one of `ip_adapter_image` and `ip_adapter_image_embeds`.")
        if ip_adapter_image_embeds is not None:
            if not isinstance(ip_adapter_image_embeds, list):
                raise ValueError(
                    "`ip_adapter_image_embeds` has to be a list of tensors, one per IP-Adapter, but is a"
                    f" {type(ip_adapter_image_embeds).__name__}."
                )
            ndims = [embeds.ndim for embeds in ip_adapter_image_embeds]
            if any(ndim not in (3, 4) for ndim in ndims):
                raise ValueError(f"`ip_adapter_image_embeds` have to be 3D or 4D tensors but have {ndims} dimensions.")
        unknown_inputs = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown_inputs:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs} but has"
                f" {unknown_inputs}."
            )

    def prepare_latents(
        self,
        shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial latents x_T: standard Gaussian noise (or the given `latents`) times `scheduler.init_noise_sigma`."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif latents.shape != shape:
            raise ValueError(f"`latents` have to be of shape {shape} but are of shape {tuple(latents.shape)}.")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def preprocess_image(
        self,
        image: PipelineImageInput,
        processor: VaeImageProcessor,
        height: int,
        width: int,
        batch_size: int,
        num_images_per_prompt: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Preprocess an image or mask to `(height, width)` and repeat it to `batch_size * num_images_per_prompt` rows.

        The image batch holds either one image for all prompts or one per prompt.

        Returns:
            `torch.Tensor` of shape `(batch_size * num_images_per_prompt, channels, height, width)`.
        """
        pixels = processor.preprocess(image, height=height, width=width).to(device)
        if pixels.shape[0] not in (1, batch_size):
            raise ValueError(
                f"`image` and `mask_image` need 1 or {batch_size} (one per prompt) images but have {pixels.shape[0]}."
            )
        return pixels.repeat_interleave(batch_size * num_images_per_prompt // pixels.shape[0], dim=0)

    def prepare_extra_step_kwargs(
        self, generator: torch.Generator | list[torch.Generator] | None, eta: float
    ) -> dict[str, Any]:
        """The `eta` and `generator` arguments of `scheduler.step`, for the schedulers that take them.

        eta is the η of DDIM (Song et al. 2021, eq. 16, https://arxiv.org/abs/2010.02502): 0 is deterministic DDIM,
        1 the DDPM posterior variance.
        """
        step_parameters = inspect.signature(self.scheduler.step).parameters
        extra_step_kwargs = {}
        if "eta" in step_parameters:
            extra_step_kwargs["eta"] = eta
        if "generator" in step_parameters:
            extra_step_kwargs["generator"] = generator
        return extra_step_kwargs

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.0,
        guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        image: PipelineImageInput | None = None,
        mask_image: PipelineImageInput | None = None,
        strength: float = 0.8,
        output_type: Literal["pil", "np", "pt", "latent"] = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[["LatentDDPMPipeline", int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> LatentDDPMPipelineOutput | tuple:
        r"""Generate images from text, or edit `image` (SDEdit) and inpaint `mask_image` regions of it.

        Args:
            prompt (`str` or `list[str]`, *optional*): the prompts; pass `prompt_embeds` instead to skip encoding.
            negative_prompt (`str` or `list[str]`, *optional*): what guidance steers away from; `""` when `None`.
            height (`int`, *optional*): image height, a multiple of the VAE scale factor; defaults to
                `unet.config.sample_size * vae_scale_factor`. `image` and `mask_image` are resized to it. A U-Net
                with `addition_time_embed_dim` is conditioned on it as the size of an uncropped image (SDXL's
                `time_ids = (height, width, 0, 0, height, width)`).
            width (`int`, *optional*): image width, likewise.
            num_inference_steps (`int`, defaults to 50): denoising steps; more is slower and usually better.
            timesteps (`list[int]`, *optional*): custom descending timesteps, for schedulers whose `set_timesteps`
                takes them; overrides `num_inference_steps`.
            sigmas (`list[float]`, *optional*): custom descending noise levels (e.g. an Align-Your-Steps schedule),
                for schedulers whose `set_timesteps` takes them, such as `EulerDiscreteScheduler`; overrides
                `num_inference_steps`. Not with `timesteps`.
            guidance_scale (`float`, defaults to 3.0): classifier-free guidance scale (Ho & Salimans 2022); values
                `<= 1` disable guidance and its unconditional U-Net pass. A U-Net with `time_cond_proj_dim` gets
                it as the embedding of `guidance_scale - 1` instead, in one conditional pass (as diffusers' LCM
                pipeline does).
            guidance_rescale (`float`, defaults to 0.0): rescales the guided prediction towards the standard deviation
                of the conditional one to fight over-exposure (Lin et al. 2023, section 3.4,
                https://arxiv.org/abs/2305.08891); 0 disables it.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            eta (`float`, defaults to 0.0): DDIM's η, passed to schedulers whose `step` takes it.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): makes sampling reproducible; a
                list gives one generator per image.
            latents (`torch.Tensor` of shape `(B * num_images_per_prompt, C, height // f, width // f)`, *optional*):
                initial Gaussian noise, instead of drawing it from `generator`. Not with `image`.
            prompt_embeds (`torch.Tensor` of shape `(B, S, D)`, *optional*): precomputed text embeddings.
            negative_prompt_embeds (`torch.Tensor` of shape `(B, S', D)`, *optional*): precomputed unconditional
                embeddings.
            prompt_attention_mask (`torch.Tensor` of shape `(B, S)`, *optional*): mask of `prompt_embeds`; 1 on real
                tokens, 0 on padding. Required with `prompt_embeds` when `config.use_attention_mask` is true.
            negative_prompt_attention_mask (`torch.Tensor` of shape `(B, S')`, *optional*): mask of
                `negative_prompt_embeds`.
            ip_adapter_image (`PipelineImageInput` or `list[PipelineImageInput]`, *optional*): the image prompt of
                each loaded IP-Adapter, encoded by `image_encoder`; the unconditional branch gets zero embeddings.
            ip_adapter_image_embeds (`list[torch.Tensor]`, *optional*): precomputed image embeddings instead, one
                tensor per IP-Adapter of shape `(B * num_images_per_prompt, K, D)`, or `(2 * ..., K, D)` holding
                `[unconditional, conditional]` when guiding, as `prepare_ip_adapter_image_embeds` returns them.
            image (`PipelineImageInput`, *optional*): image(s) to edit, one for all prompts or one per prompt. It is
                encoded, noised to timestep `strength * T` and denoised from there (SDEdit, Meng et al. 2022,
                https://arxiv.org/abs/2108.01073).
            mask_image (`PipelineImageInput`, *optional*): inpainting mask for `image`: white (1) is repainted, black
                (0) is kept. After every step the kept region is replaced by the encoded image noised to the next
                timestep (Lugmayr et al. 2022, https://arxiv.org/abs/2201.09865, without resampling), and at the end
                by the encoded image itself.
            strength (`float`, defaults to 0.8): with `image`, how much of the schedule is run, in `[0, 1]`: 0 returns
                the image after a VAE round trip, 1 starts from (almost) pure noise.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` (scaled latents, not
                decoded).
            return_dict (`bool`, defaults to `True`): return a [`LatentDDPMPipelineOutput`] rather than a tuple.
            cross_attention_kwargs (`dict`, *optional*): passed to the U-Net's attention processors; its `"scale"`
                weighs the LoRA layers of the U-Net and the text encoder.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called as
                `callback_on_step_end(self, i, t, callback_kwargs)` after every step with the tensors named in
                `callback_on_step_end_tensor_inputs`; the dict it returns may replace them.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): a subset of
                `["latents", "prompt_embeds", "negative_prompt_embeds"]`.

        Examples:

        Returns:
            [`LatentDDPMPipelineOutput`] or `tuple`: the images, as `.images` or as the tuple's only element.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default size: the U-Net's training resolution
        if self.vae is None or self.unet is None:
            raise ValueError("This pipeline was loaded without its `vae` or `unet`: it can only `encode_prompt`.")
        if height is None or width is None:
            sample_size = self.unet.config.sample_size
            if sample_size is None:
                raise ValueError("`unet.config.sample_size` is None: pass `height` and `width`.")
            sample_height, sample_width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
            height = height or sample_height * self.vae_scale_factor
            width = width or sample_width * self.vae_scale_factor

        # 1. Check inputs
        self.check_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
            image,
            mask_image,
            strength,
            latents,
            output_type,
            callback_on_step_end_tensor_inputs,
            ip_adapter_image,
            ip_adapter_image_embeds,
        )
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        batch_size = self._batch_size(prompt, prompt_embeds)
        num_images = batch_size * num_images_per_prompt

        # 2. Encode the prompts
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
            self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                self.do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds,
                negative_prompt_embeds,
                prompt_attention_mask,
                negative_prompt_attention_mask,
                lora_scale=(cross_attention_kwargs or {}).get("scale"),
            )
        )
        image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, num_images, self.do_classifier_free_guidance
            )

        # 3. Prepare timesteps; image editing runs only the last `strength` of them (SDEdit)
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps, sigmas
        )
        if image is not None:
            t_start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            timesteps = timesteps[t_start * self.scheduler.order :]
            # multistep and Karras-sigma schedulers track their position in the schedule
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(t_start * self.scheduler.order)
        self._num_timesteps = len(timesteps)

        # 4. Prepare latents: pure noise, or the encoded image noised to the first timestep
        num_channels_latents = self.unet.config.in_channels
        shape = (num_images, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        dtype = prompt_embeds.dtype  # the U-Net's, set by encode_prompt
        init_latents = noise = mask = None
        if image is None:
            latents = self.prepare_latents(shape, dtype, device, generator, latents)
        else:
            pixels = self.preprocess_image(
                image, self.image_processor, height, width, batch_size, num_images_per_prompt, device
            )
            # The posterior mean is the cleanest latent of the image; a posterior sample would add noise that the
            # schedule does not account for, and inpainting copies these latents into the kept region.
            init_latents = encode_images(self.vae, pixels, sample_posterior=False).to(dtype)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            latents = init_latents
            if len(timesteps):
                latents = self.scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(num_images))
            if mask_image is not None:
                mask = self.preprocess_image(
                    mask_image, self.mask_processor, height, width, batch_size, num_images_per_prompt, device
                )
                mask = F.interpolate(mask, size=shape[2:]).to(dtype)  # (N, 1, h, w), nearest as in diffusers
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        added_cond_kwargs = {} if image_embeds is None else {"image_embeds": image_embeds}
        if self.unet.config.get("addition_time_embed_dim") is not None:
            # SDXL's size and crop micro-conditioning at its defaults: an uncropped image of the output size (the
            # order of `ImageTransform.with_time_ids`), for both halves of a guided batch.
            model_batch = 2 * num_images if self.do_classifier_free_guidance else num_images
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
            added_cond_kwargs["time_ids"] = time_ids.repeat(model_batch, 1)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance = torch.tensor(self.guidance_scale - 1).repeat(num_images)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=dtype)
        # Only schedulers that take a `variance_type` (DDPM, DPM-Solver) read variance channels: `from_config` also
        # copies the key into the config of the others (e.g. DDIM) as an unused entry.
        scheduler_reads_variance = "variance_type" in inspect.signature(type(self.scheduler).__init__).parameters and (
            self.scheduler.config.variance_type in ("learned", "learned_range")
        )

        # 5. Denoise
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            model_input, encoder_hidden_states, encoder_attention_mask = latents, prompt_embeds, prompt_attention_mask
            if self.do_classifier_free_guidance:
                # one batched U-Net call for [unconditional, conditional]
                model_input = torch.cat([latents] * 2)
                encoder_hidden_states = torch.cat([negative_prompt_embeds, prompt_embeds])
                encoder_attention_mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask])
            if not self.config.use_attention_mask:
                encoder_attention_mask = None  # Stable Diffusion's convention: attend to the padding too
            model_input = self.scheduler.scale_model_input(model_input, t)
            model_output = self.unet(
                model_input,
                t,
                encoder_hidden_states=encoder_hidden_states,
                timestep_cond=timestep_cond,
                cross_attention_kwargs=self.cross_attention_kwargs,
                added_cond_kwargs=added_cond_kwargs,
                encoder_attention_mask=encoder_attention_mask,
                return_dict=False,
            )[0]

            # A learned-variance U-Net outputs [prediction, variance] along channels (Nichol & Dhariwal 2021): guide
            # the prediction only and keep the conditional variance, as diffusers' DeepFloyd IF pipeline does.
            if self.do_classifier_free_guidance:
                output_uncond, output_cond = model_output.chunk(2)
                pred_uncond, pred_cond = output_uncond[:, :num_channels_latents], output_cond[:, :num_channels_latents]
                pred = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
                if self.guidance_rescale > 0:
                    pred = rescale_noise_cfg(pred, pred_cond, guidance_rescale=self.guidance_rescale)
                model_output = torch.cat([pred, output_cond[:, num_channels_latents:]], dim=1)
            if not scheduler_reads_variance:
                model_output = model_output[:, :num_channels_latents]

            latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs, return_dict=False)[0]

            if mask is not None:
                # Keep the known region on the forward-process marginal of the image at the next timestep.
                known = init_latents
                if i < len(timesteps) - 1:
                    known = self.scheduler.add_noise(init_latents, noise, timesteps[i + 1 : i + 2].repeat(num_images))
                latents = mask * latents + (1 - mask) * known

            if callback_on_step_end is not None:
                tensors = {
                    "latents": latents,
                    "prompt_embeds": prompt_embeds,
                    "negative_prompt_embeds": negative_prompt_embeds,
                }
                callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                latents = callback_outputs.pop("latents", latents)
                prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

        # 6. Decode
        images = latents if output_type == "latent" else decode_latents(self.vae, latents)
        images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return LatentDDPMPipelineOutput(images=images)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        base_model: str | None = None,
        dataset: str | None = None,
        sample_grid: PIL.Image.Image | None = None,
        training_config: dict[str, Any] | None = None,
        license: str = "apache-2.0",
        space_repo_id: str | None = None,
    ) -> str:
        """Upload the pipeline (safetensors weights) with a model card to the Hub, and optionally a Space to try it.

        The folder is prepared by [`prepare_hub_folder`]: `save_pretrained`, plus a `README.md` with YAML metadata
        and, when given, `sample_grid.png`. The Space is the folder of [`write_space`]: the app of `latentddpm
        serve` for this repository.

        Args:
            repo_id (`str`): the Hub repository, `"user/name"`; created if missing.
            commit_message (`str`, *optional*): commit message; `"Upload LatentDDPMPipeline"` when `None`.
            private (`bool`, *optional*): whether a newly created repository is private.
            token (`str`, *optional*): Hub token; the cached login when `None`.
            create_pr (`bool`, defaults to `False`): open a pull request instead of committing to `main`.
            base_model (`str`, *optional*): the model this one was fine-tuned from, for the card.
            dataset (`str`, *optional*): the training dataset (a Hub id), for the card.
            sample_grid (`PIL.Image.Image`, *optional*): samples to show on the card.
            training_config (`dict`, *optional*): the resolved training config, shown on the card.
            license (`str`, defaults to `"apache-2.0"`): the card's license.
            space_repo_id (`str`, *optional*): a Gradio Space, `"user/name"`, to create (if missing) and upload the
                app to, with the same `private`, `token` and `create_pr`.

        Returns:
            `str`: the URL of the model repository's commit.
        """
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            prepare_hub_folder(
                self,
                folder,
                repo_id=repo_id,
                base_model=base_model,
                dataset=dataset,
                sample_grid=sample_grid,
                training_config=training_config,
                license=license,
            )
            commit = upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or f"Upload {self.__class__.__name__}",
                token=token,
                create_pr=create_pr,
            )
        if space_repo_id is not None:
            space_repo_id = create_repo(
                space_repo_id, repo_type="space", space_sdk="gradio", private=private, token=token, exist_ok=True
            ).repo_id
            with tempfile.TemporaryDirectory() as folder:
                upload_folder(
                    repo_id=space_repo_id,
                    repo_type="space",
                    folder_path=write_space(folder, repo_id),
                    commit_message=f"Space for {repo_id}",
                    token=token,
                    create_pr=create_pr,
                )
        return commit.commit_url

    @classmethod
    def from_stable_diffusion(
        cls,
        pipeline_or_path: str | DiffusionPipeline,
        single_file_config: str | None = None,
    ) -> "LatentDDPMPipeline":
        """The pipeline that samples as a Stable Diffusion 1.x/2.x pipeline does, with a `ConditionalUNet`.

        See [`latentddpm.convert.stable_diffusion_components`]: the VAE, text encoder, tokenizer and scheduler are
        the Stable Diffusion pipeline's own; the U-Net shares its weights; prompts are encoded as Stable Diffusion
        encodes them (`use_attention_mask=False`).

        Args:
            pipeline_or_path (`str`, `os.PathLike` or `StableDiffusionPipeline`): a `StableDiffusionPipeline`, a
                diffusers folder or Hub id, or a single-file checkpoint.
            single_file_config (`str` or `os.PathLike`, *optional*): for a single file, a diffusers folder or Hub id
                with the configs of its models.
        """
        return cls(**convert.stable_diffusion_components(pipeline_or_path, single_file_config))

    def to_stable_diffusion(self) -> DiffusionPipeline:
        """The diffusers `StableDiffusionPipeline` (no safety checker) with the same weights and images; see
        [`latentddpm.convert.to_stable_diffusion`] for what cannot be exported."""
        return convert.to_stable_diffusion(self)
