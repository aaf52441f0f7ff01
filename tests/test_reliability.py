"""Fault injection (issue 6): training survives kill -9, preemption, NaNs, a full disk and bad configs; loading
trusts no pickle. Tiny components, CPU, fp32, so a resumed run is compared bitwise with an uninterrupted one.

Faults in a separate process come from tests/fault_injection.py: it runs `train_ldm.main`, stops at a chosen point (a
step, or inside a checkpoint save), prints `FAULT POINT` and waits there for the signal the test sends.
"""

import ast
import copy
import filecmp
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import datasets
import fault_injection
import pytest
import torch
import yaml
from conftest import TINY_LDM_CONFIG
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from safetensors.torch import load_file

from latentddpm import losses
from latentddpm.cache import LatentCache, build_latent_cache, finish_latent_cache
from latentddpm.checkpointing import DamagedCheckpointError, list_checkpoints, read_training_state, resolve_checkpoint
from latentddpm.cli import run_main
from latentddpm.config import ConfigError, config_from_dict
from latentddpm.configs import config_path
from latentddpm.data.transforms import ImageTransform
from latentddpm.latents import decode_latents, encode_images, encode_posterior, unscale_latents
from latentddpm.runs import Preempted
from latentddpm.text import default_text_encoder_path, load_text_encoder
from latentddpm.training import train_ldm, train_vae

DIFFUSION_LOSS = losses.diffusion_loss  # the real one, for the wrappers that tests patch in

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2  # optimizer steps per run; a checkpoint every EVERY steps


class CodeInPickle:
    """Unpickling this runs `touch marker`: what a tampered checkpoint file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # shared: only the first run encodes the data


@pytest.fixture(scope="module")
def ldm_args(tiny_vae, cache_dir):
    def args(output_dir: Path, *extra: str) -> list[str]:
        return [
            "--config", str(TINY_LDM_CONFIG),
            "--unet_config", str(config_path("unet/tiny.json")),
            "--vae", str(tiny_vae),
            "--shapes_num_images", "64",
            "--num_validation_samples", "0",
            "--validation_prompts", "",
            "--train_batch_size", "8",
            "--max_train_steps", str(STEPS),
            "--lr_warmup_steps", "2",
            "--checkpointing_steps", str(EVERY),
            "--checkpoints_total_limit", "3",
            "--output_dir", str(output_dir),
            "--cache_dir", str(cache_dir),
            "--report_to", "none",
            # The same thread count in this process and in subprocesses: CPU kernels may sum in another order.
            "--torch_threads", str(torch.get_num_threads()),
            *extra,
        ]  # fmt: skip

    return args


@pytest.fixture(scope="module")
def reference(ldm_args, tmp_path_factory) -> Path:
    """The uninterrupted run every faulted run is compared with (checkpoints 2, 4 and 6 kept)."""
    return train_ldm.main(ldm_args(tmp_path_factory.mktemp("reference")))


def assert_same_unet(run: Path, expected_run: Path) -> None:
    """The saved pipelines' U-Nets (EMA weights, which depend on every step) are bitwise equal."""
    got, expected = (load_file(str(r / "unet" / "diffusion_pytorch_model.safetensors")) for r in (run, expected_run))
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def assert_same_checkpoint_weights(checkpoint: Path, expected: Path) -> None:
    for name in ("model.safetensors", "ema_shard_0.safetensors"):
        assert filecmp.cmp(checkpoint / name, expected / name, shallow=False), f"{checkpoint / name} changed"


def checkpoint_names(output_dir: Path) -> list[str]:
    return [p.name for p in list_checkpoints(output_dir / "checkpoints")]


def run_until_fault(tmp_path: Path, argv: list[str], fault: str, signum: int) -> tuple[int, str, str]:
    """Run tests/fault_injection.py in a new process and send `signum` at `fault`; (exit code, stdout, stderr)."""
    env = os.environ | {fault_injection.FAULT_ENV: fault, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, fault_injection.__file__, *argv],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
        watchdog = threading.Timer(300, process.kill)  # a run that never reaches the fault point fails, not hangs
        watchdog.start()
        stdout = ""
        for line in process.stdout:
            stdout += line
            if line.startswith("FAULT POINT"):
                process.send_signal(signum)
                break
        stdout += process.communicate()[0]
        watchdog.cancel()
    assert "FAULT POINT" in stdout, stderr_path.read_text()[-3000:]
    return process.returncode, stdout, stderr_path.read_text()


# --- kill -9 --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_at_a_random_step_resumes_from_the_last_complete_checkpoint(ldm_args, reference, tmp_path, caplog):
    step = fault_injection.pick_step(EVERY + 1, STEPS - 1)  # some step after the first checkpoint; printed
    out = tmp_path / "run"
    code, _, stderr = run_until_fault(tmp_path, ldm_args(out), f"step:{step}", signal.SIGKILL)
    assert code == -signal.SIGKILL, stderr[-3000:]
    last = step // EVERY * EVERY
    assert checkpoint_names(out) == [f"checkpoint-{s}" for s in range(EVERY, last + 1, EVERY)]

    with caplog.at_level("INFO"):
        resumed = train_ldm.main(ldm_args(out, "--resume_from_checkpoint", "latest"))
    assert f"Resumed from {out / 'checkpoints' / f'checkpoint-{last}'} at step {last}" in caplog.text
    assert_same_unet(resumed, reference)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["save_state", "rename", "prune"])
def test_kill_9_during_a_checkpoint_save_keeps_the_last_good_checkpoint(ldm_args, reference, tmp_path, where):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    # With a limit of 1, checkpoint-2 is the only good one while checkpoint-4 is being written.
    argv = ldm_args(out, "--checkpoints_total_limit", "1")
    code, _, stderr = run_until_fault(tmp_path, argv, f"{where}:4", signal.SIGKILL)
    assert code == -signal.SIGKILL, stderr[-3000:]

    checkpoints = out / "checkpoints"
    if where == "prune":  # the new one was complete and in place; the old one is gone or going
        assert checkpoint_names(out) == ["checkpoint-4"]
        assert (checkpoints / ".deleting-checkpoint-2").is_dir()
    else:  # the partial save is there, and never counts as a checkpoint
        assert checkpoint_names(out) == ["checkpoint-2"]
        assert (checkpoints / ".tmp-checkpoint-4").is_dir()
    survivor = list_checkpoints(checkpoints)[0]
    assert_same_checkpoint_weights(survivor, reference / "checkpoints" / survivor.name)
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert (out / "train_config.yaml").is_file()

    resumed = train_ldm.main([*argv, "--resume_from_checkpoint", "latest"])
    assert_same_unet(resumed, reference)
    assert checkpoint_names(out) == ["checkpoint-6"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-6"]  # leftovers cleaned up
    assert (out / "notes.txt").is_file()


# --- preemption -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_exits_0_and_resume_matches(ldm_args, reference, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = run_until_fault(tmp_path, ldm_args(out), "step:2", signal.SIGTERM)
    assert code == 0, stderr[-3000:]
    # The signal came during step 3 (1-based): that step finishes and is saved, off the every-2-steps schedule.
    checkpoint = out / "checkpoints" / "checkpoint-3"
    assert f"Received signal {int(signal.SIGTERM)} at step 3: saved {checkpoint}." in stdout
    assert "Resume with --resume_from_checkpoint latest" in stdout
    assert read_training_state(checkpoint)["global_step"] == 3
    assert not (out / "model_index.json").exists()  # stopped, not finished

    resumed = train_ldm.main(ldm_args(out, "--resume_from_checkpoint", "latest"))
    assert_same_unet(resumed, reference)


def test_sigint_checkpoints_the_current_step_exits_0_and_restores_handlers(
    ldm_args, reference, tmp_path, monkeypatch, capsys
):
    calls = []

    def interrupted_loss(*args, **kwargs):
        calls.append(None)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 4
        return DIFFUSION_LOSS(*args, **kwargs)

    monkeypatch.setattr(losses, "diffusion_loss", interrupted_loss)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_main(train_ldm.main, ldm_args(out))  # main raises Preempted; the command line exits 0 on it
    assert exit_info.value.code == 0
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works again after the run
    assert f"Received signal {int(signal.SIGINT)} at step 4" in capsys.readouterr().out
    assert read_training_state(out / "checkpoints" / "checkpoint-4")["global_step"] == 4

    monkeypatch.setattr(losses, "diffusion_loss", DIFFUSION_LOSS)
    resumed = train_ldm.main(ldm_args(out, "--resume_from_checkpoint", "latest"))
    assert_same_unet(resumed, reference)


# --- non-finite loss ------------------------------------------------------------------------------------------


def nan_loss_at(steps: set[int]):
    """`diffusion_loss` whose loss (and so every gradient) is NaN at the given 0-based steps."""
    calls = []

    def loss(*args, **kwargs):
        mse, vlb = DIFFUSION_LOSS(*args, **kwargs)
        step = len(calls)
        calls.append(step)
        return (mse * float("nan") if step in steps else mse), vlb

    return loss


def test_single_nan_steps_are_skipped_and_counted(ldm_args, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(losses, "diffusion_loss", nan_loss_at({2, 3}))
    out = tmp_path / "run"
    argv = ["--checkpointing_steps", "1", "--checkpoints_total_limit", "6", "--max_consecutive_nonfinite", "3"]
    with caplog.at_level("WARNING"):
        train_ldm.main(ldm_args(out, *argv))

    assert "Step 2: non-finite gradients, update skipped (1 so far)" in caplog.text
    checkpoints = out / "checkpoints"
    skipped = {s: read_training_state(checkpoints / f"checkpoint-{s}")["skipped_steps"] for s in range(1, 7)}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 2, 5: 2, 6: 2}
    assert json.loads((out / "manifest.json").read_text())["skipped_steps"] == 2
    # Skipped steps leave the U-Net and its EMA untouched; a real step changes them.
    assert_same_checkpoint_weights(checkpoints / "checkpoint-3", checkpoints / "checkpoint-2")
    assert_same_checkpoint_weights(checkpoints / "checkpoint-4", checkpoints / "checkpoint-2")
    first, second = (checkpoints / f"checkpoint-{s}" / "model.safetensors" for s in (1, 2))
    assert not filecmp.cmp(first, second, shallow=False)


def test_consecutive_nan_steps_stop_naming_the_step_and_last_good_checkpoint(
    ldm_args, reference, tmp_path, monkeypatch
):
    monkeypatch.setattr(losses, "diffusion_loss", nan_loss_at({4, 5}))
    out = tmp_path / "run"
    last_good = out / "checkpoints" / "checkpoint-4"
    message = (
        r"Stopping at step 5: 2 steps in a row had non-finite loss or gradients\. "
        rf"Last good checkpoint: {re.escape(str(last_good))}\."
    )
    with pytest.raises(RuntimeError, match=message):
        train_ldm.main(ldm_args(out, "--max_consecutive_nonfinite", "2"))
    assert_same_checkpoint_weights(last_good, reference / "checkpoints" / "checkpoint-4")
    assert not (out / "model_index.json").exists()


def overflowing_vae(tiny_vae: Path) -> AutoencoderKL:
    """A float16 VAE whose first convolutions overflow float16 (> 65504) while float32 stays finite."""
    vae = AutoencoderKL.from_pretrained(tiny_vae)
    with torch.no_grad():
        for conv in (vae.encoder.conv_in, vae.decoder.conv_in):
            conv.weight.mul_(3e4 / conv.weight.abs().max())  # representable in float16; 27 such products are not
    return vae.half().eval()


def test_fp16_vae_overflow_falls_back_to_fp32_with_a_warning(tiny_vae):
    vae = overflowing_vae(tiny_vae)
    vae_fp32 = copy.deepcopy(vae).float()  # the same (float16-rounded) weights: the oracle, in diffusers' own calls
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # The fault is real: float16 gives inf/NaN here.
        assert not torch.isfinite(vae.encode(pixels.half()).latent_dist.parameters).all()
        assert not torch.isfinite(vae.decode(latents.half()).sample).all()
        with pytest.warns(RuntimeWarning, match="float16 VAE .* `encode`: running it in float32"):
            mean, std = encode_posterior(vae, pixels)
        with pytest.warns(RuntimeWarning, match="float16 VAE .* `decode`: running it in float32"):
            images = decode_latents(vae, latents)
        with pytest.warns(RuntimeWarning):
            sampled = encode_images(vae, pixels, generator=torch.Generator().manual_seed(2))
        parameters = vae_fp32.encode(pixels).latent_dist.parameters.half()
        expected_images = vae_fp32.decode(unscale_latents(vae, latents.half()).float()).sample.half().clamp(-1, 1)
    assert mean.dtype == images.dtype == sampled.dtype == vae.dtype == torch.float16  # the VAE is float16 again
    assert torch.equal(mean, parameters.chunk(2, dim=1)[0])
    assert torch.equal(std, DiagonalGaussianDistribution(parameters).std)
    assert torch.equal(images, expected_images)
    assert torch.isfinite(sampled).all()


def test_latent_cache_of_an_overflowing_fp16_vae_falls_back_to_fp32(tiny_vae, tmp_path):
    vae = overflowing_vae(tiny_vae)
    tokenizer, text_encoder = load_text_encoder(default_text_encoder_path())
    images = [Image.new("RGB", (16, 16), color) for color in ("red", "blue")]
    dataset = datasets.Dataset.from_dict({"image": images, "text": ["a red image", "a blue image"]})
    transform = ImageTransform(16)
    with pytest.warns(RuntimeWarning, match="float16 VAE"):
        build_latent_cache(
            dataset,
            tmp_path,
            image_column="image",
            caption_column="text",
            transform=transform,
            vae=vae,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            random_flip=False,
            dtype=torch.float32,
            show_progress=False,
        )
    finish_latent_cache(tmp_path)
    cache = LatentCache(tmp_path)
    with torch.no_grad():
        pixels = torch.stack([transform(image) for image in images])
        parameters = copy.deepcopy(vae).float().encode(pixels).latent_dist.parameters.half()
    posterior = DiagonalGaussianDistribution(parameters)
    assert torch.equal(cache.gather("latent_mean", torch.arange(2))[:, 0], posterior.mean.float())
    assert torch.equal(cache.gather("latent_std", torch.arange(2))[:, 0], posterior.std.float())


# --- out of disk space ----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A folder on its own tmpfs, resized with `resize(bytes)`; needs root (skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def resize(size: int, option: str = "remount,") -> None:
        command = ["mount", "-t", "tmpfs", "-o", f"{option}size={size}", "tmpfs", str(mount)]
        subprocess.run(command, check=True, capture_output=True)

    try:
        resize(1 << 20, option="")
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    yield mount, resize
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize(
    "fails_in, error_type",
    [
        ("optimizer.bin", "RuntimeError"),  # torch.save: "unexpected pos ...", no errno
        pytest.param("model.safetensors", "SafetensorError", marks=pytest.mark.slow),  # "... (os error 28)"
    ],
)
def test_full_disk_during_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
    ldm_args, reference, small_disk, fails_in, error_type
):
    mount, resize = small_disk
    good = reference / "checkpoints" / "checkpoint-2"
    checkpoint_size = sum(f.stat().st_size for f in good.rglob("*") if f.is_file())
    # Room for checkpoint-2 and, of checkpoint-4, the files written before `fails_in` plus half of it.
    before = {"model.safetensors": 0, "optimizer.bin": (good / "model.safetensors").stat().st_size}[fails_in]
    resize(checkpoint_size + before + (good / fails_in).stat().st_size // 2 + (64 << 10))
    out = mount / "run"
    argv = ldm_args(out, "--checkpoints_total_limit", "1")

    previous = re.escape(str(out / "checkpoints" / "checkpoint-2"))
    message = rf"Out of disk space while saving checkpoint-4 .* The previous checkpoint is intact: {previous}\."
    with pytest.raises(RuntimeError, match=message) as error:
        train_ldm.main(argv)
    assert type(error.value.__cause__).__name__ == error_type
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]  # no partial folder left
    assert_same_checkpoint_weights(out / "checkpoints" / "checkpoint-2", good)

    resize(1 << 30)  # space freed: the same command resumes and finishes the run
    resumed = train_ldm.main([*argv, "--resume_from_checkpoint", "latest"])
    assert_same_unet(resumed, reference)


# --- config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, extra, message",
    [
        (train_ldm, ["--checkpoints_total_limit", "0"], "'checkpoints_total_limit' must be > 0, got 0"),
        (train_ldm, ["--log_every", "0"], "'log_every' must be > 0, got 0"),
        (train_ldm, ["--lr_scheduler", "cosine_annealing"], "'lr_scheduler' must be one of .*'cosine'"),
        (train_ldm, ["--train_batch_size", "8.5"], "'train_batch_size' must be an int, got '8.5'"),
        (train_ldm, ["--adam_beta2", "1"], r"'adam_beta2' must be in \[0, 1\), got 1.0"),
        (train_ldm, ["--resume_from_checkpoint", "no/where/checkpoint-5"], "is not a complete checkpoint"),
        # owner/name, no local folder: a Hub repo id, which offline cannot be read
        (train_ldm, ["--resume_from_checkpoint", "nowhere/checkpoint-5"], "is no local folder, and the Hub"),
        (train_ldm, ["--config", "typo.yaml"], "Unknown config key 'checkpoint_total_limit' in .*typo.yaml. "
                                               "Did you mean 'checkpoints_total_limit'"),
        (train_vae, ["--kl_wieght", "0"], "Unknown config key 'kl_wieght' .* Did you mean 'kl_weight'"),
        (train_vae, ["--learning_rate", "-1"], "'learning_rate' must be > 0, got -1.0"),
        (train_vae, ["--shapes_num_images", "0"], "'shapes_num_images' must be > 0, got 0"),
    ],
)  # fmt: skip
def test_bad_config_fails_before_any_data_is_read(ldm_args, tmp_path, monkeypatch, script, extra, message):
    def read_data(*args, **kwargs):
        raise AssertionError("the data was read before the config was checked")

    monkeypatch.setattr(script.DataConfig, "load_dataset", read_data)
    monkeypatch.chdir(tmp_path)
    Path("typo.yaml").write_text("checkpoint_total_limit: 2\n")
    out, cache = tmp_path / "out", tmp_path / "cache"
    if script is train_ldm:
        argv = ldm_args(out, "--cache_dir", str(cache), *extra)
    else:
        argv = ["--config", str(config_path("shapes_vae.yaml")), "--output_dir", str(out), *extra]
    with pytest.raises((ConfigError, FileNotFoundError), match=message):
        script.main(argv)
    assert not out.exists() and not cache.exists()


@pytest.mark.slow
def test_config_saved_in_a_checkpoint_reproduces_the_run(reference, tmp_path):
    saved = reference / "checkpoints" / "checkpoint-4" / "train_config.yaml"
    assert saved.read_text() == (reference / "train_config.yaml").read_text()  # the pipeline's copy is the same
    rerun = train_ldm.main(["--config", str(saved), "--output_dir", str(tmp_path / "rerun")])
    assert_same_unet(rerun, reference)


# --- damaged checkpoints -------------------------------------------------------------------------------------


def truncate(path: Path) -> None:  # what a full disk or a copy that did not finish leaves
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:  # the same size, other bytes: only the hash can tell
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {"truncate": truncate, "flip_a_byte": flip_a_byte, "delete": Path.unlink}


def copy_checkpoints(reference: Path, output_dir: Path, steps: tuple[int, ...]) -> Path:
    for step in steps:
        name = f"checkpoint-{step}"
        shutil.copytree(reference / "checkpoints" / name, output_dir / "checkpoints" / name)
    return output_dir / "checkpoints"


def test_latest_skips_damaged_checkpoints_and_resumes_from_the_newest_intact_one(
    ldm_args, reference, tmp_path, caplog
):
    out = tmp_path / "run"
    checkpoints = copy_checkpoints(reference, out, (2, 4, 6))
    newest, middle = checkpoints / "checkpoint-6", checkpoints / "checkpoint-4"
    size = (newest / "model.safetensors").stat().st_size
    truncate(newest / "model.safetensors")
    flip_a_byte(middle / "optimizer.bin")

    with caplog.at_level("INFO"):
        resumed = train_ldm.main(ldm_args(out, "--resume_from_checkpoint", "latest"))
    truncated = f"{newest / 'model.safetensors'} has {size // 2} bytes, the manifest recorded {size}"
    assert f"Skipping damaged checkpoint {newest}: {truncated}" in caplog.text
    assert f"Skipping damaged checkpoint {middle}: {middle / 'optimizer.bin'} has another sha256" in caplog.text
    assert f"Resumed from {checkpoints / 'checkpoint-2'} at step 2" in caplog.text
    assert_same_unet(resumed, reference)
    # The resumed run saved steps 4 and 6 again, intact, over the damaged copies.
    assert resolve_checkpoint(checkpoints, "latest") == newest
    assert_same_checkpoint_weights(newest, reference / "checkpoints" / "checkpoint-6")


@pytest.mark.parametrize(
    "damage, name, problem",
    [
        ("truncate", "model.safetensors", r"has \d+ bytes, the manifest recorded \d+"),
        ("flip_a_byte", "optimizer.bin", "has another sha256 than the manifest recorded"),
        ("flip_a_byte", "training_state.json", "has another sha256 than the manifest recorded"),
        ("delete", "ema_shard_0.safetensors", "is missing"),
        ("truncate", "manifest.json", r"cannot be read \(JSONDecodeError"),
    ],
    ids=["truncated-weights", "changed-optimizer", "changed-state", "deleted-ema", "truncated-manifest"],
)
def test_resuming_from_an_explicit_damaged_checkpoint_is_a_one_line_error_naming_the_file(
    ldm_args, reference, tmp_path, damage, name, problem
):
    out = tmp_path / "run"
    checkpoint = copy_checkpoints(reference, out, (4,)) / "checkpoint-4"
    DAMAGES[damage](checkpoint / name)

    bad_file = re.escape(str(checkpoint / name))
    message = rf"resume_from_checkpoint='{re.escape(str(checkpoint))}' is damaged: {bad_file} {problem}"
    with pytest.raises(DamagedCheckpointError, match=message) as error:
        train_ldm.main(ldm_args(out, "--resume_from_checkpoint", str(checkpoint)))
    assert isinstance(error.value, ConfigError) and "\n" not in str(error.value)  # the CLI prints one line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # stopped before anything was written


# --- loading --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tampered", ["optimizer.bin", "random_states_0.pkl"])
def test_checkpoint_with_code_in_a_pickle_is_refused_and_the_code_never_runs(ldm_args, reference, tmp_path, tampered):
    out = tmp_path / "run"
    checkpoint = shutil.copytree(reference / "checkpoints" / "checkpoint-4", out / "checkpoints" / "checkpoint-4")
    marker = tmp_path / "PWNED"
    torch.save({"state": CodeInPickle(marker)}, checkpoint / tampered)
    # The manifest's hashes find damage, not tampering: whoever can rewrite a pickle can rewrite them too.
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = (checkpoint / tampered).read_bytes()
    manifest["files"][tampered] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))

    message = rf"Refusing to load checkpoint .*{tampered} \(.*GLOBAL posix.system.*\).* nothing in them was run\."
    with pytest.raises(ValueError, match=message):
        train_ldm.main(ldm_args(out, "--resume_from_checkpoint", "latest"))
    assert not marker.exists()


LOAD_PIPELINE = """
import sys
import torch

def refuse(*args, **kwargs):
    raise AssertionError(f"torch.load{args}: loading a pipeline must not unpickle anything")

torch.load = torch.serialization.load = refuse
from latentddpm.pipelines import LatentDDPMPipeline

pipe = LatentDDPMPipeline.from_pretrained(sys.argv[1])
print(type(pipe.unet).__name__, type(pipe.scheduler).__name__, type(pipe.vae).__name__)
"""


def test_saved_pipeline_loads_offline_from_safetensors_without_trust_remote_code(reference):
    components = json.loads((reference / "model_index.json").read_text())
    # components are [library, class] pairs ([null, null]: an optional one left out, e.g. IP-Adapter's image encoder);
    # the other keys are settings (use_attention_mask)
    libraries = {v[0] for k, v in components.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
    assert libraries <= {"diffusers", "transformers", "latentddpm.models.unet_conditional",
                         "latentddpm.schedulers.scheduling_ddpm_noise"}  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_PIPELINE, str(reference)], capture_output=True, text=True, env=env, cwd="/"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ConditionalUNet", "DDPMNoiseScheduler", "AutoencoderKL"]


def test_no_torch_load_without_weights_only_and_no_pickle_load_in_the_code():
    unsafe = []
    for path in sorted(p for folder in ("latentddpm", "training", "pipelines", "benchmarks")
                       for p in (REPO / folder).rglob("*.py")):  # fmt: skip
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            name = ast.unparse(node.func)
            weights_only = any(
                k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
            if name in ("torch.load", "torch.serialization.load") and not weights_only:
                unsafe.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                unsafe.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert not unsafe


# --- reproducibility manifest ---------------------------------------------------------------------------------


def assert_manifest(folder: Path, config_cls) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    config = yaml.safe_load((folder / "train_config.yaml").read_text())
    assert manifest["config"] == config
    assert manifest["seed"] == config["seed"]
    # Oracle: the dataset the config names, loaded again.
    dataset = config_from_dict(config_cls, config).load_dataset(config["seed"])
    assert manifest["dataset_fingerprint"] == dataset._fingerprint
    for package in ("latentddpm", "torch", "diffusers", "transformers", "accelerate"):
        assert manifest["packages"][package] == importlib.metadata.version(package)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert manifest["git_commit"].removesuffix("-dirty") == head.stdout.strip()
    else:
        assert manifest["git_commit"] is None
    return manifest


def test_manifest_is_saved_with_every_ldm_checkpoint_and_the_pipeline(reference):
    for step in (2, 4, 6):
        assert_manifest(reference / "checkpoints" / f"checkpoint-{step}", train_ldm.TrainLDMConfig)
    final = assert_manifest(reference, train_ldm.TrainLDMConfig)
    assert final["skipped_steps"] == 0
    assert "grid" not in final["final_metrics"]  # JSON values only, no object reprs


@pytest.fixture(scope="module")
def vae_args():
    def args(output_dir: Path, *extra: str) -> list[str]:
        return [
            "--config", str(config_path("shapes_vae.yaml")),
            "--block_out_channels", "8,16", "--norm_num_groups", "4",
            "--resolution", "16", "--shapes_num_images", "48", "--num_validation_samples", "8",
            "--train_batch_size", "8", "--max_train_steps", "4", "--scale_samples", "16",
            "--checkpointing_steps", "2", "--output_dir", str(output_dir), "--report_to", "none", *extra,
        ]  # fmt: skip

    return args


@pytest.fixture(scope="module")
def vae_reference(vae_args, tmp_path_factory) -> Path:
    return train_vae.main(vae_args(tmp_path_factory.mktemp("vae_reference")))


def test_manifest_is_saved_with_every_vae_checkpoint_and_the_vae(vae_reference):
    for folder in (vae_reference / "checkpoints" / "checkpoint-2", vae_reference / "checkpoints" / "checkpoint-4"):
        assert_manifest(folder, train_vae.TrainVAEConfig)
    assert "psnr" in assert_manifest(vae_reference, train_vae.TrainVAEConfig)["final_metrics"]


def test_vae_sigterm_checkpoints_the_current_step_and_resume_matches(vae_args, vae_reference, tmp_path, monkeypatch):
    out = tmp_path / "vae"
    step_generator, calls = train_vae.step_generator, []

    def preempted_generator(*args, **kwargs):  # called once at the start of each step
        calls.append(None)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_generator(*args, **kwargs)

    monkeypatch.setattr(train_vae, "step_generator", preempted_generator)
    with pytest.raises(Preempted, match="stopped at step 1 by signal"):
        train_vae.main(vae_args(out))
    assert read_training_state(out / "checkpoints" / "checkpoint-1")["global_step"] == 1

    monkeypatch.setattr(train_vae, "step_generator", step_generator)
    resumed = train_vae.main(vae_args(out, "--resume_from_checkpoint", "latest"))
    got, expected = (load_file(str(r / "diffusion_pytorch_model.safetensors")) for r in (resumed, vae_reference))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
