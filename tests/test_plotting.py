"""plot_group_norms: what it draws, from a CSV or from arrays; and that it stays optional."""

import subprocess
import sys

import numpy as np
import pytest

import aggc_optax
from aggc_optax import plotting  # matplotlib ships in the test extra

HEADER = "step,module,norm,lower,upper,scale\n"


def _lines_by_color(ax):
    return {line.get_color(): line for line in ax.get_lines()}


def test_import_aggc_optax_does_not_import_matplotlib():
    code = (
        "import sys, aggc_optax, aggc_optax.csv_log\n"
        "assert 'matplotlib' not in sys.modules, sorted(m for m in sys.modules if 'matpl' in m)\n"
        "import aggc_optax.plotting\n"
        "assert 'matplotlib' in sys.modules\n"
        # The Agg canvas is used directly: pyplot's global state is never touched.
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_repo_root())


def _repo_root():
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(aggc_optax.__file__)))


def test_draws_norm_before_after_and_bounds_from_csv(tmp_path):
    path = tmp_path / "per_module_clip.csv"
    path.write_text(
        HEADER + "0,q_proj,2.0,0.01,0.0,1.0\n"
        "0,v_proj,0.5,0.01,0.0,1.0\n"
        "1,q_proj,4.0,0.095,0.06,0.9\n"
        "1,v_proj,0.25,0.02,0.1,1.0\n"
        "2,q_proj,1.0,0.2,0.3,0.5\n"
        "2,v_proj,0.2,0.03,0.15,1.0\n"
    )
    fig = plotting.plot_group_norms(path, title="t")
    assert [ax.get_title() for ax in fig.axes] == ["q_proj", "v_proj"]
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    lines = _lines_by_color(ax)
    before, after = lines["#1f77b4"], lines["#ff7f0e"]
    upper, lower = lines["#d62728"], lines["#2ca02c"]
    np.testing.assert_array_equal(before.get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(before.get_ydata(), [2.0, 4.0, 1.0])
    np.testing.assert_allclose(after.get_ydata(), [2.0, 3.6, 0.5])  # norm * scale
    # A zero bound (step 0: the EMA is still 0) is a gap on the log axis, not a point at 0.
    np.testing.assert_allclose(upper.get_ydata(), [np.nan, 0.06, 0.3])
    np.testing.assert_allclose(lower.get_ydata(), [0.01, 0.095, 0.2])
    assert upper.get_linestyle() == "--" and lower.get_linestyle() == ":"
    assert fig.get_suptitle() == "t"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [
        "norm before clipping",
        "norm after clipping",
        "upper bound U (clip down above)",
        "lower bound L (raise below, if raise_small)",
    ]


def test_runs_without_bounds_draw_no_bound_lines():
    data = {
        "q_proj": {
            "step": np.arange(3),
            "norm": np.array([1.0, 2.0, 3.0]),
            "lower": np.full(3, np.nan),
            "upper": np.full(3, np.nan),
            "scale": np.array([1.0, 0.5, 0.25]),
        },
        "lm_head": {"step": np.arange(3), "norm": np.ones(3), "scale": np.ones(3)},
    }
    fig = plotting.plot_group_norms(data, log_scale=False)
    for ax in fig.axes:
        assert len(ax.get_lines()) == 2
        assert ax.get_yscale() == "linear"
    np.testing.assert_allclose(fig.axes[0].get_lines()[1].get_ydata(), [1.0, 1.0, 0.75])
    assert len(fig.legends[0].get_texts()) == 2


def test_group_selection_grid_and_saving(tmp_path):
    steps = np.arange(4)
    data = {
        name: {
            "step": steps,
            "norm": np.ones(4),
            "scale": np.ones(4),
            "lower": np.ones(4),
            "upper": np.ones(4),
        }
        for name in ("a", "b", "c", "d", "e")
    }
    fig = plotting.plot_group_norms(data, groups=["e", "a", "c"], ncols=2)
    assert [ax.get_title() for ax in fig.axes] == ["e", "a", "c"]  # the empty 4th panel is gone
    out = tmp_path / "g.png"
    plotting.plot_group_norms(data, path=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000


def test_bad_arguments_are_named():
    data = {"a": {"step": np.arange(2), "norm": np.ones(2), "scale": np.ones(2)}}
    with pytest.raises(ValueError, match=r"groups \['zz'\] are not in the data"):
        plotting.plot_group_norms(data, groups=["zz"])
    with pytest.raises(ValueError, match="ncols must be a positive int, got 0"):
        plotting.plot_group_norms(data, ncols=0)
    with pytest.raises(ValueError, match=r"source\['a'\] lacks \['scale'\]"):
        plotting.plot_group_norms({"a": {"step": [0], "norm": [1.0]}})
    with pytest.raises(TypeError, match="source must be the path"):
        plotting.plot_group_norms([1, 2])
    with pytest.raises(ValueError, match="no group to plot"):
        plotting.plot_group_norms(data, groups=[])


def test_an_all_zero_lower_bound_gets_no_legend_entry():
    # aggc() without low_mult / min_norm logs lower = 0: nothing to draw on a log axis.
    steps = np.arange(3)
    data = {"q_proj": {"step": steps, "norm": np.ones(3), "scale": np.ones(3),
                       "lower": np.zeros(3), "upper": np.full(3, 2.0)}}  # fmt: skip
    fig = plotting.plot_group_norms(data)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [
        "norm before clipping",
        "norm after clipping",
        "upper bound U (clip down above)",
    ]
    fig = plotting.plot_group_norms(data, log_scale=False)  # a linear axis shows the zero line
    assert len(fig.legends[0].get_texts()) == 4
