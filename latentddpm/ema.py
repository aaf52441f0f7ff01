"""An EMA of the weights being trained that is correct when they are sharded across processes (FSDP, DeepSpeed
ZeRO-3), can live on the CPU, and can be updated every N optimizer steps.

Each process averages the part of every parameter it holds (the whole parameter under DDP or a single process, its
shard under FSDP and ZeRO-3), so the EMA is sharded exactly as the weights are, costs 1 / num_processes of a full
copy per process, and needs no communication. The average is elementwise, so the shards are, bit for bit, the shards
of the EMA that one process would keep of the gathered weights. To read the whole average (export, validation),
swap it into the model (`store` / `copy_to` / `restore`, as with diffusers' `EMAModel`) and gather the model's state
dict the usual way (`accelerator.get_state_dict`). Checkpoints hold one shard file per process
(`ema_shard_{process_index}.safetensors`), written and read through accelerate's save/load hooks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from .config import ConfigError

SHARD_FILE = "ema_shard_{}.safetensors"


def local_tensor(parameter: torch.Tensor) -> torch.Tensor:
    """The part of `parameter` this process holds, sharing its storage: the local shard of an FSDP2 `DTensor`, the
    partition of a DeepSpeed ZeRO-3 parameter, else the parameter itself (DDP, FSDP1's flat-parameter shards)."""
    if isinstance(parameter, DTensor):
        return parameter.to_local()
    return getattr(parameter, "ds_tensor", parameter)


class ShardedEMAModel(EMAModel):
    """diffusers' `EMAModel` of the parameters (or their shards) this process holds, updated every `update_every`
    optimizer steps.

    Args:
        parameters: the parameters of the model as prepared by accelerate (sharded or not).
        update_every: average every N-th call of `step` (N optimizer steps), with the decay of N steps, so that the
            average spans as many optimizer steps as one updated every step.
        **ema_kwargs: `EMAModel`'s (decay, use_ema_warmup, power, model_cls, model_config, ...).
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], update_every: int = 1, **ema_kwargs):
        super().__init__([local_tensor(p) for p in parameters], **ema_kwargs)
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}.")
        self.update_every = update_every
        self.steps_seen = 0  # optimizer steps since the start, updated or not

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Count one optimizer step; on every `update_every`-th, move the average towards `parameters` (wherever the
        average lives: the CPU or the accelerator)."""
        self.steps_seen += 1
        if self.steps_seen % self.update_every:
            return
        self.optimization_step += 1
        # The warmup follows optimizer steps; N steps of decay d each are one step of d^N.
        decay = self.get_decay(self.steps_seen) ** self.update_every
        self.cur_decay_value = decay
        one_minus_decay = 1 - decay
        for shadow, parameter in zip(self.shadow_params, parameters, strict=True):
            local = local_tensor(parameter).detach().to(shadow.device)
            if parameter.requires_grad:  # the arithmetic of EMAModel.step, so one process matches it bit for bit
                shadow.sub_(one_minus_decay * (shadow - local))
            else:
                shadow.copy_(local)

    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        super().copy_to([local_tensor(p) for p in parameters])

    def store(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        super().store([local_tensor(p) for p in parameters])

    def restore(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        super().restore([local_tensor(p) for p in parameters])

    def state_dict(self) -> dict:
        return super().state_dict() | {"update_every": self.update_every, "steps_seen": self.steps_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.update_every = state_dict.get("update_every", self.update_every)
        self.steps_seen = state_dict.get("steps_seen", self.optimization_step * self.update_every)

    def save_shard(self, folder: str | Path, process_index: int, num_processes: int) -> Path:
        """Write this process's average and counters to `folder/ema_shard_{process_index}.safetensors`."""
        counters = {k: v for k, v in self.state_dict().items() if k != "shadow_params"}
        path = Path(folder) / SHARD_FILE.format(process_index)
        tensors = {str(i): shadow.detach().cpu().contiguous() for i, shadow in enumerate(self.shadow_params)}
        # One metadata key: safetensors writes several in no fixed order; a checkpoint's bytes must be reproducible.
        metadata = {"ema": json.dumps({"counters": counters, "num_processes": num_processes}, sort_keys=True)}
        save_file(tensors, str(path), metadata=metadata)
        return path

    def load_shard(self, folder: str | Path, process_index: int, num_processes: int) -> None:
        """Restore what `save_shard` wrote for this process, onto the device the average is on now.

        Raises:
            ConfigError: the checkpoint was saved by another number of processes (its shards are cut differently),
                or holds no EMA of this model.
        """
        path = Path(folder) / SHARD_FILE.format(process_index)
        if not path.is_file():
            raise ConfigError(f"{path} is missing: the checkpoint holds no EMA shard for process {process_index}.")
        with safe_open(str(path), framework="pt") as f:
            metadata = json.loads(f.metadata()["ema"])
        if metadata["num_processes"] != num_processes:
            raise ConfigError(
                f"{path} was saved by {metadata['num_processes']} processes, this run has {num_processes}: resume a "
                "sharded EMA with the same number of processes."
            )
        tensors = load_file(str(path))
        shadows = [tensors[str(i)] for i in range(len(tensors))]
        if [s.shape for s in shadows] != [s.shape for s in self.shadow_params]:
            raise ConfigError(f"{path} holds the EMA of another model (its tensors have other shapes).")
        self.load_state_dict(metadata["counters"])
        self.shadow_params = [s.to(mine.device, mine.dtype) for s, mine in zip(shadows, self.shadow_params)]

    def register_for_checkpointing(self, accelerator: Accelerator) -> None:
        """Save and load this process's shard with every `accelerator.save_state` / `load_state` (on every process:
        accelerate calls its hooks on each)."""

        def save_hook(models, weights, folder: str) -> None:
            self.save_shard(folder, accelerator.process_index, accelerator.num_processes)

        def load_hook(models, folder: str) -> None:
            self.load_shard(folder, accelerator.process_index, accelerator.num_processes)

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)
