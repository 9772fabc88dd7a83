"""Importance plots (matplotlib Agg canvas, no global backend switch): heads, neurons, layers."""

from __future__ import annotations

from pathlib import Path

from compactlm.formats.scores import ImportanceScores


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_plots(scores: ImportanceScores, plot_dir: str | Path) -> list[Path]:
    """Write heads.png, neurons.png and layers.png into `plot_dir`; return their paths."""
    from matplotlib.figure import Figure

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig = Figure(figsize=(max(4, 0.5 * scores.heads.shape[1] + 2), max(3, 0.25 * scores.num_layers + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(scores.heads.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="query head", ylabel="layer", title="Attention head importance")
    fig.colorbar(im, ax=ax)
    paths.append(_save(fig, plot_dir / "heads.png"))

    fig = Figure(figsize=(10, max(3, 0.25 * scores.num_layers + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(scores.neurons.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="MLP neuron", ylabel="layer", title="MLP neuron importance")
    fig.colorbar(im, ax=ax)
    paths.append(_save(fig, plot_dir / "neurons.png"))

    rows = 2 if scores.layer_loss_increase is not None else 1
    fig = Figure(figsize=(max(6, 0.3 * scores.num_layers + 2), 3 * rows))
    x = list(range(scores.num_layers))
    ax = fig.add_subplot(rows, 1, 1)
    ax.bar(x, scores.layer_block_influence.numpy(), color="tab:blue")
    ax.set(ylabel="1 - cos(in, out)", title="Layer block influence")
    if scores.layer_loss_increase is not None:
        ax = fig.add_subplot(rows, 1, 2)
        ax.bar(x, scores.layer_loss_increase.numpy(), color="tab:red")
        ax.set(ylabel="loss increase", title="Calibration loss increase when the layer is skipped")
    ax.set_xlabel("layer")
    paths.append(_save(fig, plot_dir / "layers.png"))
    return paths
