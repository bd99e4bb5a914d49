"""Figures of cartlib.viz (one way to show them, what each builder draws) and the attention
read-out helpers they plot (cartlib.model.attention), on small hand-made inputs."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cartlib import viz  # noqa: E402
from cartlib.model.attention import centre_query_attention, step_attention_profile  # noqa: E402
from cartlib.schedule import TokenSchedule  # noqa: E402

CART = TokenSchedule.cart((1, 2, 4), n_factors=2, depth_per_factor=1)  # 1,2,4 + D_2, D_1 at 4x4
VAR = TokenSchedule.var((1, 2, 4))


@pytest.fixture(autouse=True)
def empty_registry(tmp_path):
    viz.save_open_figures(tmp_path / "before", "x")
    yield
    viz.save_open_figures(tmp_path / "after", "x")


def uniform_maps(schedule, b=2, heads=3):
    """One map per cached step, each query attending uniformly to every allowed key."""
    out = []
    for m, s in enumerate(schedule):
        keys = schedule.offsets[m + 1]
        out.append(torch.full((b, heads, s.numel, keys), 1.0 / keys))
    return out


def is_color(c, name):
    return np.allclose(mcolors.to_rgba(c), mcolors.to_rgba(name))


# ------------------------------------------------------------------------------- show / save
def test_show_names_a_figure_registers_it_once_and_save_uses_the_name(tmp_path):
    fig, ax = plt.subplots()
    viz.show(fig, "Figure 11 (held-out)")
    viz.show(fig, "Figure 11 (held-out)")
    built = viz.image_grid_figure(torch.rand(3, 1, 4, 4), nrow=3, title="a grid")
    paths = viz.save_open_figures(tmp_path, "03")
    assert [p.name for p in paths] == ["03_00_figure-11-held-out.png", "03_01_a-grid.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert built.axes and viz.save_open_figures(tmp_path, "03") == []


def test_show_in_jupyter_displays_only_that_figure_and_closes_it(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    monkeypatch.setattr(
        matplotlib, "get_backend", lambda: "module://matplotlib_inline.backend_inline"
    )
    other, _ = plt.subplots()
    fig, _ = plt.subplots()
    viz.show(fig, "one")
    assert shown == [fig]
    assert fig.number not in plt.get_fignums() and other.number in plt.get_fignums()


# ------------------------------------------------------------------------------ image figures
def test_steps_figure_has_a_column_per_step_and_frames_the_base_column():
    steps = torch.rand(CART.n_steps, 2, 3, 8, 8)
    labels = [s.label for s in CART]
    fig = viz.steps_figure(steps, labels, highlight=CART.n_base - 1)
    axes = np.array(fig.axes).reshape(2, CART.n_steps)
    assert [ax.get_title() for ax in axes[0]] == labels
    framed = [
        k for k in range(CART.n_steps) if axes[0, k].spines["top"].get_visible()
    ]  # bare panels hide their frame; only the highlighted column shows one
    assert framed == [CART.n_base - 1]
    assert is_color(axes[1, CART.n_base - 1].spines["left"].get_edgecolor(), "orange")


def test_steps_figure_shows_what_each_detail_step_added_amplified_by_a_stated_gain():
    """Detail steps that each add +-0.02 (the 99th percentile of |change|): gain 0.4 / 0.02 = 20,
    drawn as 0.5 + 20 x change beneath the decoded row, stated in the row and the title."""
    g = torch.Generator().manual_seed(0)
    nb, b = CART.n_base, 2
    steps = torch.rand(CART.n_steps, b, 1, 4, 4, generator=g) * 0.5 + 0.25
    sign = torch.randint(0, 2, ((CART.n_steps - nb), b, 1, 4, 4), generator=g) * 2.0 - 1
    for k in range(nb, CART.n_steps):
        steps[k] = steps[k - 1] + 0.02 * sign[k - nb]
    labels = [s.label for s in CART]
    fig = viz.steps_figure(steps, labels, title="strip", highlight=nb - 1, details_from=nb)
    assert fig.detail_gain == 20 and "details x20" in fig._suptitle.get_text()
    axes = np.array(fig.axes).reshape(2 * b, CART.n_steps)
    for i in range(b):
        row = axes[2 * i + 1]
        assert [t.get_text() for t in row[nb - 1].texts] == ["details\nx20"]
        assert [len(ax.get_images()) for ax in row] == [0] * nb + [1] * (CART.n_steps - nb)
        for k in range(nb, CART.n_steps):
            shown = row[k].get_images()[0].get_array()
            expected = (0.5 + 20 * (steps[k, i, 0] - steps[k - 1, i, 0])).numpy()
            np.testing.assert_allclose(shown, expected, atol=1e-5)
            np.testing.assert_allclose(np.abs(shown - 0.5), 0.4, atol=1e-5)
    fixed = viz.steps_figure(steps, labels, details_from=nb, gain=5.0)
    assert fixed.detail_gain == 5.0 and fixed._suptitle.get_text().startswith("details x5:")
    with pytest.raises(ValueError, match="details_from=0"):
        viz.steps_figure(steps, labels, details_from=0)


def test_detail_gain_maps_the_99th_percentile_to_0_4_and_is_1_without_change():
    added = torch.linspace(-0.01, 0.01, 2001)  # |added|: 99th percentile 0.0099
    assert viz.detail_gain(added) == pytest.approx(40.0)  # 0.4 / 0.0099 = 40.4, two digits
    assert viz.detail_gain(torch.zeros(10)) == 1.0


def test_token_maps_figure_draws_each_map_at_its_own_grid():
    tokens = [torch.randint(10, (1, s.h, s.w)) for s in CART]
    fig = viz.token_maps_figure(tokens, [s.label for s in CART], vocab=10)
    shapes = [ax.get_images()[0].get_array().shape for ax in fig.axes]
    assert shapes == [(s.h, s.w) for s in CART]


# ------------------------------------------------------------------------------------- plots
def test_figure11_draws_one_line_per_tokenizer_in_the_papers_colours():
    mse = {"vanilla": [0.3, 0.2, 0.1], "multiscale": [0.5, 0.4, 0.2], "base_detail": [0.6, 0.3]}
    fig = viz.figure11(mse, n_base=2)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for name, values in mse.items():
        np.testing.assert_allclose(lines[name].get_ydata(), values)
        np.testing.assert_allclose(lines[name].get_xdata(), range(1, len(values) + 1))
    assert is_color(lines["vanilla"].get_color(), "tab:blue")
    assert is_color(lines["multiscale"].get_color(), "tab:red")
    assert is_color(lines["base_detail"].get_color(), "goldenrod")
    assert lines["base | details"].get_xdata()[0] == 2.5 and ax.get_yscale() == "log"


def test_step_bars_colour_steps_by_kind_and_draw_each_kinds_mean():
    ce = [3.0, 2.0, 4.0, 1.0, 0.5]
    fig = viz.step_bars_figure(CART, {"cross-entropy": ce})
    ax = fig.axes[0]
    bars = ax.patches
    assert [b.get_height() for b in bars] == ce
    kinds = [s.kind for s in CART]
    for bar, kind in zip(bars, kinds, strict=True):
        assert is_color(bar.get_facecolor(), viz.plots.KIND_COLORS[kind])
    means = {ln.get_label(): ln.get_ydata()[0] for ln in ax.get_lines()}
    assert means == {"base mean": pytest.approx(3.0), "detail mean": pytest.approx(0.75)}


def test_table5_figure_plots_mean_and_std_over_seeds_beside_the_paper():
    fids = {0: [10.0, 12.0], 3: [8.0, 8.0]}
    fig = viz.table5_figure(fids, extra={"flat base": [20.0, 22.0]})
    ours, paper = fig.axes
    line = ours.get_lines()[0]  # errorbar's data line (its caps follow)
    np.testing.assert_allclose(line.get_xdata().astype(float), [0, 3])
    np.testing.assert_allclose(line.get_ydata().astype(float), [11.0, 8.0])
    flat = [ln for ln in ours.get_lines() if ln.get_marker() == "s"]
    assert flat[0].get_xdata()[0] == 4 and flat[0].get_ydata()[0] == 21.0
    np.testing.assert_allclose(paper.get_lines()[0].get_ydata(), [1.70, 1.65, 1.62, 1.57, 1.60])


def test_table5_figure_marks_each_training_seed_mean_beside_the_mean_over_all_runs():
    fids = {0: [[10.0, 12.0], [14.0, 16.0]], 3: [[8.0, 8.0], [9.0, 11.0]]}  # train x sampling
    fig = viz.table5_figure(fids, extra={"flat base": [[20.0, 22.0], [30.0, 30.0]]})
    ours = fig.axes[0]
    np.testing.assert_allclose(ours.get_lines()[0].get_ydata().astype(float), [13.0, 9.0])
    dots = [ln for ln in ours.get_lines() if ln.get_marker() == "o" and ln.get_mfc() == "none"]
    got = sorted((float(x), float(y)) for ln in dots for x, y in ln.get_xydata())
    want = [(0.12, 11.0), (0.12, 15.0), (3.12, 8.0), (3.12, 10.0), (4.12, 21.0), (4.12, 30.0)]
    np.testing.assert_allclose(got, want)
    labels = [ln.get_label() for ln in dots]
    assert labels.count("one training seed") == 1  # one legend entry for all the dots
    one_seed = viz.table5_figure({0: [[10.0, 12.0]], 3: [[8.0, 8.0]]})  # the smoke default
    assert not [ln for ln in one_seed.axes[0].get_lines() if ln.get_mfc() == "none"]


# --------------------------------------------------------------------------------- attention
def test_uniform_attention_gives_each_step_its_key_share():
    prof = step_attention_profile(uniform_maps(CART), CART)
    expected = [s.numel / CART.offsets[m + 1] for m, s in enumerate(CART)]
    assert prof["uniform_share"] == pytest.approx(expected)
    assert prof["self_share"] == pytest.approx(expected, abs=1e-6)
    assert prof["self_share"][0] == pytest.approx(1.0)  # r_1 has only itself to look at
    for m, shares in enumerate(prof["map_share"]):
        keys = CART.offsets[m + 1]
        assert shares == pytest.approx([CART[k].numel / keys for k in range(m + 1)], abs=1e-6)


def test_map_shares_locate_attention_on_the_map_it_goes_to():
    maps = uniform_maps(CART, b=1, heads=1)
    m = CART.n_steps - 1  # D_1 looks only at the 2x2 base map
    a = torch.zeros_like(maps[m])
    a[..., CART.step_slice(1)] = 1.0 / CART[1].numel
    maps[m] = a
    prof = step_attention_profile(maps, CART)
    assert prof["map_share"][m] == pytest.approx([0, 1, 0, 0, 0])
    assert prof["self_share"][m] == 0 and prof["uniform_share"][m] == pytest.approx(16 / 53)


def test_centre_query_heatmap_puts_a_one_hot_key_on_its_cell_of_the_full_grid():
    maps = uniform_maps(CART, b=1, heads=2)
    m = 2  # the 4x4 base step: centre query (2, 2); make it look only at the 2x2 map's key (1, 0)
    a = torch.zeros_like(maps[m])
    a[0, :, 2 * 4 + 2, CART.offsets[1] + 1 * 2 + 0] = 1.0
    maps[m] = a
    heat, where = centre_query_attention(maps, CART)
    expected = torch.zeros(4, 4)
    expected[2:4, 0:2] = 0.25  # key (1, 0) of the 2x2 grid covers rows 2-3, columns 0-1
    torch.testing.assert_close(heat[m], expected)
    assert all(float(h.sum()) == pytest.approx(1.0) for h in heat)
    torch.testing.assert_close(where[m], torch.tensor([2.5 / 4, 2.5 / 4]))
    torch.testing.assert_close(where[0], torch.tensor([0.5, 0.5]))


def attention_records():
    records = {}
    for name, sched in (("CART", CART), ("VAR", VAR)):
        heat, where = centre_query_attention(uniform_maps(sched, b=1), sched)
        steps = torch.rand(sched.n_steps, 3, 8, 8)
        records[name] = {"steps": steps, "heat": heat, "query": where, "schedule": sched}
    return records


def test_figure10_has_image_and_attention_rows_per_model_and_frames_cart_base_in_yellow():
    fig = viz.figure10(attention_records())
    bars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(bars) == 2  # one per model: the maps are each divided by their maximum
    axes = np.array([a for a in fig.axes if a not in bars]).reshape(4, CART.n_steps)
    framed = [
        (r, k)
        for r in range(4)
        for k in range(CART.n_steps)
        if axes[r, k].spines["top"].get_visible()
    ]
    assert framed == [(0, CART.n_base - 1)]  # CART's generated base only; VAR has no base step
    assert is_color(axes[0, CART.n_base - 1].spines["top"].get_edgecolor(), "gold")
    assert len(axes[1, 0].get_images()) == 1 and not axes[3, VAR.n_steps].get_images()
    assert axes[1, 0].get_images()[0].get_clim() == (0, 1) and "max" in axes[1, 0].get_title()
    cross = axes[1, 2].get_lines()[0]  # the centre query of the 4x4 step, in pixel coordinates
    assert (cross.get_xdata()[0], cross.get_ydata()[0]) == pytest.approx((2.0, 2.0))


def test_attention_profile_figure_plots_both_quantities_per_model():
    maps = {"CART": (uniform_maps(CART), CART), "VAR": (uniform_maps(VAR), VAR)}
    profiles = {n: step_attention_profile(m, s) for n, (m, s) in maps.items()}
    fig = viz.attention_profile_figure(profiles, {n: s for n, (_, s) in maps.items()})
    dist_ax, share_ax = fig.axes
    shares = {ln.get_label(): list(ln.get_ydata()) for ln in share_ax.get_lines()}
    assert shares["CART"] == pytest.approx(profiles["CART"]["self_share"])
    assert shares["VAR, uniform"] == pytest.approx(profiles["VAR"]["uniform_share"])
    assert len(dist_ax.get_lines()) == 2


def test_figure11_plots_mse_against_the_tokens_each_depth_costs():
    """With the tokens per map, a second panel puts each tokenizer at the tokens it has used:
    a vanilla VQ-VAE's first map already costs all 64 tokens, a multi-scale one's a single one."""
    mse = {"vanilla": [0.1, 0.05], "multiscale": [0.3, 0.2, 0.1, 0.05]}
    tokens = {"vanilla": [64, 64], "multiscale": [1, 4, 16, 64]}
    fig = viz.figure11(mse, n_base=2, tokens_per_depth=tokens)
    depth_ax, token_ax = fig.axes
    lines = {ln.get_label(): ln for ln in token_ax.get_lines()}
    assert list(lines["vanilla"].get_xdata()) == [64, 128]
    assert list(lines["multiscale"].get_xdata()) == [1, 5, 21, 85]
    assert token_ax.get_xscale() == "log" and len(depth_ax.get_lines()) == 3  # + base | details


def test_mask_figure_draws_the_mask_it_is_given_with_one_tick_per_map():
    mask = CART.attn_mask()
    fig = viz.mask_figure(CART, mask)
    (ax,) = fig.axes
    drawn = ax.get_images()[0].get_array()
    assert np.array_equal(np.asarray(drawn) > 0.5, mask.numpy())
    assert [t.get_text() for t in ax.get_xticklabels()] == [s.label for s in CART]
    assert len(ax.get_lines()) == 2 * (CART.n_steps - 1)  # map boundaries, rows and columns


def test_query_attention_figure_marks_the_query_on_a_colour_scale_with_a_bar():
    heat = torch.zeros(4, 4)
    heat[1, 2] = 1.0
    fig = viz.query_attention_figure(torch.rand(3, 8, 8), heat, (0.625, 0.375), "image", "heat")
    bars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(bars) == 1
    heat_ax = [a for a in fig.axes if a not in bars][1]
    assert np.array_equal(heat_ax.get_images()[0].get_array(), heat.numpy())
    cross = heat_ax.get_lines()[0]  # (y, x) = (0.625, 0.375) of a 4x4 grid: cell (2, 1)
    assert (cross.get_xdata()[0], cross.get_ydata()[0]) == pytest.approx((1.0, 2.0))


def test_history_figure_draws_a_labelled_reference_line_on_its_panel_only():
    history = [{"step": s, "loss": 6.0 - s / 10, "acc": s / 100} for s in range(30)]
    fig = viz.history_figure(history, ["loss", "acc"], reference={"loss": (5.5, "ln V")})
    loss_ax, acc_ax = fig.axes
    ref = [ln for ln in loss_ax.get_lines() if ln.get_label() == "ln V"]
    assert len(ref) == 1 and list(ref[0].get_ydata()) == [5.5, 5.5]
    assert loss_ax.get_legend() is not None and acc_ax.get_legend() is None


def test_paper_items_are_saved_under_the_papers_names(tmp_path):
    """Notebooks 05 and 07 write Fig. 3/5/10 and Table 1's row as <run_dir>/paper/<item>_<model>:
    a figure at print resolution, a table row as markdown with the same row as JSON."""
    import json

    import matplotlib.pyplot as plt
    from PIL import Image

    from cartlib.io import save_paper_row
    from cartlib.viz import save_paper_figure

    fig = plt.figure(figsize=(2, 1))
    path = save_paper_figure(tmp_path, "fig3", fig, "cart-d16-256")
    assert path == tmp_path / "paper" / "fig3_cart-d16-256.png"
    with Image.open(path) as im:
        assert im.size[0] >= 2 * 300 - 2  # 300 dpi
    plt.close(fig)
    row = {"model": "cart-d16-256", "FID": 3.14159, "IS": None, "#steps": 14}
    md = save_paper_row(tmp_path, "table1", row, "cart-d16-256")
    assert md.read_text().splitlines() == [
        "| model | FID | IS | #steps |",
        "|---|---|---|---|",
        "| cart-d16-256 | 3.14 | - | 14 |",
    ]
    assert json.loads(md.with_name("table1_cart-d16-256.json").read_text()) == row
    with pytest.raises(ValueError, match="fig3"):
        save_paper_figure(tmp_path, "samples", fig, "x")
    with pytest.raises(ValueError, match="table1"):
        save_paper_row(tmp_path, "fig3", row, "x")
