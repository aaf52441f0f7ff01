import os

# Every test runs offline: nothing may be fetched from the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL

# The training tests' shared settings (tiny, seconds per run), independent of the demo's recipe.
TINY_LDM_CONFIG = Path(__file__).with_name("tiny_ldm.yaml")


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> Path:
    """A randomly initialised factor-4 AutoencoderKL (16x16 images -> 4x4x4 latents), saved once per session."""
    path = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        mid_block_add_attention=False,
    ).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each test starts and ends with no accelerate state: every training script builds its own `Accelerator`, and
    accelerate keeps the first one's process and device settings in process-wide singletons."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
