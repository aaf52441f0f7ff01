"""Overhead of `LatentDDPMPipeline.__call__` over the model calls it cannot avoid.

Usage:
    python -m benchmarks.pipeline [--threads 1] [--repeats 5] [--cases 1x50x3.0 8x25x3.0 8x25x1.0]

overhead = time of a full `__call__` (prompt encoding, N steps, decoding, conversion to PIL)
           / (N x one U-Net forward at the U-Net batch + one VAE decode at the image batch),
where the U-Net batch is twice the number of images under classifier-free guidance (guidance > 1).

The setup is the demo's: the `small` U-Net config (configs/unet/small.json, 8x8 latents, cross-attention 384), an
AutoencoderKL of factor 4 (32x32 images, block_out_channels (32, 64, 64)), the real all-MiniLM-L6-v2 text encoder
with 16-token prompts and our DDPM scheduler. Weights are random: the cost does not depend on them.

Time: one process, everything warmed up, then full calls and the bare model calls alternate. The overhead is given
from the fastest run of each (the least disturbed by other jobs, the estimate to trust on a shared CPU) and from the
medians. On a CPU shared with other jobs pass `--threads 1` (with more threads than idle cores OpenMP barriers make
timings swing by up to 10x).
"""

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from latentddpm.latents import decode_latents
from latentddpm.models import ConditionalUNet
from latentddpm.pipelines import LatentDDPMPipeline
from latentddpm.schedulers import DDPMNoiseScheduler
from latentddpm.text import default_text_encoder_path, encode_prompt, load_text_encoder

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "unet"
PROMPT = "a red circle in the top left"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", help="name of a file in configs/unet/ (without .json)")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["1x50x3.0", "8x25x3.0", "8x25x1.0"],
        help="IMAGESxSTEPSxGUIDANCE for each measurement",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed full calls per case")
    parser.add_argument("--max-length", type=int, default=16, help="prompt tokens (tokenizer.model_max_length)")
    parser.add_argument("--text-encoder", default=None, help="text encoder folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_pipeline(args: argparse.Namespace) -> LatentDDPMPipeline:
    torch.manual_seed(args.seed)
    tokenizer, text_encoder = load_text_encoder(args.text_encoder or default_text_encoder_path(), torch.float32)
    tokenizer.model_max_length = args.max_length
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        mid_block_add_attention=False,
        sample_size=32,
    ).eval()
    unet = ConditionalUNet.from_config(ConditionalUNet.load_config(CONFIG_DIR / f"{args.config}.json")).eval()
    scheduler = DDPMNoiseScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    pipe = LatentDDPMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(pipe: LatentDDPMPipeline, images: int, steps: int, guidance: float, repeats: int) -> dict[str, float]:
    """Alternate full calls and the same model calls made alone (N U-Net forwards + one decode).

    The U-Net forwards and the VAE decode inside each full call are timed too, so that each call also gives its own
    overhead, free of the load changing between a call and the separate model calls.
    """
    unet_batch = 2 * images if guidance > 1 else images
    hidden_states, mask = encode_prompt([PROMPT] * unet_batch, pipe.tokenizer, pipe.text_encoder)
    latents = torch.randn(unet_batch, pipe.unet.config.in_channels, 8, 8)
    timestep = torch.tensor(500)
    model_seconds: list[float] = []  # U-Net forwards and decodes since the last reset

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            output = fn(*args, **kwargs)
            model_seconds.append(time.perf_counter() - start)
            return output

        return wrapper

    def full_call() -> None:
        pipe([PROMPT] * images, num_inference_steps=steps, guidance_scale=guidance, output_type="pil")

    def model_calls() -> None:
        for _ in range(steps):
            pipe.unet(latents, timestep, hidden_states, encoder_attention_mask=mask, return_dict=False)
        decode_latents(pipe.vae, latents[:images])

    def seconds(fn) -> float:
        model_seconds.clear()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    # instance attributes shadow the methods for the duration of the measurement
    pipe.unet.forward, pipe.vae.decode = timed(pipe.unet.forward), timed(pipe.vae.decode)
    try:
        with torch.no_grad():
            full_call(), model_calls()  # warm-up
            full, inside, bare = [], [], []
            for _ in range(repeats):
                full.append(seconds(full_call))
                inside.append(sum(model_seconds))
                bare.append(seconds(model_calls))
    finally:
        del pipe.unet.forward, pipe.vae.decode
    return {
        "full": statistics.median(full),
        "inside": statistics.median(inside),
        "bare": statistics.median(bare),
        "overhead_in_call": statistics.median(f / i for f, i in zip(full, inside)),
        "overhead_separate": min(full) / min(bare),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe = build_pipeline(args)
    print(
        f"config={args.config} device=cpu threads={torch.get_num_threads()} prompt tokens={args.max_length}"
        f" torch={torch.__version__} cpu={platform.processor() or platform.machine()}"
    )
    print(
        "| images | steps | guidance | U-Net batch | full call (s) | its U-Net + decode (s) | separate N x U-Net +"
        " decode (s) | overhead, in-call | overhead, separate (min/min) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in args.cases:
        images, steps, guidance = case.split("x")
        images, steps, guidance = int(images), int(steps), float(guidance)
        t = measure(pipe, images, steps, guidance, args.repeats)
        unet_batch = 2 * images if guidance > 1 else images
        print(
            f"| {images} | {steps} | {guidance} | {unet_batch} | {t['full']:.3f} | {t['inside']:.3f} |"
            f" {t['bare']:.3f} | {t['overhead_in_call']:.3f} | {t['overhead_separate']:.3f} |"
        )


if __name__ == "__main__":
    main()
