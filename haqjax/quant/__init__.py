"""The quantizer core: pure fake-quant functions whose bit-width is data.

Functions (`affine`, `ste`, `calibration`, `kmeans`, ...) take the bit-width
as a traced integer, so one compiled program serves every policy and
`jax.vmap` runs many. Quantizer classes (frozen, keyword-only dataclasses)
wrap them for the layers: `init`, `calibrate`, `__call__(params, x, bits)`.
"""

from haqjax.quant.affine import AffineSpec
from haqjax.quant.affine import ROUNDINGS
from haqjax.quant.affine import check_finite
from haqjax.quant.affine import compute_range
from haqjax.quant.affine import compute_scale
from haqjax.quant.affine import dequantize
from haqjax.quant.affine import fake_quant
from haqjax.quant.affine import pow2
from haqjax.quant.affine import qrange
from haqjax.quant.affine import quantize
from haqjax.quant.base import Quantizer
from haqjax.quant.base import passthrough
from haqjax.quant.learned import HAQActivation
from haqjax.quant.learned import LSQ
from haqjax.quant.learned import PACT
from haqjax.quant.learned import grad_scale
from haqjax.quant.learned import lsq_fake_quant
from haqjax.quant.learned import pact_fake_quant
from haqjax.quant.learned import round_ste
from haqjax.quant.rules import QuantRule
from haqjax.quant.rules import QuantScheme
from haqjax.quant.rules import haq_convention
from haqjax.quant.rules import policy_from_rules
from haqjax.quant.estimators import clipped_ste
from haqjax.quant.estimators import ste
from haqjax.quant.uniform import MinMaxActivation
from haqjax.quant.uniform import MinMaxWeight
from haqjax.quant.uniform import StaticRange
from haqjax.quant.registry import ACT_QUANTIZERS
from haqjax.quant.registry import WEIGHT_QUANTIZERS
from haqjax.quant.registry import act_quantizer
from haqjax.quant.registry import weight_quantizer
from haqjax.quant.calibration import METHODS as CALIBRATION_METHODS
from haqjax.quant.calibration import EmaRangeState
from haqjax.quant.calibration import RangeCalibrator
from haqjax.quant.calibration import calibrate_range
from haqjax.quant.calibration import ema_calibrator
from haqjax.quant.calibration import ema_range
from haqjax.quant.calibration import minmax_range
from haqjax.quant.calibration import mse_range
from haqjax.quant.calibration import percentile_range
from haqjax.quant.kl import kl_range
from haqjax.quant.fp8 import FP8
from haqjax.quant.fp8 import fp8_fake_cast
from haqjax.quant.codebook import KMeansWeight
from haqjax.quant.codebook import centroid_grads
from haqjax.quant.codebook import kmeans_size_bits
from haqjax.quant.kmeans1d import KMeansResult
from haqjax.quant.kmeans1d import assign
from haqjax.quant.kmeans1d import kmeans
from haqjax.quant.lowbit import BinaryWeight
from haqjax.quant.lowbit import TernaryWeight
from haqjax.quant.lowbit import binarize
from haqjax.quant.lowbit import ternarize
