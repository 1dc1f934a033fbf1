"""Quantizable layers, plain flax models made quantizable, and the layer table."""

from haqjax.nn.dataflow import FloatOp
from haqjax.nn.dataflow import conv_bn_pairs
from haqjax.nn.layers import QConv
from haqjax.nn.layers import QDense
from haqjax.nn.layers import layer_name
from haqjax.nn.nnx_model import nnx_quantized
from haqjax.nn.nnx_model import nnx_update
from haqjax.nn.nnx_model import nnx_variables
from haqjax.nn.quantized import Quantized
from haqjax.nn.quantized import init_quantizers
from haqjax.nn.quantized import quantized
from haqjax.nn.table import LayerTable
from haqjax.nn.table import layer_table
