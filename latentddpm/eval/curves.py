"""Training curves from TensorBoard logs: loss, learning rate and validation metrics, a panel each."""

from pathlib import Path

from ..optional import import_optional

# `Figure` without pyplot renders with the Agg canvas and touches no global backend state of the caller.
Figure = import_optional("matplotlib.figure", extra="eval", feature="Plotting training curves").Figure
EventAccumulator = import_optional(
    "tensorboard.backend.event_processing.event_accumulator", extra="eval", feature="Reading TensorBoard logs"
).EventAccumulator


def load_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files under `logdir` (searched recursively).

    Series of one tag from several event files (a resumed run writes a new file) are merged; where two files log the
    same step, the later file wins, so a resumed run's curve replaces what the interrupted run logged after its last
    checkpoint.

    Args:
        logdir (`str` or `Path`): a run's logging folder, e.g. `output_dir/logs` of `train-ldm`.

    Returns:
        `dict` mapping tag to `(step, value)` pairs sorted by step.
    """
    event_files = sorted(Path(logdir).rglob("events.out.tfevents.*"), key=lambda path: path.stat().st_mtime)
    if not event_files:
        raise ValueError(f"No TensorBoard event files (events.out.tfevents.*) under {str(logdir)!r}.")
    series: dict[str, dict[int, float]] = {}
    for path in event_files:
        # size_guidance 0 keeps every point; the default subsamples scalars to 10000
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            points = series.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                points[event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in series.items()}


def group_tags(tags: list[str]) -> dict[str, list[str]]:
    """Panels of the plot: `"loss"` (tags with "loss", validation losses included), `"learning rate"` (`lr...`)
    and `"metrics"` (the rest: validation metrics such as the shapes judge accuracies, and `grad_norm`)."""
    groups: dict[str, list[str]] = {"loss": [], "learning rate": [], "metrics": []}
    for tag in sorted(tags):
        name = tag.rsplit("/", 1)[-1]
        if "loss" in name:
            groups["loss"].append(tag)
        elif name == "lr" or name.startswith("lr_") or name.startswith("lr/") or "learning_rate" in name:
            groups["learning rate"].append(tag)
        else:
            groups["metrics"].append(tag)
    return {group: members for group, members in groups.items() if members}


def plot_training_curves(logdir: str | Path, out_path: str | Path) -> Path:
    """Plot every scalar of a run's TensorBoard logs into one PNG, a panel per group of [`group_tags`] (loss on a
    log scale when positive).

    Args:
        logdir (`str` or `Path`): the run's logging folder.
        out_path (`str` or `Path`): the PNG to write.

    Returns:
        `Path` of the PNG.
    """
    scalars = load_scalars(logdir)
    groups = group_tags(list(scalars))
    figure = Figure(figsize=(5 * len(groups), 3.6))
    axes = figure.subplots(1, len(groups), squeeze=False)
    for axis, (group, tags) in zip(axes[0], groups.items()):
        for tag in tags:
            steps, values = zip(*scalars[tag])
            axis.plot(steps, values, label=tag, marker="." if len(steps) < 30 else None)
        positive = all(value > 0 for tag in tags for _, value in scalars[tag])
        if group in ("loss", "learning rate") and positive:
            axis.set_yscale("log")
        axis.set_title(group)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=110)
    return out_path
