"""Fake quantizers whose bit-width is a traced value."""

from haqjax.quant.base import Quantizer
from haqjax.quant.minmax import MinMaxActivation
from haqjax.quant.minmax import MinMaxWeight
from haqjax.quant.minmax import pow2
from haqjax.quant.minmax import ste
from haqjax.quant.minmax import symmetric_fake_quant
from haqjax.quant.minmax import unsigned_fake_quant
