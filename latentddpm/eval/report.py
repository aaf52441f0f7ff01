"""What `latentddpm evaluate` writes about a sweep: the metrics table as CSV, a plot per metric and one
self-contained HTML report (every image embedded, readable offline and easy to share)."""

import base64
import csv
import html
from pathlib import Path
from string import Template

from ..optional import import_optional

# metric -> (what it is, whether higher is better); the order of the table's and the report's columns
METRICS: dict[str, tuple[str, bool]] = {
    "all_acc": ("shapes judge: colour, shape and position all right", True),
    "color_acc": ("shapes judge: colour right", True),
    "shape_acc": ("shapes judge: shape right", True),
    "position_acc": ("shapes judge: position right", True),
    "class_acc": ("reference classifier: prompted class recognised", True),
    "clip_score": ("CLIP score: 100 x cosine of image and prompt embeddings", True),
    "fid": ("FID", False),
    "kid": ("KID (unbiased, x1000 is the usual unit)", False),
    "seconds_per_image": ("seconds per image", False),
}

# The page; `$name` fields are filled (already escaped) by `write_report`.
_DOCUMENT = Template("""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>latentddpm evaluation: $model</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
.warn { background: #fff3cd; padding: 0.5em; border-left: 4px solid #e0a800; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; width: 260px; font-size: 0.8em; }
figure img, h3 + img { image-rendering: pixelated; max-width: 100%; }
</style></head><body>
<h1>Evaluation of <code>$model</code></h1>
<p>Data: <code>$data</code> ($data_kind); seed $seed;
$num_samples samples per setting. Machine: $machine.</p>
$features_note
<h2>Model</h2>$model_sections
<h2>Metrics per setting</h2><p>Best value of each column in bold.</p>
<table><tr>$header</tr>
$body</table>
<h2>Plots</h2>$plots
$curves
<h2>Samples</h2>$grids
</body></html>
""")


def write_csv(path: Path, rows: list[dict]) -> None:
    """One line per setting, a column for every key of any row."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_metric(results: dict, metric: str, path: Path) -> Path:
    """Two panels: the metric against the guidance scale (a line per scheduler and step count) and against the step
    count (a line per scheduler and guidance scale). Colour marks the scheduler; the line is more opaque for more
    steps or stronger guidance.

    Args:
        results (`dict`): what `evaluate` returns (`config`, `features`, `rows`).
        metric (`str`): a key of `METRICS`.
        path (`Path`): the PNG to write.
    """
    # `Figure` without pyplot renders with the Agg canvas and touches no global backend state of the caller.
    Figure = import_optional("matplotlib.figure", extra="eval", feature="latentddpm evaluate's plots").Figure
    config = results["config"]
    schedulers, all_steps, all_guidance = config["schedulers"], config["steps"], config["guidance"]
    figure = Figure(figsize=(11, 4))
    by_guidance, by_steps = figure.subplots(1, 2)
    colors = {name: f"C{i}" for i, name in enumerate(schedulers)}
    values = {(row["scheduler"], row["steps"], row["guidance"]): row.get(metric) for row in results["rows"]}
    for scheduler in schedulers:
        for i, steps in enumerate(all_steps):
            ys = [values[(scheduler, steps, g)] for g in all_guidance]
            alpha = 0.35 + 0.65 * (i + 1) / len(all_steps)
            label = f"{scheduler}, {steps} steps"
            by_guidance.plot(all_guidance, ys, "o-", color=colors[scheduler], alpha=alpha, label=label)
        for i, guidance in enumerate(all_guidance):
            ys = [values[(scheduler, n, guidance)] for n in all_steps]
            alpha = 0.35 + 0.65 * (i + 1) / len(all_guidance)
            label = f"{scheduler}, cfg {guidance:g}"
            by_steps.plot(all_steps, ys, "o-", color=colors[scheduler], alpha=alpha, label=label)
    title, _ = METRICS[metric]
    if metric in ("fid", "kid") and results["features"]:
        title = f"{title} on {results['features']}"
    for axis, xlabel in ((by_guidance, "guidance scale"), (by_steps, "denoising steps")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6, ncol=2)
    by_steps.set_xscale("log")
    by_steps.minorticks_off()
    by_steps.set_xticks(all_steps, [str(n) for n in all_steps])
    figure.suptitle(f"{title} ({config['num_samples']} samples per point, seed {config['seed']})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def write_report(path: Path, results: dict, metrics: list[str], plots: dict[str, Path], curves: Path | None) -> Path:
    """One HTML file with every image embedded (base64).

    Args:
        path (`Path`): the HTML file to write; the rows' `grid` paths are relative to its folder.
        results (`dict`): what `evaluate` returns (`config`, `machine`, `data_kind`, `features`, `num_reference`,
            `model_metrics`, `rows`).
        metrics (`list[str]`): the `METRICS` measured, in column order.
        plots (`dict[str, Path]`): metric -> its plot.
        curves (`Path`, *optional*): the training curves plot.
    """
    config, rows = results["config"], results["rows"]
    columns = ["scheduler", "steps", "guidance", *metrics] + (["kid_std"] if "kid" in metrics else [])
    best = {}
    for metric in metrics:
        values = [row[metric] for row in rows if metric in row]
        best[metric] = max(values) if METRICS[metric][1] else min(values)
    body = ""
    for row in rows:
        cells = ""
        for column in columns:
            value = row.get(column, "")
            bold = column in best and value == best[column]
            cells += f"<td>{'<b>' if bold else ''}{_format(value)}{'</b>' if bold else ''}</td>"
        body += f"<tr>{cells}</tr>\n"

    features = results["features"]
    if features is None:
        features_note = "<p>No feature network: FID and KID were not computed (see <code>--features</code>).</p>"
    else:
        warn = ' class="warn"' if "not comparable" in features else ""
        features_note = (
            f"<p{warn}>FID/KID features: <b>{html.escape(features)}</b>; reference: {results['num_reference']} "
            f"images of <code>{html.escape(config['data'])}</code>, generated: {config['num_samples']} per setting."
            "</p>"
        )
    model_sections = ""
    for name, values in results["model_metrics"].items():
        items = "".join(f"<tr><th>{html.escape(k)}</th><td>{_format(v)}</td></tr>" for k, v in values.items())
        model_sections += f"<h3>{html.escape(name)}</h3><table>{items}</table>"
    grids = ""
    for row in rows:
        scores = ", ".join(f"{m} {_format(row[m])}" for m in metrics if m in row)
        title = f"{row['scheduler']}, {row['steps']} steps, guidance {row['guidance']:g}"
        grids += (
            f"<figure>{_image_tag(path.parent / row['grid'], title, width=256)}"
            f"<figcaption><b>{html.escape(title)}</b><br>{html.escape(scores)}</figcaption></figure>"
        )
    document = _DOCUMENT.substitute(
        model=html.escape(config["model"]),
        data=html.escape(config["data"]),
        data_kind=html.escape(results["data_kind"]),
        seed=config["seed"],
        num_samples=config["num_samples"],
        machine=html.escape(", ".join(f"{k}: {v}" for k, v in results["machine"].items())),
        features_note=features_note,
        model_sections=model_sections or "<p>No model-level metrics requested.</p>",
        header="".join(f"<th>{html.escape(c)}</th>" for c in columns),
        body=body,
        plots="".join(f"<h3>{html.escape(METRICS[m][0])}</h3>{_image_tag(p, m)}" for m, p in plots.items()),
        curves=f"<h2>Training curves</h2>{_image_tag(curves, 'training curves')}" if curves else "",
        grids=grids,
    )
    path.write_text(document)
    return path


def _image_tag(path: Path, alt: str, width: int | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    style = f' style="width:{width}px"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{style}>'


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))
