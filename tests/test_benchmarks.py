"""The benchmark tooling: the BENCHMARKS.md generator and the time-to-quality report, on tiny runs (no timing)."""

import argparse

import pytest
import torch
from conftest import TINY_LDM_CONFIG

from benchmarks import lora, report, time_to_quality
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
