"""The report's plots, read back from the figures: log axes where values sit near zero, value
labels, the parents as reference lines and points, distinct colours with a legend, whole titles."""

from __future__ import annotations

import textwrap

import pytest

matplotlib = pytest.importorskip("matplotlib")


@pytest.fixture
def figures(monkeypatch):
    """Every figure saved while the test runs (saved as usual, and kept to inspect)."""
    from matplotlib.figure import Figure

    kept = []
    original = Figure.savefig

    def keep(self, *args, **kwargs):
        self.canvas.draw()
        self.renderer = self.canvas.get_renderer()  # Agg, as the plots select
        kept.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return kept


def _row(model, kind, value, **extra):
    return {
        "model": model,
        "kind": kind,
        "demo_nl_chat": value,
        "demo_nl_chat_se": value / 10 if value else None,
        "items": {"demo_nl_chat": 216},
        **extra,
    }


def _inside(fig, artist) -> bool:
    box = artist.get_window_extent(fig.renderer)
    whole = fig.bbox
    return box.x0 >= whole.x0 - 1 and box.x1 <= whole.x1 + 1 and box.y1 <= whole.y1 + 1


def test_the_dutch_chat_plot_shows_every_model_against_its_parents(tmp_path, figures):
    from merger.demo_report import KIND_COLOURS, chat_plot

    rows = [
        _row("base", "base", 0.00002),
        _row("nl", "parent", 0.0121),
        _row("instruct", "parent", 0.0001),
        _row("chat_vector", "child", 0.049),
        _row("demo-slerp #1", "child", 0.009, sweep="demo-slerp"),
    ]
    plot = chat_plot(rows, tmp_path / "dutch_chat.png", "answer_prob", 32000)
    assert (tmp_path / "dutch_chat.png").stat().st_size > 1000
    [fig] = figures
    [ax] = fig.axes
    assert ax.get_xscale() == "log"  # values 600x apart: no bar is invisible
    texts = [t.get_text() for t in ax.texts]
    for value in ("2e-05", "0.0121", "0.0001", "0.049", "0.009"):
        assert any(value in t for t in texts), (value, texts)  # a value label per model
    # the parents as dashed reference lines at their values
    dashed = {round(line.get_xdata()[0], 6) for line in ax.lines if line.get_linestyle() == "--"}
    assert dashed == {0.0121, 0.0001}
    # one legend entry per role, each in its own colour
    legend = {
        t.get_text(): h
        for t, h in zip(ax.get_legend().texts, ax.get_legend().legend_handles, strict=True)
    }
    assert {"parent nl (Dutch)", "parent instruct (chat)"} <= set(legend)
    assert any(name.startswith("base") for name in legend)
    colours = [matplotlib.colors.to_hex(h.get_color()) for h in legend.values()]
    assert len(set(colours)) == len(colours) == 5
    assert {KIND_COLOURS["base"], KIND_COLOURS["nl"], KIND_COLOURS["instruct"]} <= set(colours)
    # the whole title, on the figure
    assert ax.get_title() == "\n".join(textwrap.wrap(plot["title"], 80))
    assert _inside(fig, ax.title)


def _board():
    rows = []
    for rank, (t, dutch, english) in enumerate(
        [(0.25, 0.05, 0.3), (0.5, 0.01, 0.4), (0.75, 0.002, 0.5), (1.0, 0.001, 0.2)], start=1
    ):
        rows.append(
            {
                "rank": rank,
                "params": {"parameters.t[self_attn]": t},
                "dutch_score": dutch,
                "dutch_score_se": dutch / 10,
                "english_score": english,
                "english_score_se": 0.01,
                "pareto": rank <= 3,
            }
        )
    return {
        "study": "demo-slerp",
        "suite": "demo",
        "search": ["parameters.t[self_attn]"],
        "labels": {"parameters.t[self_attn]": "t of self_attn"},
        "rows": rows,
    }


def test_sweep_plots_show_the_parents_as_references_and_say_what_the_axes_are(tmp_path, figures):
    from merger.study.rank import write_plots

    references = {"nl": (0.25, 0.0121), "instruct": (0.45, 0.0001)}
    written = write_plots(_board(), tmp_path, references=references)
    assert [p["path"].name for p in written] == [
        "score_vs_parameters_t_self_attn.png",
        "pareto.png",
    ]
    versus, pareto = figures
    dutch_ax, english_ax = versus.axes
    assert dutch_ax.get_yscale() == "log" and english_ax.get_yscale() == "linear"
    levels = {
        round(line.get_ydata()[0], 6) for line in dutch_ax.lines if line.get_linestyle() == "--"
    }
    assert levels == {0.0121, 0.0001}  # each parent a reference line
    assert "t of self_attn" in english_ax.get_xlabel()  # the model's name, not an index
    [ax] = pareto.axes
    names = [t.get_text() for t in ax.get_legend().texts]
    assert {"nl", "instruct", "variants", "Pareto front (rank)"} <= set(names)
    spots = {(round(x, 6), round(y, 6)) for line in ax.lines for x, y in line.get_xydata()}
    assert {(0.25, 0.0121), (0.45, 0.0001)} <= spots  # the parents as points
    assert ax.get_yscale() == "log"
    assert "English score" in ax.get_xlabel() and "higher is better" in ax.get_xlabel()
    assert "Dutch score" in ax.get_ylabel()
    assert "the parents as reference points" in written[1]["title"]
    for fig in figures:
        title = fig._suptitle if fig._suptitle is not None else fig.axes[0].title
        assert _inside(fig, title)
        assert title.get_text().replace("\n", " ") in " ".join(p["title"] for p in written)
