"""`latentddpm serve`: a Gradio web app for any saved `LatentDDPMPipeline` (`pip install latentddpm[app]`).

A prompt box, the sampling settings (steps, guidance, seed, sampler, images per prompt, size), the LoRA adapters the
app was started with (switched on and off and weighted), and a gallery. Each image is shown with the
`latentddpm sample` command that draws it again: both go through `latentddpm.sampling.generate`, with the same CPU
generator, so the command's PNG equals the image in the gallery pixel for pixel. Bad input is answered with a message
in the page (`gr.Error`), never a traceback.
"""

import argparse
import random
import sys

import PIL.Image
import torch

from latentddpm.optional import import_optional
from latentddpm.sampling import SampleSettings, generate, load_pipeline, parse_lora
from latentddpm.schedulers import SAMPLER_NAMES

gr = import_optional("gradio", "app", "latentddpm serve")

# How the sampler menu shows `SAMPLER_NAMES`; the first entry is the scheduler the model was saved with.
SAMPLER_LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmsolver++": "DPM-Solver++", "euler": "Euler", "unipc": "UniPC"}
SAVED_SAMPLER = "saved"
MAX_IMAGES = 8  # images per prompt
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1  # seeds stay exact in the browser's numbers (below 2**53) and in every generator
MAX_LORA_WEIGHT = 2.0


class ServedPipeline:
    """A loaded pipeline and what the page may ask of it: [`generate`] checks the page's values and draws images.

    Args:
        model (`str`): a folder written by `save_pretrained`, or a Hub repo id.
        lora (`list[str]`): LoRA adapters to load, each `PATH[:NAME]` (see `latentddpm.sampling.parse_lora`).
        device (`str`, *optional*): where the pipeline runs; CUDA when available.
    """

    def __init__(self, model: str, lora: list[str] = (), device: str | None = None):
        self.model = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe, self.adapters = load_pipeline(model, self.device, lora)
        self.lora_specs = dict(zip(self.adapters, lora))  # name -> the PATH[:NAME] it was loaded from
        self.pipe.set_progress_bar_config(disable=True)  # the page shows the progress
        self.saved_scheduler = self.pipe.scheduler
        self.max_steps = self.saved_scheduler.config.num_train_timesteps
        # Sizes step by the VAE's factor times the U-Net's (each down block but the last halves the latents), so that
        # every level of the U-Net sees whole pixels of the level above; the default is the training size.
        self.size_step = self.pipe.vae_scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)
        sample_size = self.pipe.unet.config.sample_size
        if sample_size is None:
            raise ValueError(f"{model}: its U-Net records no `sample_size`, so the app has no image size to offer.")
        sample_height, sample_width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        self.default_size = (sample_height * self.pipe.vae_scale_factor, sample_width * self.pipe.vae_scale_factor)
        self.max_size = 2 * max(self.default_size)

    def settings(
        self,
        prompt: str,
        negative_prompt: str,
        steps: float,
        guidance: float,
        seed: float | None,
        random_seed: bool,
        sampler: str,
        num_images: float,
        height: float,
        width: float,
        adapter_weights: dict[str, float],
    ) -> SampleSettings:
        """The page's values as `latentddpm sample` settings, after checking each; a bad one raises `gr.Error`.

        Args:
            prompt (`str`), negative_prompt (`str`): the texts; the prompt must not be empty.
            steps (`float`), guidance (`float`), num_images (`float`), height (`float`), width (`float`): the
                sliders' values (whole numbers but guidance).
            seed (`float`, *optional*): the seed box; ignored with `random_seed`.
            random_seed (`bool`): draw a seed in `[0, MAX_SEED]` instead.
            sampler (`str`): `SAVED_SAMPLER` or one of `SAMPLER_NAMES`.
            adapter_weights (`dict[str, float]`): the weight of each active adapter; the others are off.

        Returns:
            `SampleSettings`, with the seed drawn when `random_seed`.
        """
        if not prompt or not prompt.strip():
            raise gr.Error("Enter a prompt: the model draws what it describes.")
        steps = self._whole("Steps", steps, 1, self.max_steps)
        num_images = self._whole("Images per prompt", num_images, 1, MAX_IMAGES)
        height = self._whole("Height", height, self.size_step, self.max_size, multiple_of=self.size_step)
        width = self._whole("Width", width, self.size_step, self.max_size, multiple_of=self.size_step)
        seed = random.randint(0, MAX_SEED) if random_seed else self._whole("Seed", seed, 0, MAX_SEED)
        if guidance is None or not 0 <= guidance <= MAX_GUIDANCE:
            raise gr.Error(f"Guidance must be between 0 and {MAX_GUIDANCE:g}, got {guidance}.")
        if sampler != SAVED_SAMPLER and sampler not in SAMPLER_NAMES:
            raise gr.Error(f"Unknown sampler {sampler!r}: choose one of {[SAVED_SAMPLER, *SAMPLER_NAMES]}.")
        for name, weight in adapter_weights.items():
            if name not in self.lora_specs:
                raise gr.Error(f"Unknown adapter {name!r}: this app has {self.adapters}.")
            if weight is None or not 0 <= weight <= MAX_LORA_WEIGHT:
                raise gr.Error(f"Adapter {name!r}: weight must be between 0 and {MAX_LORA_WEIGHT:g}, got {weight}.")
        return SampleSettings(
            model=self.model,
            prompt=[prompt],
            negative_prompt=negative_prompt or None,
            steps=steps,
            guidance=float(guidance),
            seed=seed,
            num_images=num_images,
            scheduler=None if sampler == SAVED_SAMPLER else sampler,
            height=height,
            width=width,
            device=self.device,
            lora=[self.lora_specs[name] for name in adapter_weights],
            lora_weight=[float(weight) for weight in adapter_weights.values()],
        )

    @staticmethod
    def _whole(label: str, value: float | None, low: int, high: int, multiple_of: int = 1) -> int:
        """`value` as an `int` in `[low, high]` and a multiple of `multiple_of`, or a `gr.Error` that says why not."""
        if value is None or value != int(value) or not low <= value <= high or value % multiple_of:
            multiple = f", a multiple of {multiple_of}" if multiple_of > 1 else ""
            raise gr.Error(f"{label} must be a whole number between {low} and {high}{multiple}, got {value}.")
        return int(value)

    def generate(
        self, settings: SampleSettings, progress: "gr.Progress | None" = None
    ) -> list[tuple[PIL.Image.Image, str]]:
        """Draw the images of `settings`, with the adapters of `settings.lora` active at their weights.

        Args:
            settings (`SampleSettings`): from [`settings`].
            progress (`gr.Progress`, *optional*): told the denoising step after each one.

        Returns:
            Each image with its caption: the `latentddpm sample` command that draws it (image `k` of a batch is
            column `k` of that command's grid).
        """
        names = [parse_lora(spec)[1] for spec in settings.lora]
        if names:
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, settings.lora_weight)
        elif self.adapters:
            self.pipe.disable_lora()  # bitwise the model without adapters: peft skips disabled layers

        def report(pipe, step: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
            progress((step + 1, pipe.num_timesteps), desc="Denoising")
            return callback_kwargs

        try:
            images = generate(self.pipe, settings, self.saved_scheduler, report if progress is not None else None)
        except ValueError as error:  # a setting that the pipeline refuses, e.g. too many steps for a solver
            raise gr.Error(str(error)) from error
        command = settings.command()
        if settings.num_images == 1:
            return [(images[0], command)]
        return [(image, f"{command}  # column {k + 1} of {len(images)}") for k, image in enumerate(images)]


def build_demo(model: str, lora: list[str] = (), device: str | None = None) -> "gr.Blocks":
    """The web app for `model`; `demo.launch()` serves it.

    Args:
        model (`str`): a folder written by `save_pretrained`, or a Hub repo id.
        lora (`list[str]`): LoRA adapters to load, each `PATH[:NAME]`; all start active at weight 1.
        device (`str`, *optional*): where the pipeline runs; CUDA when available.

    Returns:
        `gr.Blocks`.
    """
    served = ServedPipeline(model, lora, device)
    height, width = served.default_size
    sampler_choices = [(f"{type(served.saved_scheduler).__name__} (saved)", SAVED_SAMPLER)]
    sampler_choices += [(SAMPLER_LABELS.get(name, name), name) for name in SAMPLER_NAMES]

    with gr.Blocks(title=f"latentddpm: {model}") as demo:
        gr.Markdown(f"## latentddpm\n`{model}`")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder="a red circle in the top left", elem_id="prompt")
                negative_prompt = gr.Textbox(label="Negative prompt", elem_id="negative_prompt")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                sampler = gr.Dropdown(sampler_choices, value=SAVED_SAMPLER, label="Sampler")
                steps = gr.Slider(1, served.max_steps, value=50, step=1, label="Steps")
                guidance = gr.Slider(0, MAX_GUIDANCE, value=3.0, step=0.1, label="Guidance scale")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed")
                    random_seed = gr.Checkbox(False, label="Random seed")
                num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images per prompt", elem_id="num_images")
                with gr.Row():
                    step = served.size_step
                    width_slider = gr.Slider(step, served.max_size, value=width, step=step, label="Width")
                    height_slider = gr.Slider(step, served.max_size, value=height, step=step, label="Height")
                active = gr.CheckboxGroup(
                    served.adapters, value=served.adapters, label="LoRA adapters", visible=bool(served.adapters)
                )
                weights = [
                    gr.Slider(0, MAX_LORA_WEIGHT, value=1.0, step=0.05, label=f"{name} weight")
                    for name in served.adapters
                ]
            with gr.Column():
                gallery = gr.Gallery(label="Images", format="png", object_fit="contain", height=512, elem_id="gallery")
                command = gr.Code(
                    label="Reproduce with `latentddpm sample`", language="shell", wrap_lines=True, elem_id="command"
                )

        def on_generate(values: dict, progress=gr.Progress()):  # noqa: B008 (gradio injects the progress bar)
            adapter_weights = {name: values[slider] for name, slider in zip(served.adapters, weights)}
            settings = served.settings(
                values[prompt],
                values[negative_prompt],
                values[steps],
                values[guidance],
                values[seed],
                values[random_seed],
                values[sampler],
                values[num_images],
                values[height_slider],
                values[width_slider],
                {name: weight for name, weight in adapter_weights.items() if name in values[active]},
            )
            images = served.generate(settings, progress)
            return images, settings.command(), settings.seed

        inputs = {prompt, negative_prompt, steps, guidance, seed, random_seed, sampler, num_images}
        inputs |= {height_slider, width_slider, active, *weights}
        for trigger in (button.click, prompt.submit):
            trigger(on_generate, inputs, [gallery, command, seed], show_progress_on=gallery)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="latentddpm serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="folder written by `save_pretrained`, or a Hub repo id")
    parser.add_argument("--lora", action="append", default=[], help="a LoRA adapter, PATH[:NAME]; repeat for several")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    build_demo(args.model, args.lora, args.device).launch(server_name=args.host, server_port=args.port)
