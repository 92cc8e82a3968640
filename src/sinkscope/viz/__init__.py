"""Every figure of sinkscope: functions from data to a matplotlib ``Figure``, no file I/O (the results that save
themselves write them with `sinkscope.io.save_figure_atomic`).

The one place that picks matplotlib's backend: the non-interactive Agg renderer, so figures are drawn the same
on a server, in CI and in a terminal; importing any module of this package selects it.
"""

import matplotlib

matplotlib.use("Agg")
