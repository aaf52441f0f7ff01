"""The EMA of sharded weights (`latentddpm.ema`) under torch's own FSDP2 (`fully_shard`) on 2 CPU processes (gloo).

`accelerate launch --use_fsdp` does not start on a machine without GPUs, so this runs the pieces train_ldm uses
under FSDP (the sharded EMA, its checkpoint shards, the gathered export) directly on a sharded tiny U-Net. The oracle
is diffusers' `EMAModel` of the gathered (full) weights, stepped alongside: the average is elementwise, so each
process's shards must equal its slice of the oracle bit for bit.
"""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from test_training import ldm_args

from latentddpm.config import ConfigError
from latentddpm.configs import config_path
from latentddpm.ema import ShardedEMAModel, local_tensor
from latentddpm.models import ConditionalUNet
from latentddpm.training import train_ldm
from latentddpm.validation import ema_weights

NUM_PROCESSES = 2
NUM_STEPS = 4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_unet() -> ConditionalUNet:
    torch.manual_seed(0)
    return ConditionalUNet.from_config(ConditionalUNet.load_config(str(config_path("unet/tiny.json"))))


def sharded_tiny_unet() -> ConditionalUNet:
    from torch.distributed.fsdp import fully_shard

    unet = tiny_unet()
    # Not the up blocks themselves: FSDP2's forward hooks hand a wrapped module a copy of its list arguments, so the
    # skips an UpBlock pops would stay in the U-Net's list. Their resnets and transformers are the units instead.
    up_block_parts = [part for block in unet.up_blocks for part in [*block.resnets, *(block.attentions or [])]]
    for block in [*unet.down_blocks, unet.mid_block, *up_block_parts]:
        fully_shard(block)
    fully_shard(unet)
    return unet


def train_step(unet: ConditionalUNet, optimizer: torch.optim.Optimizer, step: int, rank: int) -> None:
    """One AdamW step on this process's own random batch."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 5, 32, generator=generator)
    timestep = torch.randint(0, 1000, (2,), generator=generator)
    loss = unet(sample, timestep, hidden).sample.square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def full_weights(unet: ConditionalUNet) -> dict[str, torch.nn.Parameter]:
    """Every parameter gathered whole, on every process (collective); trainable, as EMAModel averages only those."""
    return {name: torch.nn.Parameter(p.full_tensor().detach().clone()) for name, p in unet.named_parameters()}


def gathered_state_dict(unet: ConditionalUNet) -> dict[str, torch.Tensor]:
    """The whole state dict on process 0 ({} elsewhere), as accelerate's FSDP2 `get_state_dict` gathers it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def run_rank(rank: int, port: int, folder: str, update_every: int) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=NUM_PROCESSES)
    torch.set_num_threads(1)
    try:
        check_sharded_ema(rank, folder, update_every)
    finally:
        dist.destroy_process_group()


def check_sharded_ema(rank: int, folder: str, update_every: int) -> None:
    unet = sharded_tiny_unet()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    ema_kwargs = {"decay": 0.9, "use_ema_warmup": True, "power": 0.75}
    ema = ShardedEMAModel(unet.parameters(), update_every=update_every, **ema_kwargs)
    names = [name for name, _ in unet.named_parameters()]
    assert sum(s.numel() for s in ema.shadow_params) < sum(p.numel() for p in unet.parameters())  # a shard only
    oracle = EMAModel(list(full_weights(unet).values()), **ema_kwargs)
    later_shards = []

    for step in range(1, NUM_STEPS + 1):
        train_step(unet, optimizer, step, rank)
        ema.step(unet.parameters())
        full = list(full_weights(unet).values())
        if update_every == 1:
            oracle.step(full)
        elif step % update_every == 0:  # N steps of decay d are one step of d^N, at the warmup of step N
            decay = oracle.get_decay(step) ** update_every
            for shadow, weight in zip(oracle.shadow_params, full):
                shadow.sub_((1 - decay) * (shadow - weight))
        if step == NUM_STEPS // 2:
            ema.save_shard(folder, rank, NUM_PROCESSES)
        elif step > NUM_STEPS // 2:  # this process's shards of the weights, as trainable parameters
            later_shards.append([torch.nn.Parameter(local_tensor(p).detach().clone()) for p in unet.parameters()])

    # 1. The gathered EMA equals the oracle's, bit for bit, and the trained weights are back after the swap.
    trained = full_weights(unet)
    with ema_weights(unet, ema):
        gathered = gathered_state_dict(unet)
    assert all(torch.equal(trained[n], w) for n, w in full_weights(unet).items())
    if rank == 0:
        expected = dict(zip(names, oracle.shadow_params))
        assert all(torch.equal(gathered[n], expected[n]) for n in names), "the gathered EMA differs from the oracle"

        # 2. The exported U-Net (fresh, unsharded, saved and reloaded as train_ldm's pipeline saves it) holds them.
        exported = ConditionalUNet.from_config(unet.config)
        exported.load_state_dict(gathered)
        exported.save_pretrained(os.path.join(folder, "unet"))
        reloaded = ConditionalUNet.from_pretrained(os.path.join(folder, "unet"))
        assert all(torch.equal(p, expected[n]) for n, p in reloaded.named_parameters())

    # 3. Resume: the EMA restored from the step-2 shards, stepped over the shards of steps 3 and 4, is the same EMA.
    resumed = ShardedEMAModel(unet.parameters(), update_every=update_every, **ema_kwargs)
    resumed.load_shard(folder, rank, NUM_PROCESSES)
    for weights in later_shards:
        resumed.step(weights)
    assert resumed.state_dict().keys() == ema.state_dict().keys()
    assert (resumed.steps_seen, resumed.optimization_step) == (ema.steps_seen, ema.optimization_step)
    assert all(torch.equal(a, b) for a, b in zip(resumed.shadow_params, ema.shadow_params))

    # 4. Shards cut for another number of processes are refused, naming the problem.
    with pytest.raises(ConfigError, match="saved by 2 processes, this run has 3"):
        resumed.load_shard(folder, rank, 3)


@pytest.mark.parametrize("update_every", [1, 2])
def test_sharded_ema_matches_the_gathered_oracle_resumes_exactly_and_exports_the_gathered_weights(
    tmp_path, update_every
):
    mp.spawn(run_rank, args=(_free_port(), str(tmp_path), update_every), nprocs=NUM_PROCESSES, join=True)


def test_saved_pipeline_holds_the_ema_of_the_last_checkpoint_not_the_trained_weights(tiny_vae, tmp_path):
    out = train_ldm.main(ldm_args(tiny_vae, tmp_path, "--checkpointing_steps", "6", "--ema_decay", "0.5"))
    saved = ConditionalUNet.from_pretrained(str(out / "unet"))
    shards = load_file(str(Path(out) / "checkpoints" / "checkpoint-6" / "ema_shard_0.safetensors"))
    trained = load_file(str(Path(out) / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    names = [name for name, _ in saved.named_parameters()]
    assert all(torch.equal(p, shards[str(i)]) for i, (_, p) in enumerate(saved.named_parameters()))
    assert not all(torch.equal(shards[str(i)], trained[name]) for i, name in enumerate(names))
