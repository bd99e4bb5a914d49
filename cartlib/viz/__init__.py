"""Figures for the notebooks (matplotlib only), one way to show them: a builder ``*_figure``
(or ``figure10`` / ``figure11``) returns a figure, ``viz.show(fig, name)`` displays it, and
``viz.save_open_figures(run_dir, prefix)`` writes every figure of the notebook to
``<run_dir>/figures/`` at the end.

- :mod:`~cartlib.viz.core`: ``show``, the registry and ``save_open_figures``, the live panel;
- :mod:`~cartlib.viz.images`: grids, step strips (Figures 1 and 2(a), with the details each step
  added amplified), token maps, Figure 4;
- :mod:`~cartlib.viz.plots`: training curves, per-step bars (Eq. 9), the block-causal mask,
  Figure 11, Table 5;
- :mod:`~cartlib.viz.attention`: Figure 10, the per-step attention profile and one query's map.
"""

from cartlib.viz.attention import attention_profile_figure, figure10, query_attention_figure
from cartlib.viz.core import (
    compare,
    figure_panel,
    register,
    save_open_figures,
    save_paper_figure,
    show,
    to_image,
)
from cartlib.viz.images import (
    compare_figure,
    decomposition_figure,
    decomposition_rows_figure,
    detail_gain,
    image_grid_figure,
    show_grid,
    show_steps,
    show_token_maps,
    steps_figure,
    token_maps_figure,
)
from cartlib.viz.plots import (
    figure11,
    history_figure,
    mask_figure,
    plot_history,
    step_bars_figure,
    table5_figure,
)

__all__ = [
    "compare",
    "attention_profile_figure",
    "compare_figure",
    "decomposition_figure",
    "decomposition_rows_figure",
    "detail_gain",
    "figure10",
    "figure11",
    "figure_panel",
    "history_figure",
    "image_grid_figure",
    "mask_figure",
    "plot_history",
    "query_attention_figure",
    "register",
    "save_open_figures",
    "save_paper_figure",
    "show",
    "show_grid",
    "show_steps",
    "show_token_maps",
    "step_bars_figure",
    "steps_figure",
    "table5_figure",
    "to_image",
    "token_maps_figure",
]
