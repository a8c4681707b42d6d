"""Pictures with matplotlib (the headless Agg backend): attention grids, alignments, and the
probe's charts. Each function writes one PNG and returns its path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from torch import Tensor  # noqa: E402

# Chinese labels: matplotlib's own font (DejaVu Sans) has no Chinese characters, so with the
# optional `mplfonts` package (pip install qkv[cjk]) its Noto Sans CJK SC is registered as a
# fallback, glyph by glyph; without it Chinese labels draw as boxes (the HTML pages are fine).
CJK_FONT = "NotoSansCJKsc-Regular.otf"


def _cjk_fallback() -> None:
    try:
        import mplfonts
    except ImportError:
        return
    path = Path(mplfonts.__file__).parent / "fonts" / CJK_FONT
    if path.is_file():
        font_manager.fontManager.addfont(str(path))
        name = font_manager.FontProperties(fname=str(path)).get_name()
        matplotlib.rcParams["font.family"] = ["DejaVu Sans", name]


_cjk_fallback()


def _save(fig, path: str | Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def attention_grid(
    layers: Sequence[Tensor],
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    title: str,
    path: str | Path,
) -> Path:
    """A layers x heads grid of heatmaps; each (T, S) map has queries as rows, keys as columns."""
    n_layers, n_heads = len(layers), layers[0].shape[0]
    cell = max(1.6, 0.22 * max(len(x_labels), len(y_labels)))
    fig, axes = plt.subplots(
        n_layers, n_heads, figsize=(cell * n_heads, cell * n_layers), squeeze=False
    )
    show_labels = max(len(x_labels), len(y_labels)) <= 30
    for layer, weights in enumerate(layers):
        for head in range(n_heads):
            ax = axes[layer][head]
            ax.imshow(
                weights[head].float().cpu().numpy(),
                cmap="viridis",
                vmin=0.0,
                vmax=1.0,
                aspect="auto",
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
                if show_labels and n_heads == 1:
                    ax.set_yticks(range(len(y_labels)), y_labels, fontsize=6)
    fig.suptitle(f"{title}  (rows: queries, columns: keys; brighter = more weight)", fontsize=10)
    return _save(fig, path)


def query_heads(
    layers: Sequence[Tensor], keys: Sequence[str], query: str, title: str, path: str | Path
) -> Path:
    """One query's attention in every head: per layer, a (heads x keys) heatmap whose row h is
    head h's weights over the keys, each head's top key outlined."""
    n_heads = layers[0].shape[0]
    fig, axes = plt.subplots(
        len(layers),
        1,
        figsize=(0.55 * len(keys) + 2, 0.3 * n_heads * len(layers) + 1.2 * len(layers)),
        squeeze=False,
    )
    for layer, weights in enumerate(layers):
        ax, w = axes[layer][0], weights.float().cpu().numpy()
        ax.imshow(w, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        for h, k in enumerate(w.argmax(-1)):
            ax.add_patch(plt.Rectangle((k - 0.5, h - 0.5), 1, 1, fill=False, color="crimson"))
        ax.set_yticks(range(n_heads), [f"head {h}" for h in range(n_heads)], fontsize=7)
        ax.set_xticks(range(len(keys)), keys if layer == len(layers) - 1 else [], fontsize=8)
        ax.set_ylabel(f"layer {layer}", fontsize=8)
    axes[-1][0].tick_params(axis="x", rotation=60)
    fig.suptitle(f"{title}: what {query!r} attends to (red: each head's top word)", fontsize=10)
    return _save(fig, path)


def alignment(
    weights: Tensor,
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    title: str,
    path: str | Path,
) -> Path:
    """One labelled (T, S) heatmap: which source subword each output subword attended to."""
    fig, ax = plt.subplots(figsize=(0.45 * len(src_tokens) + 2, 0.35 * len(tgt_tokens) + 1.5))
    ax.imshow(
        weights.float().cpu().numpy(),
        cmap="Blues",
        vmin=0.0,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xticks(range(len(src_tokens)), src_tokens, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(tgt_tokens)), tgt_tokens, fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def layer_head_table(
    values: dict[str, Tensor],
    title: str,
    path: str | Path,
    cmap: str = "magma",
    fmt: str = "{:.2f}",
) -> Path:
    """One (layers x heads) heatmap per attention kind, annotated with the values."""
    kinds = list(values)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 2.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        v = values[kind].float().cpu().numpy()
        ax.imshow(v, cmap=cmap, aspect="auto")
        for (i, j), x in np.ndenumerate(v):
            ax.text(
                j,
                i,
                fmt.format(x),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if x < (v.max() + v.min()) / 2 else "black",
            )
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(v.shape[1]))
        ax.set_yticks(range(v.shape[0]))
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def lines(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    path: str | Path,
) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def bars(
    values: dict[str, float],
    title: str,
    ylabel: str,
    path: str | Path,
    reference: float | None = None,
) -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 0.42 * len(values)), 3.8))
    names = list(values)
    ax.bar(range(len(names)), [values[n] for n in names], color="#4C72B0")
    if reference is not None:
        ax.axhline(reference, color="crimson", linestyle="--", label="intact model")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def confusion(matrix: np.ndarray, labels: Sequence[str], title: str, path: str | Path) -> Path:
    """A confusion matrix: rows the true class, columns the predicted one, cells the counts
    (shaded by each row's share, so a small class's errors show as clearly as a large one's)."""
    m = np.asarray(matrix, dtype=np.float64)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = max(3.2, 0.7 * len(labels) + 1.6)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), x in np.ndenumerate(m):
        color = "white" if share[i, j] > 0.5 else "black"
        ax.text(j, i, f"{int(x)}", ha="center", va="center", fontsize=9, color=color)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
