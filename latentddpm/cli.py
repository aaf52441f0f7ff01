"""The `latentddpm` command line: `latentddpm COMMAND [--key value ...]`.

One convention for every command: `--key value` with underscores in the key, as in diffusers' training scripts
(`--output_dir`, `--num_samples`); a dash in a key (`--num-samples`) is accepted as an alias. `latentddpm COMMAND
--help` lists a command's keys. Each command is a function of its own argument list; the config-driven ones also read
`--config FILE.yaml`.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from latentddpm.config import ConfigError
from latentddpm.pipelines.space import DEFAULT_REQUIREMENT, write_space
from latentddpm.runs import Preempted
from latentddpm.sampling import SampleSettings, generate, load_pipeline
from latentddpm.schedulers import SAMPLER_NAMES


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a command's `main(argv)` the way the command line reports its outcome.

    A `ConfigError` (a bad key or value, found before any work) prints `error: <message>` on stderr and exits with
    status 2, like argparse's usage errors, without a traceback: the message names the problem. `Preempted` (a
    training loop saved a checkpoint on SIGTERM/SIGINT and stopped) exits with status 0, so a scheduler requeues
    the job as done and `--resume_from_checkpoint latest` continues it. Any other exception is a bug or a broken
    environment and keeps its traceback.
    """
    try:
        main(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except Preempted as preempted:
        print(f"preempted: {preempted}", file=sys.stderr)
        raise SystemExit(0) from None


def _underscore_keys(argv: list[str]) -> list[str]:
    """`--negative-prompt x` -> `--negative_prompt x`: a dash in a key is an alias for an underscore."""
    keys = []
    for arg in argv:
        if arg.startswith("--"):
            key, equals, value = arg[2:].partition("=")
            arg = f"--{key.replace('-', '_')}{equals}{value}"
        keys.append(arg)
    return keys


def sample(argv: list[str] | None) -> None:
    """Generate images with a saved pipeline and write them as one grid, a row per prompt."""
    parser = argparse.ArgumentParser(prog="latentddpm sample", description=sample.__doc__)
    parser.add_argument("--model", required=True, help="folder written by `save_pretrained`, or a Hub repo id")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    parser.add_argument("--negative_prompt", default=None, help="what guidance steers away from (default: '')")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale; <= 1 disables")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator that draws all the noise")
    parser.add_argument("--num_images", type=int, default=1, help="images per prompt (the grid's columns)")
    parser.add_argument("--scheduler", choices=SAMPLER_NAMES, default=None, help="default: the saved scheduler")
    parser.add_argument("--height", type=int, default=None, help="default: the U-Net's training size")
    parser.add_argument("--width", type=int, default=None, help="default: the U-Net's training size")
    parser.add_argument("--lora", action="append", default=[], help="a LoRA adapter, PATH[:NAME]; repeat for several")
    parser.add_argument("--lora_weight", type=float, action="append", default=[], help="one per --lora (default: 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="where to write the PNG grid")
    args = vars(parser.parse_args(_underscore_keys(sys.argv[1:] if argv is None else argv)))
    out = args.pop("out")
    settings = SampleSettings(**args)
    pipe, _ = load_pipeline(settings.model, settings.device, settings.lora, settings.lora_weight)
    images = generate(pipe, settings, pipe.scheduler)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=len(settings.prompt), cols=settings.num_images).save(out)
    print(f"wrote {len(images)} images to {out}")


def train_vae(argv: list[str] | None) -> None:
    """Stage 1: train the autoencoder (`--config shapes_vae.yaml`)."""
    from latentddpm.training import train_vae

    train_vae.main(argv)


def train_ldm(argv: list[str] | None) -> None:
    """Stage 2: train the text-conditioned U-Net on the VAE's latents (`--config shapes_ldm.yaml`)."""
    from latentddpm.training import train_ldm

    train_ldm.main(argv)


def cache(argv: list[str] | None) -> None:
    """Build train-ldm's latent cache (`--config`), on every process of `accelerate launch -m latentddpm.cli`."""
    from latentddpm.training import train_ldm

    train_ldm.cache_main(argv)


def demo(argv: list[str] | None) -> None:
    """The offline demo: both stages on the shapes dataset, then sampling and scoring."""
    from latentddpm.training import demo

    demo.main(argv)


def evaluate(argv: list[str] | None) -> None:
    """Sweep schedulers x steps x guidance scales: metrics, plots, sample grids and an HTML report."""
    from latentddpm.eval import sweep

    sweep.main(argv)


def train_classifier(argv: list[str] | None) -> None:
    """Train the reference classifier whose features stand in for Inception-v3 in FID/KID."""
    from latentddpm.eval import train_classifier

    train_classifier.main(argv)


def convert(argv: list[str] | None) -> None:
    """Convert a pipeline between latentddpm, Stable Diffusion (diffusers folder) and single-file (LDM) formats."""
    from latentddpm import interop

    interop.main(_underscore_keys(argv or []))


def serve(argv: list[str] | None) -> None:
    """A web app (Gradio) for a saved pipeline: prompt, settings, gallery, the command that redraws each image."""
    from latentddpm import app

    app.main(_underscore_keys(argv or []))


def make_space(argv: list[str] | None) -> None:
    """Write a Hugging Face Space (Gradio) folder that serves a pushed pipeline with `latentddpm serve`'s app."""
    parser = argparse.ArgumentParser(prog="latentddpm make-space", description=make_space.__doc__)
    parser.add_argument("--model", required=True, help="the Hub repo id of the model (a local folder: to try it here)")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (app.py, requirements, README)")
    parser.add_argument("--requirement", default=DEFAULT_REQUIREMENT, help="the requirements.txt line of latentddpm")
    parser.add_argument("--title", default=None, help="the Space's title (default: the model's name)")
    args = parser.parse_args(_underscore_keys(argv or []))
    write_space(args.out, args.model, requirement=args.requirement, title=args.title)
    print(f"wrote {args.out}; to upload it: hf upload USER/SPACE {args.out} --repo-type space")


# command name -> function of the command's arguments; the first line of its docstring is its `--help` line
COMMANDS: dict[str, Callable[[list[str] | None], object]] = {
    "sample": sample,
    "train-vae": train_vae,
    "train-ldm": train_ldm,
    "cache": cache,
    "demo": demo,
    "evaluate": evaluate,
    "train-classifier": train_classifier,
    "convert": convert,
    "serve": serve,
    "make-space": make_space,
}


def main(argv: list[str] | None = None) -> None:
    commands = "\n".join(f"  {name:<18}{command.__doc__.splitlines()[0]}" for name, command in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="latentddpm",
        description=__doc__,
        epilog=f"commands:\n{commands}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments (`COMMAND --help`)")
    args = parser.parse_args(argv)
    run_main(COMMANDS[args.command], args.args)


if __name__ == "__main__":
    main()
