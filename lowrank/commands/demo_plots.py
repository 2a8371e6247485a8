"""The plots of `lowrank demo`'s report folder, each drawn to carry one part of the argument.

- accuracy.png: test accuracy per method as dots on an axis zoomed to the differences (bars
  would need an axis from 0, where 0.91 and 0.95 look alike), with the band the verdict
  allows: up to 1 point below full fine-tuning;
- trainable_params.png: trainable parameters per method (log scale) and their share;
- loss_curves.png: the training losses, titled with why head only starts higher (its head
  starts random; every other method starts from that trained head), chance level marked;
- update_energy.png: the energy in the top-r directions of the full fine-tuning update next
  to a random matrix of the same shape (the baseline the summary compares against), and how
  often the model cut to rank r still predicts what the fully fine-tuned one does: the
  update's energy is spread over many directions, its effect on the predictions is not
  (the intrinsic-rank question of Hu et al. 2021, arXiv:2106.09685, section 7).

Drawn with `lowrank.viz` (matplotlib, imported when a plot is drawn). `report` is the dict
`demo.run_demo` returns; `demo_report.write_report` saves one PNG per name in `FIGURES`.

    draw("accuracy.png", ax, report)
"""

import numpy as np

__all__ = ["FIGURES", "draw"]

FIGURES = ("accuracy.png", "trainable_params.png", "loss_curves.png", "update_energy.png")


def draw(filename: str, ax, report: dict) -> None:
    """Draw the plot saved as `filename` (one of `FIGURES`) into the matplotlib Axes `ax`.

    Examples:
        >>> import matplotlib.pyplot as plt
        >>> report = {"config": {"n_test": 1000}, "rows": [
        ...     {"method": "full fine-tuning", "accuracy": 0.954},
        ...     {"method": "LoRA r=8", "accuracy": 0.945}]}
        >>> figure, ax = plt.subplots()
        >>> draw("accuracy.png", ax, report)
        >>> [text.get_text() for text in ax.texts], float(ax.get_xlim()[0]) > 0.9  # not from 0
        (['0.954', '0.945'], True)
        >>> plt.close(figure)
    """
    from lowrank import viz

    draws = {
        "accuracy.png": _accuracy,
        "trainable_params.png": _trainable,
        "loss_curves.png": _losses,
        "update_energy.png": _energy,
    }
    if filename not in draws:
        raise ValueError(f"no plot named {filename!r}; the plots are {FIGURES}")
    draws[filename](ax, report, viz)


def _accuracy(ax, report: dict, viz) -> None:
    accuracy = {row["method"]: row["accuracy"] for row in report["rows"]}
    full = accuracy["full fine-tuning"]
    viz.plot_dots(
        accuracy,
        ax=ax,
        band=(full - 0.01, full, "up to 1 point below full fine-tuning (the verdict's margin)"),
        xlabel=f"test accuracy on {report['config']['n_test']} words (axis zoomed, not from 0)",
        title="VADER word sentiment, all-MiniLM-L6-v2\n"
        "every method but head only starts from the head-only model",
        fmt="{:.3f}",
    )
    ax.title.set_fontsize("medium")


def _trainable(ax, report: dict, viz) -> None:
    rows = report["rows"]
    viz.plot_bars(
        {row["method"]: row["trainable_params"] for row in rows},
        ax=ax,
        log=True,
        ylabel="trainable parameters (log scale)",
        title="what each method trains (count, and share of the model)",
        fmt="{:,.0f}",
    )
    for text, row in zip(ax.texts, rows, strict=True):
        text.set_text(f"{text.get_text()}\n{100 * row['trainable_share']:.3g}%")
    ax.set_ylim(top=ax.get_ylim()[1] * 20)  # room above the tallest bar for its two lines


def _losses(ax, report: dict, viz) -> None:
    losses = {row["method"]: row["losses"] for row in report["rows"]}
    window = max(1, min(10, min(len(values) for values in losses.values()) // 5))
    kernel = np.ones(window) / window
    viz.plot_curves(
        {
            method: np.convolve(np.asarray(values), kernel, mode="valid").tolist()
            for method, values in losses.items()
        },
        ax=ax,
        log=True,
        xlabel="optimizer step",
        ylabel=f"training loss (moving mean of {window})",
        title="head only starts higher: its head starts random, while every other method starts\n"
        "from that trained head (the others' curves show what their extra capacity adds)",
    )
    ax.axhline(np.log(2), color="grey", linestyle=":", linewidth=1, label="ln 2 (a coin flip)")
    ax.title.set_fontsize("medium")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))


def _energy(ax, report: dict, viz) -> None:
    ranks = report["update_ranks"]
    random = {}  # one baseline per shape
    for info in ranks.values():
        label = f"random {info['shape'][0]}x{info['shape'][1]} matrix (same shape)"
        random.setdefault(label, info["random_singular_values"])
    viz.plot_energy(
        {
            "update " + layer.split("layer.")[1].removesuffix(".weight"): info["singular_values"]
            for layer, info in ranks.items()
        },
        ax=ax,
        baselines=random,
        title="energy is not behaviour: the full fine-tuning update cut to rank r",
    )
    cut = report["rank_r_agreement"]
    kept = [(r, share) for r, share in zip(cut["ranks"], cut["agreement"], strict=True) if r > 0]
    label = f"agreement with full fine-tuning, all {cut['layers']} layers cut to rank r"
    ax.plot(*zip(*kept, strict=True), "ks", label=label)
    if 0 in cut["ranks"]:
        ax.axhline(
            cut["agreement"][cut["ranks"].index(0)],
            color="black",
            linestyle="-.",
            linewidth=1,
            label="agreement with no update at all (r = 0)",
        )
    ax.set_xscale("log")
    ax.set_ylabel(r"share of $\|\Delta W\|_F^2$, or of test words")
    ax.title.set_fontsize("medium")
    ax.set_ylim(0, 1.05)  # the agreement markers sit near 1
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
