"""Speed and peak memory of `ConditionalUNet` against diffusers' `UNet2DConditionModel` of the same architecture.

Usage:
    python -m benchmarks.unet [--config small] [--batch 32] [--iters 20] [--device cpu] [--dtype fp32]
    python -m benchmarks.unet --device cuda --dtype bf16

The baseline is the `UNet2DConditionModel` of `to_unet2d_condition_config(ours.config)`: same widths, depths,
attention placement, heads and cross-attention width, and the same state-dict keys, so both models get the very
same weights (the script checks that their outputs agree).

Time: one process, both models warmed up, then ours and diffusers' alternate step by step (which goes first also
alternates) and the medians are reported. A training step is forward + MSE loss + backward + AdamW step; an
inference step is one forward under `torch.inference_mode()`.

Timings on a CPU shared with other jobs: pass `--threads 1`; with more threads than idle cores, OpenMP barriers
make step times swing by up to 10x.

Peak memory: each (model, mode) runs in a fresh subprocess that builds that model, its inputs and optimizer and
runs `--warmup` steps (so AdamW's state exists). Then:
- peak allocated: the most tensor memory torch had allocated during one more step, above what was allocated when it
  began (activations, gradients, temporaries; a step frees its gradients at its end). On CUDA
  `torch.cuda.max_memory_allocated()`; on CPU, whose allocator keeps no statistics, the running sum of the
  allocations and frees that `torch.profiler` records.
- peak RSS growth (CPU only): how far the process's peak resident set size rises above its resident set size over
  `--memory-steps` more steps (Linux /proc/self/status: VmHWM after resetting it, minus VmRSS). This is the real
  footprint, including what glibc's malloc keeps around, which depends on the order of allocations as well.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.utils import logging

from latentddpm.models import ConditionalUNet, to_unet2d_condition_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "unet"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = ("ours", "diffusers")
MODES = ("train", "inference")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", help="name of a file in configs/unet/ (without .json)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=16, help="text tokens per sample")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per model and mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model and mode")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps in each memory subprocess")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    # Internal: run one memory measurement and print it as JSON.
    parser.add_argument("--measure-memory", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_models(args: argparse.Namespace, which: tuple[str, ...] = MODELS) -> dict[str, torch.nn.Module]:
    """Ours from the config file, diffusers' twin from its config; both get the same seeded weights."""
    config = ConditionalUNet.load_config(CONFIG_DIR / f"{args.config}.json")
    torch.manual_seed(args.seed)
    ours = ConditionalUNet.from_config(config)
    models = {}
    if "ours" in which:
        models["ours"] = ours
    if "diffusers" in which:
        theirs = UNet2DConditionModel(**to_unet2d_condition_config(ours.config))
        theirs.load_state_dict(ours.state_dict())
        models["diffusers"] = theirs
    return {name: model.to(args.device, DTYPES[args.dtype]) for name, model in models.items()}


def make_batch(config, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """A fixed batch for `config` (either model's: the fields read here have the same names in both)."""
    generator = torch.Generator().manual_seed(args.seed)
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    dtype = DTYPES[args.dtype]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(args.device, dtype)

    mask = torch.ones(args.batch, args.seq_len, dtype=torch.long)
    mask[:, args.seq_len // 2 :] = torch.randint(
        0, 2, (args.batch, args.seq_len - args.seq_len // 2), generator=generator
    )
    return {
        "sample": randn(args.batch, config.in_channels, height, width),
        "timestep": torch.randint(0, 1000, (args.batch,), generator=generator).to(args.device),
        "encoder_hidden_states": randn(args.batch, args.seq_len, config.cross_attention_dim),
        "encoder_attention_mask": mask.to(args.device),
        "target": randn(args.batch, config.out_channels, height, width),
    }


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str):
    """A closure running one training step (with its own AdamW) or one inference forward of `model`."""
    inputs = {key: value for key, value in batch.items() if key != "target"}
    if mode == "inference":
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                model(**inputs, return_dict=False)

        return step

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        prediction = model(**inputs, return_dict=False)[0]
        F.mse_loss(prediction.float(), batch["target"].float()).backward()
        optimizer.step()
        # Freed here rather than at the start of the next step, so that a step begins with no gradients.
        optimizer.zero_grad(set_to_none=True)

    return step


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(args: argparse.Namespace, models: dict[str, torch.nn.Module], batch) -> dict[str, dict[str, float]]:
    """Median seconds per step, {mode: {model: seconds}}, with the models interleaved step by step."""
    results = {}
    for mode in MODES:
        steps = {name: make_step(model, batch, mode) for name, model in models.items()}
        for step in steps.values():
            for _ in range(args.warmup):
                step()
        synchronize(args.device)
        times = {name: [] for name in steps}
        for i in range(args.iters):
            order = MODELS if i % 2 == 0 else MODELS[::-1]
            for name in order:
                start = time.perf_counter()
                steps[name]()
                synchronize(args.device)
                times[name].append(time.perf_counter() - start)
        results[mode] = {name: statistics.median(values) for name, values in times.items()}
    return results


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_allocated(step, device: str) -> int:
    """Peak bytes of tensor memory allocated by torch during one `step()`, above what was allocated before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # The CPU allocator keeps no statistics; the profiler records every allocation and free, in order.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_memory(args: argparse.Namespace) -> None:
    """Runs in a fresh subprocess: prints the peak memory of one model and mode as JSON."""
    name, mode = args.measure_memory
    model = build_models(args, which=(name,))[name]
    step = make_step(model, make_batch(model.config, args), mode)
    for _ in range(args.warmup):
        step()
    result = {"peak_allocated": peak_allocated(step, args.device)}
    if not args.device.startswith("cuda"):
        # Reset the peak RSS ("VmHWM") to the current RSS (Linux >= 4.0), so that it covers the steps only.
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        for _ in range(args.memory_steps):
            step()
        result["peak_rss_growth"] = (_status_kib("VmHWM") - before) * 1024
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.set_verbosity_error()  # not the "modules that should be kept in float32: []" notice of `.to(dtype)`
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        measure_memory(args)
        return

    models = build_models(args)
    batch = make_batch(models["ours"].config, args)
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert abs(params["ours"] / params["diffusers"] - 1) <= 0.05, f"parameter counts differ by more than 5%: {params}"
    inputs = {key: value for key, value in batch.items() if key != "target"}
    with torch.inference_mode():
        outputs = [model.eval()(**inputs, return_dict=False)[0] for model in models.values()]
    max_diff = (outputs[0] - outputs[1]).abs().max().item()

    times = time_steps(args, models, batch)
    del models, outputs
    memory = {}  # {(measure, mode): {model: bytes}}
    for mode in MODES:
        for name in MODELS:
            command = [sys.executable, "-m", "benchmarks.unet", *(argv if argv is not None else sys.argv[1:])]
            result = subprocess.run(
                [*command, "--measure-memory", name, mode], check=True, capture_output=True, text=True
            )
            for measure, value in json.loads(result.stdout.strip().splitlines()[-1]).items():
                memory.setdefault((measure, mode), {})[name] = value

    if args.device.startswith("cuda"):
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(
        f"config={args.config} batch={args.batch} seq_len={args.seq_len} device={args.device} ({device}) "
        f"dtype={args.dtype} iters={args.iters} torch={torch.__version__}"
    )
    print(
        f"parameters: ours {params['ours']:,}  diffusers {params['diffusers']:,}  "
        f"(same weights; max |output difference| {max_diff:.2e})"
    )
    print(f"{'':<36} {'ours':>10} {'diffusers':>10} {'ours/diffusers':>15}")
    for mode in MODES:
        ours, theirs = times[mode]["ours"], times[mode]["diffusers"]
        print(f"{mode + ' step, ms':<36} {ours * 1e3:>10.1f} {theirs * 1e3:>10.1f} {ours / theirs:>15.3f}")
    for (measure, mode), values in memory.items():
        ours, theirs = values["ours"], values["diffusers"]
        label = f"{mode} {measure.replace('_', ' ')}, MiB"
        print(f"{label:<36} {ours / 2**20:>10.1f} {theirs / 2**20:>10.1f} {ours / theirs:>15.3f}")


if __name__ == "__main__":
    main()
