"""Hardware cost models: latency, energy, traffic and size of bit policies.

Analytic models of the accelerators HAQ used (BISMO, Bit Fusion), a TPU-like
systolic array with SCALE-Sim's timing, and HAQ-format lookup tables, as pure
functions over a network's GEMM view and traced bit arrays::

    from haqjax import hardware
    layers = hardware.from_model("mobilenet_v2", num_classes=100, batch=16)
    target = hardware.get_target("bismo-cloud")
    t = hardware.cost_tensor(target, layers)                 # [53, 8, 8] seconds
    cost = hardware.policy_cost(target, layers, w_bits, a_bits)
    limit = hardware.Budget(metric="latency", value=0.5).resolve(target, layers)
"""

from haqjax.hardware.base import COST_KEYS
from haqjax.hardware.base import METRICS
from haqjax.hardware.base import Target
from haqjax.hardware.bismo import BISMO_CLOUD
from haqjax.hardware.bismo import BISMO_EDGE
from haqjax.hardware.bismo import Bismo
from haqjax.hardware.bitfusion import BITFUSION
from haqjax.hardware.bitfusion import BitFusion
from haqjax.hardware.bitfusion_memory import BufferEnergy
from haqjax.hardware.budget import Budget
from haqjax.hardware.calibration import holdout
from haqjax.hardware.calibration import table_errors
from haqjax.hardware.cim import CIM
from haqjax.hardware.cim import Cim
from haqjax.hardware.cost import available_metrics
from haqjax.hardware.cost import batched_policy_cost
from haqjax.hardware.cost import cost_tensor
from haqjax.hardware.cost import expected_cost
from haqjax.hardware.cost import expected_from_tensor
from haqjax.hardware.cost import layer_costs
from haqjax.hardware.cost import policy_cost
from haqjax.hardware.cost import uniform_cost
from haqjax.hardware.energy import HOROWITZ_45NM
from haqjax.hardware.energy import EnergyTable
from haqjax.hardware.layers import Layers
from haqjax.hardware.layers import effective_bits
from haqjax.hardware.layers import make_layers
from haqjax.hardware.metrics import bitops
from haqjax.hardware.metrics import roofline_s
from haqjax.hardware.metrics import size_bits
from haqjax.hardware.metrics import size_bytes
from haqjax.hardware.model_layers import from_layer_table
from haqjax.hardware.model_layers import from_model
from haqjax.hardware.scale_config import ScaleConfig
from haqjax.hardware.scale_config import read_scale_config
from haqjax.hardware.systolic import SYSTOLIC
from haqjax.hardware.systolic import Systolic
from haqjax.hardware.systolic import fold_cycles
from haqjax.hardware.table import TableTarget
from haqjax.hardware.table import load_table
from haqjax.hardware.targets import PRESETS
from haqjax.hardware.targets import TARGETS
from haqjax.hardware.targets import get_target
from haqjax.hardware.topology import read_topology
