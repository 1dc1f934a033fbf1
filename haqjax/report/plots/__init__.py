"""Figures of bit-width searches: policies, search progress, accuracy vs cost.

Every plot comes as a pair: a builder `<name>_figure(...)` that returns a
`matplotlib.figure.Figure` (inspectable in tests and notebooks) and a writer
`plot_<name>(path, ...)` that renders it to a PNG atomically and returns the
path. All inputs are plain Python data (lists, dicts, nested sequences); JAX
is never needed. Titles are figure titles (`fig.get_suptitle()`); legends sit
inside the axes or outside them below, never over the title.

  bits      a policy's per-layer bits (HAQ Fig. 3/5), bit probabilities
  progress  reward, accuracy and cost per search episode
  pareto    test top-1 against hardware cost, the Pareto front, one run
            against uniform
  canvas    the Agg canvas, atomic PNG writes and unit prefixes they share

    plot_policy_bits("policy.png", json.load(open("layers.json")),
                     json.load(open("policy.json")))
"""

from haqjax.report.plots.bits import KINDS
from haqjax.report.plots.bits import bit_probabilities_figure
from haqjax.report.plots.bits import plot_bit_probabilities
from haqjax.report.plots.bits import plot_policy_bits
from haqjax.report.plots.bits import policy_bits_figure
from haqjax.report.plots.canvas import unit_scale
from haqjax.report.plots.pareto import pareto_figure
from haqjax.report.plots.pareto import pareto_front
from haqjax.report.plots.pareto import plot_pareto
from haqjax.report.plots.pareto import plot_versus_uniform
from haqjax.report.plots.pareto import versus_uniform_figure
from haqjax.report.plots.progress import plot_search_progress
from haqjax.report.plots.progress import search_progress_figure
