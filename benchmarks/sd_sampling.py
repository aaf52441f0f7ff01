"""Sampling time of a Stable Diffusion pipeline imported into latentddpm vs the original `StableDiffusionPipeline`.

Usage:
    python -m benchmarks.sd_sampling [--latent_size 16] [--steps 50] [--repeats 3] [--threads 1] [--device cpu]

The original is a `StableDiffusionPipeline` with an SD 1.x-sized U-Net: `configs/unet/base.json` (859.5M
parameters, 8 heads, 1x1-conv projections as in SD 1.x) as a `UNet2DConditionModel`, a CLIP ViT-L/14-sized text
encoder, the SD VAE config, PNDM as SD 1.x ships it; random weights (the cost does not depend on them). The imported
pipeline is `LatentDDPMPipeline.from_stable_diffusion(original)`: the same VAE, text encoder, tokenizer and scheduler
objects and a `ConditionalUNet` sharing the U-Net's weights, so only our U-Net and our pipeline differ. The tokenizer
is the all-MiniLM-L6-v2 one we ship (no CLIP tokenizer can be downloaded here), padding prompts to 77 tokens as SD's.

Both sample the same prompt with the same seed, guidance 7.5, 50 steps; calls alternate (original, imported, ...)
after one warm-up each. ratio = imported / original, from the fastest call of each (the least disturbed by other
jobs on a shared CPU) and from the medians. The images agree to within 1e-4 (checked once, printed).
"""

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from latentddpm.models import ConditionalUNet
from latentddpm.models.unet_conditional import to_unet2d_condition_config
from latentddpm.pipelines import LatentDDPMPipeline
from latentddpm.text import default_text_encoder_path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "unet"
PROMPT = "a photograph of an astronaut riding a horse"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="base", help="name of a file in configs/unet/ (without .json)")
    parser.add_argument("--latent_size", type=int, default=16, help="latent height and width (SD 1.x: 64)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per pipeline")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    return parser.parse_args(argv)


def build_stable_diffusion(config_name: str) -> StableDiffusionPipeline:
    """The original: an SD 1.x-shaped `StableDiffusionPipeline` with random weights."""
    torch.manual_seed(0)
    unet_config = to_unet2d_condition_config(ConditionalUNet.load_config(CONFIG_DIR / f"{config_name}.json"))
    unet = UNet2DConditionModel(**{**unet_config, "use_linear_projection": False})
    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path(), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=unet_config["cross_attention_dim"],
            intermediate_size=4 * unet_config["cross_attention_dim"],  # CLIP ViT-L/14's 3072 for SD's 768
            num_hidden_layers=12,
            num_attention_heads=max(1, unet_config["cross_attention_dim"] // 64),  # 12 for SD's 768
            max_position_embeddings=77,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    original = build_stable_diffusion(args.config)
    if args.device != "cpu" or dtype != torch.float32:
        original.to(args.device, dtype)
    imported = LatentDDPMPipeline.from_stable_diffusion(original)
    imported.set_progress_bar_config(disable=True)
    size = args.latent_size * original.vae_scale_factor

    def sample(pipe) -> torch.Tensor:
        generator = torch.Generator(args.device).manual_seed(0)
        return pipe(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            generator=generator,
            output_type="pt",
        ).images

    def seconds(pipe) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample(pipe)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    max_difference = (sample(imported) - sample(original)).abs().max().item()  # also the warm-up
    times = {"original": [], "imported": []}
    for _ in range(args.repeats):
        times["original"].append(seconds(original))
        times["imported"].append(seconds(imported))

    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    params = sum(p.numel() for p in imported.unet.parameters()) / 1e6
    print(
        f"config={args.config} ({params:.1f}M U-Net params) latents={args.latent_size}x{args.latent_size} "
        f"steps={args.steps} guidance=7.5 device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} torch={torch.__version__} cpu={platform.machine()} "
        f"max |image difference|={max_difference:.1e}"
    )
    print("| pipeline | fastest call (s) | median call (s) |")
    print("| --- | --- | --- |")
    print(f"| StableDiffusionPipeline | {best['original']:.2f} | {median['original']:.2f} |")
    print(f"| LatentDDPMPipeline.from_stable_diffusion | {best['imported']:.2f} | {median['imported']:.2f} |")
    print(
        f"| ratio imported / original | {best['imported'] / best['original']:.3f} | "
        f"{median['imported'] / median['original']:.3f} |"
    )


if __name__ == "__main__":
    main()
