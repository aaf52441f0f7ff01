"""The demo U-Net's training step on a CPU that another process keeps busy, per thread policy; and torch.compile.

Usage:
    python -m benchmarks.contention [--steps 10] [--warmup 2] [--batch 128] [--policies torch,passive,one,probe]
    python -m benchmarks.contention --compile [--steps 10]

One training step of the demo's U-Net (configs/unet/shapes.json, batch 128 of 8x8 latents, 16 text tokens, MSE,
backward, AdamW: `benchmarks.unet.make_step`), timed idle and with one core kept busy by `yes > /dev/null`, under:
    - torch: torch's default threads (one per core);
    - passive: the same with OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep at barriers instead of spinning);
    - one: 1 thread;
    - probe: `latentddpm.threads.choose_torch_threads`, what train_ldm and train_vae do with `adapt_torch_threads`
      (the busy cores measured at start-up; the choice is printed).
Each policy runs in a fresh process (OpenMP reads its environment once, at start), idle and busy alternating; the
table gives median milliseconds per step and busy / idle. Goal (issue 15): busy <= 2x idle, idle no worse than torch's.

`--compile` times the same step eager and under `torch.compile` (the U-Net compiled; default inductor): compile time
(the first step) and median step time, and how many steps it takes the compiled loop to break even.

Run it on an otherwise idle machine: other jobs are contention too, and make every number here noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = ("torch", "passive", "one", "probe")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per measurement")
    parser.add_argument("--batch", type=int, default=128, help="the demo's train_batch_size")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated, from {POLICIES}")
    parser.add_argument("--compile", action="store_true", help="time torch.compile instead of the thread policies")
    parser.add_argument("--worker", choices=POLICIES, help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args(argv)
    unknown = set(args.policies.split(",")) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; choose from {POLICIES}")
    return args


def demo_step(batch: int, compiled: bool = False):
    """One training step of the demo's U-Net (a closure), as `benchmarks.unet` builds it."""
    import torch

    from benchmarks.unet import build_models, make_batch, make_step

    args = argparse.Namespace(config="shapes", batch=batch, seq_len=16, device="cpu", dtype="fp32", seed=0)
    unet = build_models(args, which=("ours",))["ours"]
    batch_inputs = make_batch(unet.config, args)
    return make_step(torch.compile(unet) if compiled else unet, batch_inputs, "training")


def step_seconds(step, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def worker(args: argparse.Namespace) -> None:
    """Measure one policy in this process; print {"threads", "why", "ms"} as JSON."""
    import torch

    why = "torch's default"
    if args.worker == "one":
        torch.set_num_threads(1)
        why = "1 thread"
    elif args.worker == "probe":
        from latentddpm.threads import choose_torch_threads

        threads, why = choose_torch_threads()
        torch.set_num_threads(threads)
    step = demo_step(args.batch)
    times = step_seconds(step, args.steps, args.warmup)
    print(json.dumps({"threads": torch.get_num_threads(), "why": why, "ms": 1000 * statistics.median(times)}))


def measure(policy: str, busy: bool, args: argparse.Namespace) -> dict:
    env = os.environ | ({"OMP_WAIT_POLICY": "PASSIVE"} if policy == "passive" else {})
    command = [sys.executable, "-m", "benchmarks.contention", "--worker", policy]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if busy else None
    try:
        if hog is not None:
            time.sleep(1.0)  # the scheduler has placed it on a core before the probe looks
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(output.strip().splitlines()[-1])


def policies_table(args: argparse.Namespace) -> str:
    lines = [
        "| policy | threads idle / busy | idle ms / step | busy ms / step | busy / idle |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    notes = []
    for policy in args.policies.split(","):
        idle, busy = measure(policy, False, args), measure(policy, True, args)
        ratio = busy["ms"] / idle["ms"]
        lines.append(
            f"| {policy} | {idle['threads']} / {busy['threads']} | {idle['ms']:.0f} | {busy['ms']:.0f} | "
            f"{ratio:.2f}x |"
        )
        if policy == "probe":
            notes += [f"probe, idle: {idle['why']}", f"probe, busy: {busy['why']}"]
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


def compile_table(args: argparse.Namespace) -> str:
    import torch

    rows = []
    for compiled in (False, True):
        torch.manual_seed(0)
        start = time.perf_counter()
        step = demo_step(args.batch, compiled)
        step()  # eager: the first step; compiled: the compilation too
        first = time.perf_counter() - start
        median = statistics.median(step_seconds(step, args.steps, args.warmup))
        rows.append((compiled, first, median))
    (_, eager_first, eager), (_, compiled_first, compiled_step) = rows
    saved = eager - compiled_step
    extra = compiled_first - eager_first
    break_even = f"{extra / saved:.0f} steps" if saved > 0 else "never (not faster per step)"
    return "\n".join(
        [
            "| U-Net | first step s (with compilation) | ms / step | break-even |",
            "| --- | ---: | ---: | --- |",
            f"| eager | {eager_first:.1f} | {1000 * eager:.0f} | |",
            f"| torch.compile | {compiled_first:.1f} | {1000 * compiled_step:.0f} | {break_even} |",
            "",
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
    elif args.compile:
        print(compile_table(args))
    else:
        print(policies_table(args))


if __name__ == "__main__":
    main()
