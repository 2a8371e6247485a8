"""Plots and sliders shared by the notebooks (matplotlib + ipywidgets).

The notebooks compute everything with the library and hand the numbers to these functions, so
a notebook cell stays one idea long. Each `plot_*` function draws into a matplotlib `Axes` you
pass in (or a new one) and returns it; none of them computes anything the reader should trust
without seeing the code that produced the numbers.

`explore(draw, r=[1, 2, 4, 8])` is the one interactive control: in a live Jupyter front end it
shows a slider per parameter (ipywidgets); headless (CI runs notebooks with LOWRANK_SMOKE=1,
or when ipywidgets or a kernel is missing, or LOWRANK_STATIC=1) it draws the same `draw`
function once per listed value, side by side, so the notebook shows a few values instead of
nothing. A kernel cannot see whether a browser is attached, so the environment variables are
the honest switch: set LOWRANK_STATIC=1 to get static figures for an HTML export.

Papers behind the pictures: Hu et al. 2021, LoRA (arXiv:2106.09685), figure 3 (subspace
similarity); Dettmers et al. 2023, QLoRA (arXiv:2305.14314), NF4 levels and memory footprint.

The examples in this reference draw off screen (matplotlib's Agg backend, as the tests run
them) and show what was drawn: a title, a number of lines.

(About 520 lines, most of them docstrings and examples: one short function per kind of plot,
kept together so that every notebook and the demo draw alike.)
"""

import os
from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

__all__ = [
    "explore",
    "plot_bars",
    "plot_curves",
    "plot_dots",
    "plot_energy",
    "plot_heatmap",
    "plot_levels",
    "plot_matrices",
    "plot_spectra",
    "plot_stacked",
    "widgets_available",
]


def widgets_available() -> bool:
    """True when sliders can work: ipywidgets importable, inside an IPython kernel, and neither
    LOWRANK_SMOKE=1 nor LOWRANK_STATIC=1 is set (the headless switches).

    Examples:
        >>> from lowrank.viz import widgets_available
        >>> widgets_available()  # a plain Python session has no kernel to draw sliders in
        False
    """
    if os.environ.get("LOWRANK_SMOKE") == "1" or os.environ.get("LOWRANK_STATIC") == "1":
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def explore(
    draw: Callable[..., object],
    *,
    static_values: int = 4,
    panel_size: tuple[float, float] = (4.0, 3.2),
    **choices: Sequence,
) -> None:
    """Let the reader move `draw`'s parameters; `draw(ax, **params)` draws one panel.

    Each keyword is a parameter name with the list of values the slider offers, e.g.
    `explore(draw, r=[1, 2, 4, 8, 16], log=[True, False])`; the first value is the default.
    With a widget front end: one selection slider per parameter, redrawn on change, its label
    as wide as the parameter's name needs (ipywidgets' fixed label width cuts "model_name").
    Without one: the first parameter is shown at up to `static_values` values spread over its
    list (first and last included), the others at their defaults, one panel each.

    Examples:
        >>> import matplotlib.pyplot as plt
        >>> import numpy as np
        >>> from lowrank.viz import explore
        >>> def draw(ax, r, log):
        ...     _ = ax.plot(np.arange(1.0, 9.0) ** -r)
        ...     ax.set_yscale("log" if log else "linear")
        ...     ax.set_title(f"r={r}")
        >>> explore(draw, r=[1, 2, 3, 4, 5, 6, 7], log=[False, True])  # headless: 4 panels
        >>> [ax.get_title() for ax in plt.gcf().axes]  # r spread over its list, log at False
        ['r=1', 'r=3', 'r=5', 'r=7']
        >>> plt.close("all")
    """
    if not choices:
        raise ValueError("explore needs at least one parameter, e.g. explore(draw, r=[1, 2, 4])")
    for name, values in choices.items():
        if isinstance(values, str | bytes) or len(values) == 0:
            raise ValueError(f"parameter {name!r} needs a non-empty list of values, got {values!r}")
    if static_values < 1:
        raise ValueError(f"static_values must be at least 1, got {static_values}")

    if widgets_available():
        import ipywidgets

        def redraw(**params):
            fig, ax = plt.subplots(figsize=panel_size)
            draw(ax, **params)
            fig.tight_layout()
            plt.show()

        sliders = {  # (label, value) pairs: a bare 2-tuple value would be read as such a pair
            name: ipywidgets.SelectionSlider(
                options=[(_label(v), v) for v in values],
                value=values[0],
                description=name,
                style={"description_width": "initial"},  # the whole name, never cut off
            )
            for name, values in choices.items()
        }
        ipywidgets.interact(redraw, **sliders)
        return

    grid = _static_grid(choices, static_values)
    fig, axes = plt.subplots(
        1, len(grid), figsize=(panel_size[0] * len(grid), panel_size[1]), squeeze=False
    )
    for ax, params in zip(axes[0], grid, strict=True):
        draw(ax, **params)
    fig.tight_layout()
    plt.show()


def _static_grid(choices: Mapping[str, Sequence], static_values: int) -> list[dict]:
    """The parameter sets the static fallback draws: the first parameter at up to
    `static_values` evenly spread values of its list, every other parameter at its first value."""
    names = list(choices)
    first = list(choices[names[0]])
    picks = np.unique(np.linspace(0, len(first) - 1, min(static_values, len(first))).round())
    defaults = {name: choices[name][0] for name in names[1:]}
    return [{names[0]: first[int(i)], **defaults} for i in picks]


def _label(value: object) -> str:
    """How a slider shows a value: tuples and lists joined by '/', anything else as str()."""
    if isinstance(value, tuple | list):
        return "/".join(str(v) for v in value)
    return str(value)


def _axes(ax: Axes | None, figsize: tuple[float, float] = (5.0, 3.5)) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_spectra(
    spectra: Mapping[str, np.ndarray],
    *,
    ax: Axes | None = None,
    normalize: bool = True,
    title: str = "singular values",
) -> Axes:
    """One line per matrix: its singular values in descending order (log scale).

    normalize=True divides each spectrum by its largest value so matrices of different scale
    (a fine-tuning update and a random matrix) can share the axes. `spectra` maps a label to
    a 1-D array of singular values (any order).

    Examples:
        >>> import matplotlib.pyplot as plt
        >>> import numpy as np
        >>> from lowrank.viz import plot_spectra
        >>> rng = np.random.default_rng(0)
        >>> spectra = {"random": np.linalg.svd(rng.normal(size=(8, 8)), compute_uv=False),
        ...            "rank 2": np.array([3.0, 1.0, 1e-9, 1e-9])}
        >>> ax = plot_spectra(spectra)
        >>> ax.get_title(), len(ax.lines), ax.get_yscale()
        ('singular values', 2, 'log')
        >>> plt.close(ax.figure)
    """
    ax = _axes(ax)
    for label, s in spectra.items():
        s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
        ax.plot(np.arange(1, len(s) + 1), s / s[0] if normalize else s, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i / sigma_1" if normalize else "sigma_i")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


def plot_energy(
    spectra: Mapping[str, np.ndarray],
    *,
    ax: Axes | None = None,
    max_rank: int | None = None,
    mark: float | None = 0.9,
    baselines: Mapping[str, np.ndarray] | None = None,
    title: str = "energy in the top-r directions",
) -> Axes:
    """Cumulative share of the squared Frobenius norm held by the top-r singular values.

    One line per spectrum (label -> 1-D singular values), cut at `max_rank` if given, and a
    dotted line at the share `mark` (None for none). `baselines` (label -> singular values)
    are drawn the same way but dashed and grey, as the scale the spectra are read against
    (e.g. a random matrix of the same shape, which spreads its energy over every direction).

    Examples:
        >>> import matplotlib.pyplot as plt
        >>> import numpy as np
        >>> from lowrank.viz import plot_energy
        >>> ax = plot_energy({"update": np.array([3.0, 1.0, 0.5])}, mark=0.9)
        >>> ax.get_title(), len(ax.lines)  # the spectrum and the 90% mark
        ('energy in the top-r directions', 2)
        >>> ax = plot_energy({"update": [3.0, 1.0, 0.5]}, baselines={"random": [1.2, 1.0, 0.9]})
        >>> [line.get_linestyle() for line in ax.lines]  # update, random, 90% mark
        ['-', '--', ':']
        >>> plt.close("all")
    """
    ax = _axes(ax)
    styles = {"": {}, "baseline": {"color": "grey", "linestyle": "--"}}
    for kind, curves in (("", spectra), ("baseline", baselines or {})):
        for label, s in curves.items():
            s2 = np.sort(np.asarray(s, dtype=np.float64))[::-1] ** 2
            share = np.cumsum(s2) / s2.sum()
            if max_rank is not None:
                share = share[:max_rank]
            ax.plot(np.arange(1, len(share) + 1), share, label=label, **styles[kind])
    if mark is not None:
        ax.axhline(
            mark, color="grey", linestyle=":", linewidth=1, label=f"{mark:.0%} of the energy"
        )
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank r")
    ax.set_ylabel("share of ||M||_F^2")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


def plot_matrices(
    matrices: Mapping[str, np.ndarray], *, axes: Sequence[Axes] | None = None, cmap: str = "RdBu_r"
) -> Sequence[Axes]:
    """Show matrices side by side as images on one symmetric colour scale (0 is white).

    `matrices` maps a label to a 2-D array (any shapes); `axes`, if given, holds one Axes per
    matrix. Returns the axes.

    Examples:
        >>> import matplotlib.pyplot as plt
        >>> import numpy as np
        >>> from lowrank.viz import plot_matrices
        >>> rng = np.random.default_rng(0)
        >>> B, A = rng.normal(size=(6, 2)), rng.normal(size=(2, 5))
        >>> axes = plot_matrices({"B (out, r)": B, "A (r, in)": A, "B @ A (out, in)": B @ A})
        >>> [ax.get_title() for ax in axes]
        ['B (out, r)', 'A (r, in)', 'B @ A (out, in)']
        >>> plt.close("all")
    """
    if axes is None:
        _, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices), 3.2), squeeze=False)
        axes = axes[0]
    if len(axes) != len(matrices):
        raise ValueError(f"got {len(matrices)} matrices but {len(axes)} axes")
    limit = max(float(np.abs(np.asarray(m)).max()) for m in matrices.values()) or 1.0
    for ax, (label, m) in zip(axes, matrices.items(), strict=True):
        ax.imshow(np.asarray(m), cmap=cmap, vmin=-limit, vmax=limit)
        ax.set_title(label, fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    return axes


def plot_curves(
    curves: Mapping[str, Sequence[float]],
    *,
    ax: Axes | None = None,
    xlabel: str = "step",
    ylabel: str = "loss",
    log: bool = False,
    title: str = "",
) -> Axes:
    """Training curves (or any series), one line per label.

    Examples:
        >>> import matplotlib.pyplot as plt
        >>> from lowrank.viz import plot_curves
        >>> ax = plot_curves({"full": [2.3, 1.1, 0.6], "LoRA r=4": [2.3, 1.4, 0.9]}, log=True)
        >>> len(ax.lines), ax.get_ylabel(), ax.get_yscale()
        (2, 'loss', 'log')
        >>> plt.close(ax.figure)
    """
    ax = _axes(ax)
    for label, values in curves.items():
        ax.plot(np.arange(len(values)), np.asarray(values, dtype=np.float64), label=label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


def plot_stacked(
    breakdowns: Mapping[str, Mapping[str, float]],
    *,
    ax: Axes | None = None,
    scale: float = 2.0**30,
    unit: str = "GiB",
    title: str = "where the memory goes",
) -> Axes:
    """Stacked bars: one bar per setting (e.g. full / LoRA / QLoRA), one segment per component
    (weights, gradients, optimizer state, activations...), values in bytes divided by `scale`.

    `breakdowns` maps a setting to {component: bytes}, e.g. `MemoryBreakdown.as_dict()` without
    its "total"; each bar is annotated with its total.

    Examples:
        >>> import matplotlib.pyplot as plt
        >>> from lowrank.viz import plot_stacked
        >>> ax = plot_stacked({"full": {"weights": 14e9, "gradients": 14e9, "optimizer": 56e9},
        ...                    "LoRA": {"weights": 14e9, "gradients": 0.0, "optimizer": 0.1e9}})
        >>> len(ax.containers), [text.get_text() for text in ax.texts]  # 3 components, 2 totals
        (3, ['78.2', '13.1'])
        >>> plt.close(ax.figure)
    """
    ax = _axes(ax, figsize=(6.0, 4.0))
    components: list[str] = []  # in first-seen order; a component that is 0 everywhere is left out
    for parts in breakdowns.values():
        components += [c for c, v in parts.items() if v and c not in components]
    bottoms = np.zeros(len(breakdowns))
    for component in components:
        heights = np.array([parts.get(component, 0.0) / scale for parts in breakdowns.values()])
        ax.bar(list(breakdowns), heights, bottom=bottoms, label=component)
        bottoms += heights
    for x, total in enumerate(bottoms):
        ax.annotate(f"{total:,.1f}", (x, total), ha="center", va="bottom", fontsize="small")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


def plot_levels(
    codebooks: Mapping[str, np.ndarray],
    *,
    ax: Axes | None = None,
    weights: np.ndarray | None = None,
    title: str = "4-bit levels",
) -> Axes:
    """Each codebook's levels as ticks on its own row; optionally the histogram of the
    (absmax-scaled) weights behind them, to see where levels are dense and where weights are.

    `codebooks` maps a name to its levels in [-1, 1] (e.g. `nf4_code()`); `weights`, any shape,
    is histogrammed over [-1, 1]. QLoRA's NF4 (Dettmers et al. 2023, arXiv:2305.14314).

    Examples:
        >>> import matplotlib.pyplot as plt
        >>> from lowrank.numpy import int4_code, nf4_code
        >>> from lowrank.viz import plot_levels
        >>> ax = plot_levels({"NF4": nf4_code(), "int4": int4_code()})
        >>> [label.get_text() for label in ax.get_yticklabels()], len(ax.lines)
        (['NF4', 'int4'], 2)
        >>> plt.close(ax.figure)
    """
    ax = _axes(ax, figsize=(7.0, 3.0))
    if weights is not None:
        twin = ax.twinx()
        twin.hist(np.ravel(weights), bins=101, range=(-1, 1), color="lightgrey")
        twin.set_yticks([])
        ax.set_zorder(twin.get_zorder() + 1)
        ax.patch.set_visible(False)
    for row, levels in enumerate(codebooks.values()):
        levels = np.asarray(levels, dtype=np.float64)
        ax.plot(levels, np.full_like(levels, row), "|", markersize=18, markeredgewidth=2)
    ax.set_yticks(range(len(codebooks)), list(codebooks))
    ax.set_ylim(-0.7, len(codebooks) - 0.3)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("value (in units of the block's absmax)")
    ax.set_title(title)
    return ax


def plot_heatmap(
    values: np.ndarray,
    *,
    ax: Axes | None = None,
    xlabel: str = "j",
    ylabel: str = "i",
    title: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Axes:
    """A grid of numbers in [vmin, vmax] with row/column indices starting at 1 (as in the LoRA
    paper's subspace-similarity figure). `values`: (rows, columns), e.g.
    `subspace_similarity_grid(A1, A2)` (Hu et al. 2021, arXiv:2106.09685, Figure 3).

    Examples:
        >>> import matplotlib.pyplot as plt
        >>> import numpy as np
        >>> from lowrank.viz import plot_heatmap
        >>> ax = plot_heatmap(np.array([[1.0, 0.5, 0.4], [0.9, 0.6, 0.5]]), title="phi")
        >>> ax.images[0].get_array().shape, ax.get_title(), len(ax.figure.axes)  # + colour bar
        ((2, 3), 'phi', 2)
        >>> plt.close(ax.figure)
    """
    ax = _axes(ax, figsize=(4.0, 3.5))
    values = np.asarray(values, dtype=np.float64)
    image = ax.imshow(values, vmin=vmin, vmax=vmax, cmap="viridis", origin="upper")
    ax.set_xticks(range(values.shape[1]), range(1, values.shape[1] + 1))
    ax.set_yticks(range(values.shape[0]), range(1, values.shape[0] + 1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax)
    return ax


def plot_bars(
    values: Mapping[str, float],
    *,
    ax: Axes | None = None,
    log: bool = False,
    ylabel: str = "",
    title: str = "",
    fmt: str = "{:,.3g}",
) -> Axes:
    """Labelled bars with their value written on top (formatted with `fmt`).

    Examples:
        >>> import matplotlib.pyplot as plt
        >>> from lowrank.viz import plot_bars
        >>> ax = plot_bars({"full": 175e9, "LoRA r=4": 18.9e6}, log=True, ylabel="trainable")
        >>> [text.get_text() for text in ax.texts], ax.get_yscale()
        (['1.75e+11', '1.89e+07'], 'log')
        >>> plt.close(ax.figure)
    """
    ax = _axes(ax)
    heights = [float(v) for v in values.values()]
    ax.bar(list(values), heights)
    for x, height in enumerate(heights):
        ax.annotate(fmt.format(height), (x, height), ha="center", va="bottom", fontsize="small")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
    return ax


def plot_dots(
    values: Mapping[str, float],
    *,
    ax: Axes | None = None,
    spread: Mapping[str, tuple[float, float]] | None = None,
    band: tuple[float, float, str] | None = None,
    xlabel: str = "",
    title: str = "",
    fmt: str = "{:,.3g}",
) -> Axes:
    """One dot per label, top to bottom, on a horizontal axis zoomed to the values.

    For numbers that differ little (accuracies of 0.91-0.95): a bar's length would mislead on
    an axis that does not start at 0, a dot's position does not, so the axis can show the
    differences. Each value is written beside its dot (with `fmt`). `spread` (label ->
    (low, high)) draws a line through a dot, e.g. the interquartile range of repeated timings;
    `band` = (low, high, text) shades a span named `text` in the legend, e.g. the margin a
    verdict allows.

    Examples:
        >>> import matplotlib.pyplot as plt
        >>> from lowrank.viz import plot_dots
        >>> ax = plot_dots({"full": 0.954, "LoRA r=8": 0.945, "head only": 0.912},
        ...                band=(0.944, 0.954, "within 1 point of full"), fmt="{:.3f}")
        >>> [text.get_text() for text in ax.texts], [t.get_text() for t in ax.get_yticklabels()]
        (['0.954', '0.945', '0.912'], ['full', 'LoRA r=8', 'head only'])
        >>> round(float(ax.get_xlim()[0]), 4)  # zoomed: 0.912 less a tenth of the range, not 0
        0.9078
        >>> plt.close(ax.figure)
    """
    ax = _axes(ax)
    labels, numbers = list(values), [float(v) for v in values.values()]
    spread = dict(spread or {})
    unknown = sorted(set(spread) - set(labels))
    if unknown:
        raise ValueError(f"spread names labels that have no value: {unknown}")
    rows = -np.arange(len(labels))  # the first label on top
    if band is not None:
        ax.axvspan(band[0], band[1], color="tab:green", alpha=0.15, label=band[2])
    for row, label in zip(rows, labels, strict=True):
        if label in spread:
            ax.plot(spread[label], [row, row], color="tab:blue", linewidth=2, alpha=0.5)
    ax.plot(numbers, rows, "o", color="tab:blue")
    ends = [
        max([number, *spread.get(label, ())]) for label, number in zip(labels, numbers, strict=True)
    ]
    for row, number, end in zip(rows, numbers, ends, strict=True):
        ax.annotate(
            fmt.format(number),
            (end, row),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize="small",
        )
    drawn = numbers + [x for pair in spread.values() for x in pair]
    drawn += [] if band is None else [band[0], band[1]]
    low, high = float(min(drawn)), float(max(drawn))
    width = (high - low) or (abs(high) or 1.0) * 0.1
    ax.set_xlim(low - 0.1 * width, high + 0.3 * width)  # room on the right for the values
    ax.set_yticks(rows, labels)
    ax.set_ylim(rows[-1] - 0.6, 0.6)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if band is not None:  # below the axes, where it covers no dot
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return ax
