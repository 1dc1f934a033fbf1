"""Quantizable layers and the layer table."""

from haqjax.nn.layers import QConv
from haqjax.nn.layers import QDense
from haqjax.nn.layers import layer_name
from haqjax.nn.table import LayerTable
from haqjax.nn.table import layer_table
