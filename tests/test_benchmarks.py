"""The benchmark tooling: the BENCHMARKS.md generator and the time-to-quality report, on tiny runs (no timing)."""

import argparse
import json

import pytest
import torch
from conftest import TINY_LDM_CONFIG
from PIL import Image

from benchmarks import gpu, lora, report, time_to_quality
from latentddpm.configs import config_path
from latentddpm.training import train_ldm


def test_benchmarks_page_is_the_rendering_of_its_templates_and_latest_results():
    for name in report.SECTIONS:
        assert report.MARKER in (report.ROOT / "sections" / f"{name}.md").read_text(), name
        assert (report.ROOT / "results" / f"{name}.md").is_file(), f"{name}: run python -m benchmarks.report"
    # Edit a template or a result, then run `python -m benchmarks.report --render-only`.
    assert (report.ROOT.parent / "BENCHMARKS.md").read_text() == report.render()


@pytest.mark.slow
def test_time_to_quality_reads_the_run_logs_and_reports_minutes_to_the_target(tiny_vae, tmp_path):
    run = train_ldm.main(
        [
            "--config", str(TINY_LDM_CONFIG),
            "--unet_config", str(config_path("unet/tiny.json")),
            "--vae", str(tiny_vae),
            "--output_dir", str(tmp_path / "ours"),
            "--cache_dir", str(tmp_path / "cache"),
            "--validation_shapes_score", "true",
            "--validation_steps", "3",
            "--report_to", "tensorboard",
        ]
    )  # fmt: skip
    curve = time_to_quality.quality_curve(run, "shapes")
    assert [row["step"] for row in curve] == [3, 6]
    assert all(0 < row["minutes"] for row in curve) and curve[0]["minutes"] <= curve[1]["minutes"]
    assert all(0 <= row[key] <= 1 for row in curve for key in ("color", "shape", "position"))

    # Two recipes with made-up scores: the report finds the first measurement at each target, and the ratios.
    ours = [dict(row, color=1.0, shape=1.0, position=1.0, all=1.0) for row in curve]
    plain = [dict(row, color=1.0, shape=1.0, position=0.5, all=0.5) if row["step"] == 3 else row for row in ours]
    args = argparse.Namespace(task="shapes", cifar_target=0.5)
    text = time_to_quality.report(args, {"ours": ours, "plain": plain}, {"vae_minutes": 1.0})
    first, second = (f"{row['minutes']:.1f} ({row['step']})" for row in curve)
    assert f"| ours | {first} | {first} |" in text
    assert f"| plain | {second} | {second} |" in text
    speedup = curve[1]["minutes"] / curve[0]["minutes"]
    assert text.count(f"**{speedup:.2f}x**") == 2
    never = [dict(row, position=0.1, all=0.1) for row in curve]
    assert f"| never | not within {curve[1]['minutes']:.1f} |" in time_to_quality.report(args, {"never": never}, {})


@pytest.mark.parametrize("recipe", sorted(time_to_quality.RECIPES))
def test_time_to_quality_recipes_are_valid_train_ldm_overrides(recipe):
    from latentddpm.config import parse_config

    config = parse_config(
        train_ldm.TrainLDMConfig, ["--config", str(config_path("shapes_ldm.yaml")), *time_to_quality.RECIPES[recipe]]
    )
    if recipe == "plain":
        assert (config.noise_scheduler["prediction_type"], config.snr_gamma, config.use_ema) == (
            "epsilon",
            None,
            False,
        )


def test_dreambooth_star_instance_folder_holds_captioned_orange_stars_at_three_positions(tmp_path):
    from benchmarks import dreambooth_star
    from latentddpm.eval.stars import score_stars

    folder = dreambooth_star.write_instance_folder(tmp_path / "instance")
    captions = [path.read_text() for path in sorted(folder.glob("*.txt"))]
    images = [Image.open(path) for path in sorted(folder.glob("*.png"))]
    assert len(images) == len(captions) == 5 and all(image.size == (32, 32) for image in images)
    positions = [caption.removeprefix("a sks star in the ") for caption in captions]
    assert set(positions) == {"top left", "center", "bottom right"}
    assert score_stars(images, positions)["star_acc"] == 1.0


def test_vae_stars_reports_each_vae_and_size_and_draws_the_grid(tiny_vae, tmp_path):
    from benchmarks import vae_stars

    text = vae_stars.main(["--vae", f"a={tiny_vae}", "--vae", f"b={tiny_vae}", "--grid", str(tmp_path / "grid.png")])
    rows, shapes = (table.splitlines()[2:] for table in text.split("\n\n"))
    assert [row.split(" | ")[:2] for row in rows] == [
        [f"| {name}", f"{size} px"] for name in ("drawn", "a", "b") for size in vae_stars.DIAMETERS
    ]
    assert rows[0].endswith("| 5 of 5 |")  # the drawn stars pass the judge
    assert rows[2].removeprefix("| a") == rows[4].removeprefix("| b")  # the same VAE twice, the same numbers
    assert [row.split(" | ")[0] for row in shapes] == ["| a", "| b"]
    assert Image.open(tmp_path / "grid.png").size == (15 * 100, 3 * 100)  # 10 held-out stars + 5 instance images


def test_lora_benchmark_trains_rank_r_adapters_on_every_attention_projection():
    pytest.importorskip("peft")
    args = lora.parse_args(["--steps", "1", "--warmup", "0"])
    numbers = lora.measure("tiny", "lora", args)
    unet = lora.build_unet("tiny", args)
    # Closed form: a rank-r LoRA of a Linear(in, out) has r * (in + out) weights.
    projections = ("to_q", "to_k", "to_v", "to_out.0")
    linears = [m for name, m in unet.named_modules() if name.endswith(projections)]
    assert linears and all(isinstance(m, torch.nn.Linear) for m in linears)
    expected = sum(args.rank * (m.in_features + m.out_features) for m in linears)
    assert numbers["trainable"] == expected
    assert numbers["total"] == sum(p.numel() for p in unet.parameters()) + expected
    # the file holds those weights in float32, a header and the adapter's config
    assert 4 * expected < numbers["file_bytes"] < 4 * expected + 64 * 1024


@pytest.mark.slow
def test_gpu_benchmark_dry_run_measures_every_row_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    gpu.main(["--device", "cpu", "--dry-run", "--budget", "100000", "--out", str(out)])
    figures = json.loads(out.read_text())
    rows = figures["training"] + figures["sampling"] + figures["ablation"]
    assert [row["name"] for row in rows if row["error"]] == []
    assert all(row["seconds"] > 0 for row in rows)
    assert [row["name"] for row in figures["training"]] == ["ours 4x4", "diffusers 4x4", "ours 8x8", "diffusers 8x8"]
    assert len(figures["sampling"]) == 8 and len(figures["ablation"]) == 6
    assert all(flops > 0 for flops in figures["forward_flops_per_image"].values())
