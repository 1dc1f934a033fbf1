"""Reports of bit-width searches: PNG figures drawn from plain Python data."""

from haqjax.report.plots import bit_probabilities_figure
from haqjax.report.plots import pareto_figure
from haqjax.report.plots import pareto_front
from haqjax.report.plots import plot_bit_probabilities
from haqjax.report.plots import plot_pareto
from haqjax.report.plots import plot_policy_bits
from haqjax.report.plots import plot_search_progress
from haqjax.report.plots import plot_versus_uniform
from haqjax.report.plots import policy_bits_figure
from haqjax.report.plots import search_progress_figure
from haqjax.report.plots import unit_scale
from haqjax.report.plots import versus_uniform_figure
from haqjax.report.run_report import Run
from haqjax.report.run_report import load_run
from haqjax.report.run_report import write_report
