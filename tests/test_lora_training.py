"""LoRA fine-tuning with train_ldm (`lora_rank`) on a tiny Stable Diffusion base: only the adapters train and are
saved (diffusers' LoRA format), a run resumes bitwise, diffusers' own `StableDiffusionPipeline` loads the adapter and
gives our images, and the adapter goes to the Hub alone with a LoRA model card."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from safetensors import safe_open
from safetensors.torch import load_file
from test_pipeline_loaders import our_pipeline
from tiny_sd import make_clip_tokenizer, make_stable_diffusion
from transformers import BertConfig, BertModel

from latentddpm import LatentDDPMPipeline
from latentddpm.config import ConfigError
from latentddpm.hub import FINAL_IGNORE_PATTERNS
from latentddpm.lora import text_encoder_lora_targets
from latentddpm.pipelines.model_card import write_lora_model_card
from latentddpm.schedulers import DDPMNoiseScheduler
from latentddpm.training import train_ldm

peft = pytest.importorskip("peft")
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny random SD 1.x pipeline on disk: the base the adapters train on."""
    folder = tmp_path_factory.mktemp("sd1")
    make_stable_diffusion(1, make_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))).save_pretrained(folder)
    return folder


def train_lora(sd_folder, out, *extra):
    return train_ldm.main(
        [
            "--pretrained_pipeline", str(sd_folder), "--lora_rank", "4",
            "--dataset", "shapes", "--resolution", "16", "--shapes_num_images", "24", "--num_validation_samples", "4",
            "--train_batch_size", "4", "--max_train_steps", "4", "--learning_rate", "1e-2", "--lr_warmup_steps", "0",
            "--ema_decay", "0.5", "--validation_steps", "0", "--validation_prompts", "a red circle",
            "--validation_inference_steps", "2",
            "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"), "--report_to", "none", *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(sd_folder, tmp_path_factory):
    return train_lora(sd_folder, tmp_path_factory.mktemp("lora") / "run", "--checkpointing_steps", "2")


def test_lora_run_saves_the_adapters_alone_in_diffusers_format(lora_run):
    weights = load_file(str(lora_run / LORA_FILE))
    assert weights and all(k.startswith("unet.") and ".lora." in k for k in weights)
    # rank 4 on every attention projection of the base's transformer blocks (to_q, to_k, to_v, to_out.0)
    assert {w.shape[0] for k, w in weights.items() if "lora.down" in k} == {4}
    assert {k.rsplit(".", 4)[-4] for k in weights} == {"to_q", "to_k", "to_v", "0"}
    assert not (lora_run / "unet").exists() and (lora_run / "validation" / "step-4.png").is_file()
    with safe_open(str(lora_run / LORA_FILE), framework="pt") as file:  # the peft config, for load_lora_weights
        assert json.loads(file.metadata()["lora_adapter_metadata"])["unet.r"] == 4
    # the checkpoints hold the adapters too, not the frozen U-Net
    checkpoint = lora_run / "checkpoints" / "checkpoint-2"
    assert (checkpoint / LORA_FILE).is_file() and not list(checkpoint.glob("model*.safetensors"))


def test_lora_run_resumes_bitwise(lora_run, sd_folder, tmp_path):
    # EMA of the adapters on (the default): its state resumes too, or the saved (EMA) adapters would differ
    resumed = train_lora(
        sd_folder, tmp_path / "run", "--resume_from_checkpoint", str(lora_run / "checkpoints/checkpoint-2")
    )
    expected, got = load_file(str(lora_run / LORA_FILE)), load_file(str(resumed / LORA_FILE))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def ours_and_stable_diffusion(sd_folder) -> tuple[LatentDDPMPipeline, StableDiffusionPipeline]:
    """Our pipeline imported from the SD base, and diffusers' own pipeline of that base."""
    theirs = StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    return LatentDDPMPipeline.from_stable_diffusion(str(sd_folder)), theirs


def sample(pipe) -> torch.Tensor:
    return pipe(
        ["a red circle in the center", "a blue square"],
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def test_lora_loads_into_stable_diffusion_with_our_images(lora_run, sd_folder):
    ours, theirs = ours_and_stable_diffusion(sd_folder)
    base = sample(ours)
    for pipe in (ours, theirs):
        pipe.load_lora_weights(str(lora_run))
    adapted = sample(ours)
    assert (adapted - base).abs().max() > 1e-3  # the adapter trained away from B = 0
    torch.testing.assert_close(sample(theirs), adapted, rtol=0, atol=1e-4)


def test_text_encoder_lora_resumes_bitwise_and_loads_into_stable_diffusion(sd_folder, tmp_path):
    extra = ("--text_encoder_lora_rank", "2", "--max_train_steps", "2", "--use_ema", "false")
    straight = train_lora(sd_folder, tmp_path / "a", *extra, "--checkpointing_steps", "1")
    checkpoint = str(straight / "checkpoints/checkpoint-1")
    resumed = train_lora(sd_folder, tmp_path / "b", *extra, "--resume_from_checkpoint", checkpoint)
    expected, got = load_file(str(straight / LORA_FILE)), load_file(str(resumed / LORA_FILE))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    # rank-2 adapters on CLIP's attention projections, trained away from B = 0
    text_encoder = {k: w for k, w in expected.items() if k.startswith("text_encoder.")}
    assert {w.shape[0] for k, w in text_encoder.items() if "down" in k} == {2}
    assert all(w.abs().max() > 0 for k, w in text_encoder.items() if "up" in k)

    ours, theirs = ours_and_stable_diffusion(sd_folder)
    prompt = ["a red circle"]
    base_embeds = ours.encode_prompt(prompt, "cpu", 1, False)[0]
    for pipe in (ours, theirs):
        pipe.load_lora_weights(str(straight))
    assert not torch.allclose(ours.encode_prompt(prompt, "cpu", 1, False)[0], base_embeds)
    torch.testing.assert_close(sample(theirs), sample(ours), rtol=0, atol=1e-4)


def test_text_encoder_lora_on_a_text_encoder_diffusers_format_cannot_name_is_refused():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37))
    with pytest.raises(ValueError, match="supports \\['clip_text_model'\\] text encoders .* not 'bert'"):
        text_encoder_lora_targets(bert)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text_encoder_lora_rank", "4"], "'text_encoder_lora_rank' needs 'lora_rank'"),
        (["--lora_rank", "4", "--train_text_encoder", "true"], "use 'text_encoder_lora_rank' for adapters on it"),
        (["--lora_rank", "4", "--lora_target_modules", "[]"], "must name at least one U-Net module"),
    ],
)
def test_inconsistent_lora_keys_are_refused(extra, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train_ldm.main(["--vae", "unused", "--output_dir", str(tmp_path), *extra])


def test_lora_run_hands_on_the_adapter_alone_with_a_valid_card(lora_run):
    # what `push_to_hub` commits at the end: the output folder without FINAL_IGNORE_PATTERNS (see tests/test_hub.py)
    files = [p.relative_to(lora_run).as_posix() for p in lora_run.rglob("*") if p.is_file()]
    pushed = set(filter_repo_objects(files, ignore_patterns=FINAL_IGNORE_PATTERNS))  # upload_folder's own filter
    assert {LORA_FILE, "README.md", "sample_grid.png"} <= pushed
    assert not any(name.endswith(".safetensors") and name != LORA_FILE for name in pushed)  # no base model weights
    # the card's YAML parses back into the Hub's model-card metadata (what the Hub validates), in its LoRA conventions
    card = ModelCard.load(lora_run / "README.md")
    assert "lora" in card.data.tags and card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "text-to-image" and card.data.base_model is None  # a local base: text only
    assert "## Training" in card.text and "| Steps | 4 |" in card.text and "![samples](sample_grid.png)" in card.text


def test_lora_card_of_a_hub_base_names_it_and_the_trigger_words(tmp_path):
    write_lora_model_card(
        tmp_path, repo_id="user/shapes-lora", base_model="user/shapes", trigger_words=["a sks star", "sks"]
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "user/shapes" and card.data.instance_prompt == "a sks star"
    assert 'pipe.load_lora_weights("user/shapes-lora")' in card.text and "- `sks`" in card.text


def test_lora_card_names_a_local_base_in_the_text_only(tmp_path):
    # the Hub's metadata wants a repo id for base_model: a local folder would fail its validation
    write_lora_model_card(tmp_path, base_model=str(tmp_path))
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None and f"`{tmp_path}`" in card.text


def test_lora_on_our_own_pipeline_base_reloads_to_the_runs_validation_images(tmp_path):
    # A LatentDDPMPipeline base (BERT text encoder, masked prompts): loaded onto a fresh copy of the base, the saved
    # adapter samples the final validation grid again, pixel for pixel (it was drawn with the trained adapters in
    # place), and the base alone does not.
    base = tmp_path / "base"
    pipe = our_pipeline()
    pipe.save_pretrained(base)
    out = train_lora(base, tmp_path / "run")
    pipe = LatentDDPMPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    # validation samples with train_ldm's noise process, the base's schedule in a DDPMNoiseScheduler
    pipe.scheduler = DDPMNoiseScheduler.from_config(pipe.scheduler.config)

    def sample() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        image = pipe(["a red circle"], num_inference_steps=2, guidance_scale=3.0, generator=generator).images[0]
        return np.asarray(image, dtype=np.int16)

    base_image = sample()
    pipe.load_lora_weights(str(out))
    grid = np.asarray(PIL.Image.open(out / "validation" / "step-4.png"), dtype=np.int16)
    np.testing.assert_array_equal(sample(), grid)
    assert np.abs(base_image - grid).max() > 2
