"""`lowmem plan --png`, checked on the matplotlib figure (axes, texts, limits), not on pixels (issue #16 item 6)."""

from pathlib import Path

import pytest

from lowmem.plan import plan
from lowmem.plan.planner import maximize
from lowmem.spec import load_spec

pytest.importorskip("matplotlib")
from lowmem.plan.chart import chart_rows, memory_figure  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.toml"
EIGHT_B = ["model.path=none", "model.preset=llama3.1-8b", "data.tokenizer.vocab_size=128256"]


def _axes(fig):
    device, host = fig.axes
    return device, host


def _row_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_yticklabels()]


def test_rows_are_named_on_the_axis_never_over_a_bar_and_no_two_alike():
    p = plan(load_spec(QUICKSTART), "cpu")
    fig = memory_figure(p)
    ax, _ = _axes(fig)
    labels = _row_labels(ax)
    assert len(labels) == len(set(labels)) == len(chart_rows(p)) > 1
    assert sum(label.startswith("chosen: ") for label in labels) == 1
    # inside the panel only each bar's total, written where its bar ends (left-aligned past it) or, cut, at the edge
    bar_ends = {}
    for patch in ax.patches:
        y = round(patch.get_y() + patch.get_height() / 2, 3)
        bar_ends[y] = max(bar_ends.get(y, 0.0), patch.get_x() + patch.get_width())
    for text in ax.texts:
        x, y = text.get_position()
        assert text.get_text().strip().replace(",", "").replace(".", "").rstrip(" →").isdigit()
        assert x >= bar_ends[round(y, 3)] - 1e-9
    # compile on/off pairs are told apart
    assert any("no compile" in label for label in labels) and any(", compile" in label for label in labels)


def test_the_strategy_that_made_the_8b_plan_fit_and_its_host_memory_are_shown():
    p = plan(load_spec(REPO / "examples" / "llama3.1-8b-qlora.toml", EIGHT_B), "rtx4090-24gb")
    assert p.strategies.activation_offloading
    ax, host_ax = _axes(memory_figure(p))
    chosen = next(label for label in _row_labels(ax) if label.startswith("chosen: "))
    assert "activations offloaded" in chosen
    assert "pinned host memory" in host_ax.get_title()
    host_gib = sum(c.bytes for c in p.memory.host) / 1024**3
    widths = sorted(round(patch.get_width(), 2) for patch in host_ax.patches)
    assert round(host_gib, 2) in widths
    assert host_ax.get_xlim()[1] >= max(widths)


def test_under_maximize_batch_the_scale_shows_the_chosen_plan_and_the_budget():
    p = maximize(load_spec(QUICKSTART), "batch", "h100-80gb")
    ax, _ = _axes(memory_figure(p))
    gib = 1024**3
    x_max = ax.get_xlim()[1]
    budget = p.usable_bytes / gib
    assert any(abs(line.get_xdata()[0] - budget) < 1e-9 for line in ax.get_lines())  # the budget line
    assert max(budget, p.memory.device_bytes / gib) <= x_max <= 1.2 * max(budget, p.memory.device_bytes / gib)
    # the chosen plan's bar spans a visible share of the axis
    assert p.memory.device_bytes / gib > 0.2 * x_max
