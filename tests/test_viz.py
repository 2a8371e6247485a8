"""Tests for lowrank.viz: the plotted data is the data given, and the static fallback of
`explore` draws the values it promises (oracles: hand-written loops and explicit formulas)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from lowrank import viz


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_widgets_unavailable_headless(monkeypatch):
    monkeypatch.delenv("LOWRANK_SMOKE", raising=False)
    monkeypatch.delenv("LOWRANK_STATIC", raising=False)
    # pytest is not an IPython kernel, so no slider can be shown here
    assert viz.widgets_available() is False
    monkeypatch.setenv("LOWRANK_SMOKE", "1")
    assert viz.widgets_available() is False


def test_explore_static_draws_first_parameter_at_spread_values(monkeypatch):
    monkeypatch.setenv("LOWRANK_STATIC", "1")
    calls = []

    def draw(ax, r, log):
        calls.append((r, log))
        ax.plot([0, 1], [0, r])

    viz.explore(draw, static_values=3, r=[1, 2, 4, 8, 16], log=[True, False])
    # first, middle and last of the five values; the other parameter stays at its first value
    assert calls == [(1, True), (4, True), (16, True)]
    assert len(plt.gcf().axes) == 3


def test_explore_static_with_fewer_values_than_panels(monkeypatch):
    monkeypatch.setenv("LOWRANK_STATIC", "1")
    seen = []
    viz.explore(lambda ax, k: seen.append(k), static_values=4, k=["a", "b"])
    assert seen == ["a", "b"]


@pytest.mark.parametrize(
    "kwargs, message",
    [({}, "at least one parameter"), ({"r": []}, "non-empty"), ({"r": "abc"}, "non-empty")],
)
def test_explore_rejects_bad_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        viz.explore(lambda ax, **p: None, **kwargs)


def test_explore_rejects_zero_static_values():
    with pytest.raises(ValueError, match="static_values"):
        viz.explore(lambda ax, r: None, static_values=0, r=[1])


def test_plot_spectra_sorts_and_normalises():
    s = np.array([1.0, 4.0, 2.0])
    ax = viz.plot_spectra({"m": s})
    x, y = ax.lines[0].get_data()
    np.testing.assert_array_equal(x, [1, 2, 3])
    np.testing.assert_allclose(y, [1.0, 0.5, 0.25])


def test_plot_energy_is_the_cumulative_share():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((7, 5))
    s = np.linalg.svd(m, compute_uv=False)
    ax = viz.plot_energy({"m": s})
    _, y = ax.lines[0].get_data()
    # oracle: Eckart-Young, ||M - M_r||_F^2 = sum of the squared dropped singular values, so
    # the held share is 1 - ||M - M_r||^2 / ||M||^2 with M_r built by an explicit truncated SVD
    u, s_full, vh = np.linalg.svd(m, full_matrices=False)
    for r in range(1, 6):
        m_r = u[:, :r] @ np.diag(s_full[:r]) @ vh[:r]
        held = 1 - np.linalg.norm(m - m_r) ** 2 / np.linalg.norm(m) ** 2
        assert y[r - 1] == pytest.approx(held, abs=1e-12)


def test_plot_stacked_heights_add_up():
    breakdowns = {
        "full": {"weights": 2.0, "gradients": 2.0, "optimizer": 4.0},
        "lora": {"weights": 2.0, "optimizer": 0.5, "activations": 0.0},
    }
    ax = viz.plot_stacked(breakdowns, scale=1.0, unit="bytes")
    totals = {}
    for patch in ax.patches:
        x = round(patch.get_x() + patch.get_width() / 2)
        totals[x] = totals.get(x, 0.0) + patch.get_height()
    assert totals == {0: 8.0, 1: 2.5}
    # a component that is zero in every bar gets no legend entry
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "weights",
        "gradients",
        "optimizer",
    ]


def test_plot_levels_one_tick_per_level():
    levels = np.linspace(-1, 1, 16)
    ax = viz.plot_levels({"a": levels, "b": levels[:8]}, weights=np.zeros(10))
    assert [len(line.get_xdata()) for line in ax.lines] == [16, 8]


def test_plot_matrices_needs_one_axes_per_matrix():
    _, axes = plt.subplots(1, 2)
    with pytest.raises(ValueError, match="2 axes"):
        viz.plot_matrices({"a": np.eye(2), "b": np.eye(2), "c": np.eye(2)}, axes=axes)


def test_plot_heatmap_and_bars_and_curves_show_the_values():
    grid = np.array([[0.1, 0.2], [0.3, 0.4]])
    ax = viz.plot_heatmap(grid)
    np.testing.assert_array_equal(ax.images[0].get_array(), grid)
    ax = viz.plot_bars({"a": 1.0, "b": 3.0})
    assert [p.get_height() for p in ax.patches] == [1.0, 3.0]
    ax = viz.plot_curves({"loss": [3.0, 2.0, 1.0]})
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [3.0, 2.0, 1.0])


def test_explore_with_widgets_builds_one_slider_per_parameter(monkeypatch):
    import ipywidgets

    captured = {}

    def fake_interact(function, **sliders):
        captured.update(sliders)
        function(**{name: slider.value for name, slider in sliders.items()})

    monkeypatch.setattr(viz, "widgets_available", lambda: True)
    monkeypatch.setattr(ipywidgets, "interact", fake_interact)
    drawn = []
    targets = [("q", "v"), ("q", "k", "v", "o")]  # a 2-tuple stays one value, not (label, value)
    viz.explore(lambda ax, r, targets: drawn.append((r, targets)), r=[2, 4, 8], targets=targets)
    assert list(captured) == ["r", "targets"]
    assert captured["r"]._options_values == (2, 4, 8)
    assert captured["targets"]._options_values == tuple(targets)
    assert captured["targets"]._options_labels == ("q/v", "q/k/v/o")
    assert drawn == [(2, ("q", "v"))]  # first values are the defaults


def test_explore_sliders_show_their_whole_name(monkeypatch):
    import ipywidgets

    captured = {}
    monkeypatch.setattr(viz, "widgets_available", lambda: True)
    monkeypatch.setattr(ipywidgets, "interact", lambda draw, **sliders: captured.update(sliders))
    viz.explore(lambda ax, model_name: None, model_name=["LLaMA 65B", "GPT-3 175B"])
    # ipywidgets' default label width is fixed and cuts long names; "initial" sizes it to fit
    assert captured["model_name"].style.description_width == "initial"


def test_plot_dots_zooms_to_the_values_and_draws_band_and_spread():
    values = {"full": 0.95, "LoRA r=8": 0.94, "head only": 0.91}
    ax = viz.plot_dots(values, spread={"LoRA r=8": (0.93, 0.945)}, band=(0.94, 0.95, "margin"))
    dots = next(line for line in ax.lines if line.get_marker() == "o")
    np.testing.assert_array_equal(dots.get_xdata(), [0.95, 0.94, 0.91])
    assert list(dots.get_ydata()) == [0, -1, -2]  # first label on top
    assert [t.get_text() for t in ax.get_yticklabels()] == list(values)
    low, high = ax.get_xlim()
    assert 0.9 < low < 0.91 and 0.95 < high < 0.97  # zoomed, not from 0
    spread = next(line for line in ax.lines if line.get_marker() != "o")
    np.testing.assert_array_equal(spread.get_xdata(), [0.93, 0.945])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["margin"]
    with pytest.raises(ValueError, match="no value"):
        viz.plot_dots(values, spread={"QLoRA": (0.9, 0.92)})


def test_plot_energy_baselines_are_dashed_and_the_same_cumulative_share():
    ax = viz.plot_energy({"update": [3.0, 1.0]}, baselines={"random": [1.0, 1.0]}, mark=None)
    update, random = ax.lines
    assert random.get_linestyle() == "--" and update.get_linestyle() == "-"
    np.testing.assert_allclose(random.get_ydata(), [0.5, 1.0])  # 1 / 2, then all
    np.testing.assert_allclose(update.get_ydata(), [0.9, 1.0])  # 9 / 10
