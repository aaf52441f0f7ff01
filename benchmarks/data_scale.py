"""The latent cache at 1k, 10k and 100k images: the single-file cache this library had vs the sharded one.

Usage:
    python -m benchmarks.data_scale [--sizes 1000,10000,100000] [--steps 50] [--work outputs/bench/data_scale] \
        [--baseline_python PATH]

Synthetic data written here (once, in --work): PNG images of 32-96 px sides, mixed aspect ratios, a random polygon or
ellipse of a random colour on another colour, each with a unique caption, in parquet files of 10k rows; a run at N
images reads the first N (`max_train_samples`). The VAE is the demo's architecture (configs/shapes_vae.yaml),
initialised at random: the cost of encoding does not depend on its weights. Text: all-MiniLM-L6-v2 at 16 tokens, as
the demo. Training: the demo's U-Net (configs/unet/shapes.json) at 32x32 (8x8 latents), batch 64, `--steps` steps.

Per N, per cache:
- build img/s: `train_ldm.load_data` timed (what `latentddpm cache` and train_ldm run when the cache is missing), with
  1 and 2 processes for the sharded cache (2: gloo processes of a core each, `ACCELERATE_USE_CPU=true accelerate
  launch --multi_gpu --num_processes 2`); the single-file cache is built by the main process alone (the parquet files
  are converted to Arrow once, untimed, before any build);
- peak anonymous memory of the 1-process build (as below; the single-file build holds the whole cache in memory);
- bytes on disk per image;
- peak anonymous memory (Pss_Anon of /proc/PID/smaps_rollup, summed over the training process and its data loader
  workers: pages a forked worker shares with its parent count once; memory-mapped pages of the cache are file-backed
  and not counted) of a `train-ldm` run of `--steps` steps on the built cache;
- the share of the training steps spent waiting for data (the sharded cache's loop logs it).
Also the sharded cache without cached text embeddings (`cache_text_embeddings: false`: the frozen text encoder
encodes each batch's captions), whose step time against the cached one says, with the text shards' build time, when
each is faster.

`--baseline_python`: a Python whose `latentddpm` is the single-file cache's version (commit 9f38279), e.g.
    git worktree add /tmp/single-file 9f38279 && python -m venv --system-site-packages /tmp/single-file-env && \
        /tmp/single-file-env/bin/pip install --no-deps -e /tmp/single-file
(or set $SINGLE_FILE_CACHE_PYTHON). Without it the single-file rows are left out. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ROWS_PER_FILE = 10_000
TIMING = "data_scale build:"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated dataset sizes")
    parser.add_argument("--steps", type=int, default=50, help="training steps per memory measurement")
    parser.add_argument("--batch", type=int, default=64, help="train_batch_size")
    parser.add_argument("--work", default="outputs/bench/data_scale", help="data, caches and runs go here")
    parser.add_argument(
        "--baseline_python",
        default=os.environ.get("SINGLE_FILE_CACHE_PYTHON"),
        help="a Python with the single-file cache's latentddpm (default: $SINGLE_FILE_CACHE_PYTHON)",
    )
    parser.add_argument("--text_size", type=int, default=10_000, help="N of the per-batch text encoding rows")
    parser.add_argument("--build", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # time load_data (a worker)
    return parser.parse_args(argv)


def write_dataset(folder: Path, num_rows: int, seed: int = 0) -> str:
    """Parquet files of PNG images (32-96 px sides) with unique captions; returns their glob."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    pattern = str(folder / "train-*.parquet")
    rng = np.random.default_rng(seed)
    colors = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 40)}
    colors |= {"purple": (150, 40, 200), "orange": (255, 140, 0), "white": (245, 245, 245), "black": (0, 0, 0)}
    names = list(colors)
    for file_index in range(0, num_rows, ROWS_PER_FILE):
        path = folder / f"train-{file_index // ROWS_PER_FILE:05d}.parquet"
        if path.exists():
            continue
        images, captions = [], []
        for row in range(file_index, min(file_index + ROWS_PER_FILE, num_rows)):
            width, height = (int(v) for v in rng.integers(32, 97, size=2))
            fg, bg = rng.choice(len(names), size=2, replace=False)
            image = Image.new("RGB", (width, height), colors[names[bg]])
            draw = ImageDraw.Draw(image)
            points = rng.uniform(0, 1, size=(int(rng.integers(3, 8)), 2)) * (width, height)
            shape = "ellipse" if rng.random() < 0.3 else "polygon"
            if shape == "ellipse":
                draw.ellipse([*points.min(0), *points.max(0)], fill=colors[names[fg]])
            else:
                draw.polygon([tuple(p) for p in points], fill=colors[names[fg]])
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
            captions.append(f"a {names[fg]} {shape} on {names[bg]}, {width}x{height}, number {row}")
        tmp = path.with_suffix(".tmp")
        pq.write_table(pa.table({"image": images, "text": captions}), tmp)
        tmp.replace(path)
    return pattern


def make_vae(folder: Path) -> Path:
    """The demo's VAE architecture, initialised at random (seed 0)."""
    if not (folder / "config.json").exists():
        import torch

        from latentddpm.config import parse_config
        from latentddpm.training.train_vae import TrainVAEConfig, build_vae

        torch.manual_seed(0)
        config = parse_config(TrainVAEConfig, ["--config", str(ROOT / "configs" / "shapes_vae.yaml")])
        build_vae(config).save_pretrained(folder)
    return folder


def config_args(data: str, vae: Path, n: int, cache_dir: Path, output_dir: Path, steps: int, batch: int) -> list[str]:
    """train-ldm keys both versions know."""
    return [
        "--config", str(ROOT / "configs" / "shapes_ldm.yaml"),
        "--unet_config", str(ROOT / "configs" / "unet" / "shapes.json"),
        "--dataset", data, "--max_train_samples", str(n), "--vae", str(vae),
        "--cache_dir", str(cache_dir), "--output_dir", str(output_dir),
        "--max_train_steps", str(steps), "--train_batch_size", str(batch), "--lr_warmup_steps", "0",
        "--validation_steps", "0", "--validation_prompts", "[]", "--validation_shapes_score", "false",
        "--num_validation_samples", "0", "--checkpointing_steps", "0", "--adapt_torch_threads", "false",
    ]  # fmt: skip


def time_load_data(argv: list[str]) -> None:
    """(Worker, under this or the baseline's latentddpm, maybe under `accelerate launch`.) Time train_ldm's
    `load_data`, which builds the cache when it is missing, and print the seconds on the main process."""
    from latentddpm.config import parse_config
    from latentddpm.training import train_ldm

    config = parse_config(train_ldm.TrainLDMConfig, argv)
    accelerator = train_ldm.start_run(config)
    models = train_ldm.load_models(config)
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    data = train_ldm.load_data(config, accelerator, models)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(f"{TIMING} {json.dumps({'seconds': time.perf_counter() - start, 'rows': len(data.cache)})}", flush=True)


def run_build(python: str, processes: int, argv: list[str], cwd: Path) -> dict:
    """Build a cache with `processes` processes: its images/s and the build's peak anonymous memory."""
    # This file by path, from the work folder: `latentddpm` is then the one `python` has, not this checkout's.
    command, env = [python, __file__, "--build", *argv], _env()
    if processes > 1:  # gloo processes on the CPU, a core each (accelerate's --cpu alone would start one process)
        command = [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command += [__file__, "--build", *argv]
        env |= {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    output, peak_mib = run_measured(command, cwd, env)
    built = json.loads(next(line for line in output.splitlines() if line.startswith(TIMING)).removeprefix(TIMING))
    return {"rate": built["rows"] / built["seconds"], "rows": built["rows"], "peak_mib": peak_mib}


def _env() -> dict:
    return os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def pss_anon_kib(pid: int) -> int:
    """The process's proportional share of anonymous memory: a page it shares with a forked worker (copy-on-write)
    counts half in each, so the sum over processes counts it once; file-backed pages (the memory-mapped cache) are not
    anonymous."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:  # the process ended
        return 0
    match = re.search(r"Pss_Anon:\s+(\d+) kB", rollup)
    return int(match.group(1)) if match else 0


def run_measured(command: list[str], cwd: Path, env: dict) -> tuple[str, float]:
    """Run `command`: its output (stdout and stderr) and the peak anonymous memory, MiB, of it and its children
    (accelerate's processes, the loader's workers) together, polled every 50 ms."""
    import psutil

    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak, log = 0, []
    reader = threading.Thread(target=lambda: log.extend(process.stdout), daemon=True)
    reader.start()
    parent = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            pids = [process.pid] + [child.pid for child in parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        peak = max(peak, sum(pss_anon_kib(pid) for pid in pids))
        time.sleep(0.05)
    reader.join()
    text = "".join(log)
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{text[-3000:]}")
    return text, peak / 1024


def run_training(python: str, argv: list[str], cwd: Path) -> dict:
    """A train-ldm run on a built cache: its peak anonymous memory, and the step time and share of it spent waiting
    for data, which the sharded cache's loop logs."""
    text, peak_mib = run_measured([python, "-m", "latentddpm.cli", "train-ldm", *argv], cwd, _env())
    wait = re.search(r"Waited for data ([\d.]+)% of the training steps' time \((\d+) steps, ([\d.]+) s\)", text)
    result = {"peak_mib": peak_mib, "data_wait": None, "step_ms": None}
    if wait:
        result |= {"data_wait": float(wait.group(1)) / 100, "step_ms": float(wait.group(3)) / int(wait.group(2)) * 1e3}
    return result


def cache_bytes(cache_dir: Path) -> int:
    return sum(path.stat().st_size for path in cache_dir.rglob("*") if path.is_file())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.build is not None:
        return time_load_data(args.build)
    work = Path(args.work).resolve()
    sizes = [int(n) for n in args.sizes.split(",")]
    data = write_dataset(work / "data", max(sizes))
    # Arrow-convert the parquet files once, before any build is timed (`datasets` caches it for all of them).
    subprocess.run([sys.executable, "-c", f"import datasets, glob; datasets.load_dataset('parquet', data_files="
                    f"sorted(glob.glob({data!r})), split='train')"], check=True, env=_env())  # fmt: skip
    vae = make_vae(work / "vae")
    caches: list[tuple[str, str, list[int], list[str]]] = []  # name, python, build processes, extra keys
    if args.baseline_python:
        caches.append(("single file (before)", args.baseline_python, [1], []))
    caches.append(("sharded, memory-mapped", sys.executable, [1, 2], []))
    rows = []
    for n in sizes:
        variants = list(caches)
        if n == args.text_size:
            variants.append(("sharded, text per batch", sys.executable, [1], ["--cache_text_embeddings", "false"]))
        for name, python, processes, extra in variants:
            row = {"n": n, "cache": name}
            output_dir = work / f"run-{n}-{len(rows)}"
            for p in processes:  # the last build is the one trained on
                cache_dir = work / f"cache-{n}-{len(rows)}-{p}"
                shutil.rmtree(cache_dir, ignore_errors=True)
                keys = config_args(data, vae, n, cache_dir, output_dir, args.steps, args.batch) + extra
                built = run_build(python, p, keys, work)
                row[f"build_{p}"] = built["rate"]
                row[f"build_peak_mib_{p}"] = built["peak_mib"]
                row["bytes"] = cache_bytes(cache_dir) / built["rows"]
            row |= run_training(python, keys, work)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            (work / "rows.json").write_text(json.dumps(rows, indent=1))
    print(render(rows, args))


def render(rows: list[dict], args: argparse.Namespace) -> str:
    """One table: per size and cache, the build (rate, peak memory of the 1-process build, bytes) and the training
    (peak memory, waiting for data, step time); memory also against the same cache's smallest size."""
    lines = [
        "| images | cache | build img/s, 1 process | 2 processes | build peak anon MiB (1 process) | vs smallest | "
        "bytes/image on disk | training peak anon MiB | vs smallest | waiting for data | ms/step |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    smallest: dict[str, dict] = {}
    for row in rows:
        first = smallest.setdefault(row["cache"], row)
        two = f"{row['build_2']:.0f}" if "build_2" in row else "-"
        wait = f"{row['data_wait']:.1%}" if row["data_wait"] is not None else "(not logged)"
        step = f"{row['step_ms']:.0f}" if row["step_ms"] is not None else "(not logged)"
        build_peak, train_peak = row["build_peak_mib_1"], row["peak_mib"]
        lines.append(
            f"| {row['n']:,} | {row['cache']} | {row['build_1']:.0f} | {two} | {build_peak:.0f} | "
            f"{build_peak / first['build_peak_mib_1']:.2f}x | {row['bytes']:,.0f} | {train_peak:.0f} | "
            f"{train_peak / first['peak_mib']:.2f}x | {wait} | {step} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
