"""The stabilisers users pick instead of AGGC, as jitted optax transformations.

``zclip`` (ZClip's global z-score clip), ``skip_step`` (a rolling 6-sigma skip
wrapping the optimizer) and ``group_zscore`` (AGGC's groups with z-score upper
bounds, experimental). They are re-exported from :mod:`aggc_optax.presets`; they
share nothing with the core but its checks and its label placement.
"""
