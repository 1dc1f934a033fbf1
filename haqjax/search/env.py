"""The quantization environment: layer-by-layer episodes, actions to bits, budgets.

An episode walks the model's layer table. In 'linear' mode (uniform affine
quantization) it decides each layer's weight bits, then its activation bits:
`2 L` steps. In 'kmeans' mode it decides weight bits only (`L` steps) and the
activations stay in floating point, as in HAQ's model-size experiments.

Each step's observation has the columns of `COLUMNS`: the layer index, its
input and output channels, stride, kernel size, whether it is depthwise, its
parameter count, its input feature-map size, whether the step decides weights
(1) or activations (0), and the previous action. Every column is min-max
normalised over the episode's steps (a constant column becomes 0). A matmul
of two activations (layer kind 'matmul', e.g. attention's queries x keys)
reads as the dense layer of its GEMM (channels `G * K` in and `G * N` out,
kernel 1, stride 1, its rows as the feature map) with 0 parameters; its
"weight" step decides its second operand's bits, which take the place of a
kernel's in the policy and the cost models. The columns stay those of HAQ,
so observations of convolutional networks are unchanged.

Two quirks of the original HAQ code are fixed here: its observations kept the
previous episode's last actions (the embedding was written in place and never
reset), and the first step's weight/activation flag did not match the step.
Here each episode starts from the same observations with a previous action of
0, and every step's flag is the role it decides.

After an episode the policy is brought within the budget as HAQ does: sweep
the layers from last to first, lowering a layer's activation bits by one, then
its weight bits by one, checking the cost after each change, until the policy
fits. Layers fixed by convention (first layer W8 on a float input; last layer
W8A8) are never lowered.

That sweep lowers layers whether or not their bits cost much: on a network
whose costs sit in a few layers it removes many bits to save little (on
MobileNetV2 at Bit Fusion's W4A4 latency, a median 134 bits from a random
policy, 19 of its 53 activations left at 2 bits; `python -m
experiments.wall_orders`). `wall_order='saving'` instead lowers, one drop
at a time, the layer and role whose drop saves the most cost per bit
removed (a drop may skip bit-widths that cost the same, as Bit Fusion's 3
and 4), then gives bits back, last drop first, while the policy still fits
(a median 16 bits from the same policies, 10 activations at 2 bits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from haqjax import hardware
from haqjax.nn import LayerTable
from haqjax.nn.table import KINDS
from haqjax.policy import FLOAT_BITS

MODES = ("linear", "kmeans")
WALL_ORDERS = ("haq", "saving")
COLUMNS = ("layer", "in_channels", "out_channels", "stride", "kernel", "depthwise",
           "params", "in_size", "is_weight", "prev_action")
PREV_ACTION_COLUMN = COLUMNS.index("prev_action")
# Bit-widths of the cost tensor: 1..8, then 32 (floating point).
_TENSOR_BITS = hardware.budget.TABLE_BITS


def check_bit_range(min_bits: int, max_bits: int) -> None:
  """One-line errors for a bad bit range."""
  for name, b in (("min_bits", min_bits), ("max_bits", max_bits)):
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 8:
      raise ValueError(f"{name}={b!r}; allowed: an integer in 1..8")
  if min_bits > max_bits:
    raise ValueError(f"min_bits={min_bits} is larger than max_bits={max_bits}; "
                     "allowed: min_bits <= max_bits")


def check_wall_order(order: str) -> None:
  """A one-line error for an order `BudgetWall` does not know."""
  if order not in WALL_ORDERS:
    raise ValueError(f"wall_order={order!r} is not allowed; allowed: {', '.join(WALL_ORDERS)}")


def action_to_bits(action, min_bits: int, max_bits: int) -> np.ndarray:
  """HAQ's mapping of actions in [0, 1] to bits in `[min_bits, max_bits]`.

  `bits = round((max - min + 1) * a + min - 0.5)`, clipped to the range, so the
  unit interval is split into `max - min + 1` equal parts.
  """
  a = np.asarray(action, np.float64)
  bits = np.round((max_bits - min_bits + 1) * a + min_bits - 0.5)
  return np.clip(bits, min_bits, max_bits).astype(np.int64)


def bits_to_action(bits, min_bits: int, max_bits: int) -> np.ndarray:
  """The action at the centre of each bit-width's interval of `action_to_bits`.

  Bits outside `[min_bits, max_bits]` (a layer fixed by convention, or
  floating point) map to the nearest end of [0, 1].
  """
  b = np.asarray(bits, np.float64)
  return np.clip((b - min_bits + 0.5) / (max_bits - min_bits + 1), 0.0, 1.0)


def policy_to_actions(w, a, *, mode: str, min_bits: int, max_bits: int) -> np.ndarray:
  """Per-step actions `[T]` of bits `w`, `a`: the inverse of `actions_to_policy`."""
  w = np.asarray(w)
  if mode == "linear":
    bits = np.stack([w, np.asarray(a)], axis=1).reshape(-1)
  else:
    bits = w
  return bits_to_action(bits, min_bits, max_bits)


def observations(table: LayerTable, mode: str = "linear") -> np.ndarray:
  """The episode's normalised observations `[T, len(COLUMNS)]` (float32).

  The previous-action column is 0 here; the agent writes it while it acts.
  """
  if mode not in MODES:
    raise ValueError(f"quantization={mode!r}; allowed: {', '.join(MODES)}")
  rows = []
  for i in range(len(table)):
    if table.kinds[i] not in KINDS:
      raise ValueError(f"kind of layer {i} ({table.names[i]!r}) is {table.kinds[i]!r}; "
                       f"allowed: {', '.join(KINDS)}")
    base = [i, table.in_channels[i], table.out_channels[i], table.stride[i],
            table.kernel_h[i], float(table.kinds[i] == "depthwise"), table.params[i],
            table.in_h[i] * table.in_w[i]]
    roles = (1.0, 0.0) if mode == "linear" else (1.0,)
    for is_weight in roles:
      rows.append(base + [is_weight, 0.0])
  x = np.asarray(rows, np.float64)
  lo, hi = x.min(axis=0), x.max(axis=0)
  span = np.where(hi > lo, hi - lo, 1.0)
  x = (x - lo) / span
  x[:, PREV_ACTION_COLUMN] = 0.0
  return x.astype(np.float32)


def actions_to_policy(actions, names: Sequence[str], *, mode: str, min_bits: int,
                      max_bits: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-step actions `[T]` -> `(w_bits [L], a_bits [L])` before any budget wall."""
  bits = action_to_bits(np.reshape(actions, -1), min_bits, max_bits)
  n = len(names)
  if mode == "linear":
    if bits.size != 2 * n:
      raise ValueError(f"{bits.size} actions for {n} layers; linear mode takes {2 * n}")
    return bits[0::2].copy(), bits[1::2].copy()
  if bits.size != n:
    raise ValueError(f"{bits.size} actions for {n} layers; kmeans mode takes {n}")
  return bits.copy(), np.full(n, FLOAT_BITS, np.int64)


@dataclasses.dataclass(frozen=True)
class Fixed:
  """Per-layer bits that no action or budget wall changes (-1: free)."""
  w: np.ndarray
  a: np.ndarray

  @classmethod
  def create(cls, n: int, *, mode: str, first_layer_w8: bool = False,
             last_layer_w8a8: bool = False) -> Fixed:
    w = np.full(n, -1, np.int64)
    a = np.full(n, FLOAT_BITS if mode == "kmeans" else -1, np.int64)
    if first_layer_w8:
      w[0], a[0] = 8, FLOAT_BITS
    if last_layer_w8a8:
      w[-1] = 8
      a[-1] = 8 if mode == "linear" else FLOAT_BITS
    return cls(w=w, a=a)

  def apply(self, w: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.where(self.w >= 0, self.w, w), np.where(self.a >= 0, self.a, a)


class BudgetWall:
  """Costs of policies from a per-layer table, and HAQ's budget enforcement.

  A network's cost is the sum of its layers' costs, so the `[L, 9, 9]` cost
  tensor over bits 1..8 and 32 (computed once by the hardware model) gives
  every policy's cost exactly, and each one-bit change updates it in O(1).
  The limit is summed from the same float64 tensor (`Budget.reference_in`), so
  a uniform policy meets a 1.0x budget of itself exactly; comparisons allow
  the relative slack `hardware.budget.RTOL`. `order` is how `enforce` lowers
  a policy over the budget (`WALL_ORDERS`: HAQ's sweep, or the largest
  saving per bit first).
  """

  def __init__(self, target: hardware.Target, layers: hardware.Layers,
               budget: hardware.Budget, *, min_bits: int, max_bits: int, fixed: Fixed,
               order: str = "haq"):
    check_bit_range(min_bits, max_bits)
    check_wall_order(order)
    self.target, self.layers, self.budget = target, layers, budget
    self.min_bits, self.max_bits, self.fixed = min_bits, max_bits, fixed
    self.order = order
    self.tensor = budget.table(target, layers)  # [L, 9, 9] float64
    self.reference = budget.reference_in(self.tensor)
    self.limit = budget.limit_from(self.reference)
    low_w, low_a = fixed.apply(np.full(len(layers), min_bits), np.full(len(layers), min_bits))
    self.min_cost = self.cost(low_w, low_a)
    if not hardware.budget.within(self.min_cost, self.limit):
      unit = hardware.base.UNITS[budget.metric]
      raise ValueError(
          f"budget {budget} ({self.limit:.4g} {unit}) is below the lowest cost "
          f"reachable with bits >= {min_bits}: {self.min_cost:.4g} {unit} = "
          f"{self.min_cost / self.reference:.4g} x {budget.reference}; allowed: a "
          f"budget of at least that (or a lower --min_bits)")

  @staticmethod
  def _index(bits: np.ndarray) -> np.ndarray:
    bits = np.asarray(bits, np.int64)
    return np.where(bits == FLOAT_BITS, len(_TENSOR_BITS) - 1, bits - 1)

  def layer_costs(self, w, a) -> np.ndarray:
    rows = np.arange(self.tensor.shape[0])
    return self.tensor[rows, self._index(w), self._index(a)]

  def cost(self, w, a) -> float:
    """The network cost of bits `w`, `a` `[L]` in the budget's unit."""
    return float(self.layer_costs(w, a).sum())

  def fits(self, w, a) -> bool:
    return bool(hardware.budget.within(self.cost(w, a), self.limit))

  def enforce(self, w, a) -> tuple[np.ndarray, np.ndarray]:
    """Lowers bits until the policy fits, in the wall's `order`."""
    w, a = self.fixed.apply(np.array(w, np.int64), np.array(a, np.int64))
    if self.order == "saving":
      return self._lower_by_saving(w, a)
    return self._lower_as_haq(w, a)

  def _lower_as_haq(self, w: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HAQ's sweep: last layer first, its activations, then its weights, one bit each."""
    limit = self.limit * (1 + hardware.budget.RTOL)
    costs = self.layer_costs(w, a)
    total = costs.sum()
    while total > limit:
      changed = False
      for i in reversed(range(len(w))):
        for bits, fixed in ((a, self.fixed.a), (w, self.fixed.w)):
          if fixed[i] < 0 and bits[i] > self.min_bits:
            bits[i] -= 1
            changed = True
            new = self.tensor[i, self._index(w[i]), self._index(a[i])]
            total += new - costs[i]
            costs[i] = new
            if total <= limit:
              break
        if total <= limit:
          break
      if not changed:  # Unreachable: the constructor checked the minimum.
        raise ValueError(f"budget {self.budget} cannot be met")
    return w, a

  def _drops(self, w: np.ndarray, a: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Saving per bit removed of every drop, `[L, 2 (activation, weight), 8]`.

    Entry `[i, r, b - 1]` lowers layer `i`'s role `r` to `b` bits; drops that
    are not allowed (a fixed role, `b` below `min_bits` or not below the
    current bits) are -inf.
    """
    rows = np.arange(len(w))[:, None]
    lowered = np.broadcast_to(np.arange(1, 9)[None, :], (len(w), 8))
    out = np.full((len(w), 2, 8), -np.inf)
    for r, (bits, fixed) in enumerate(((a, self.fixed.a), (w, self.fixed.w))):
      if r == 0:
        new = self.tensor[rows, self._index(w)[:, None], lowered - 1]
      else:
        new = self.tensor[rows, lowered - 1, self._index(a)[:, None]]
      ok = ((fixed < 0)[:, None] & (lowered >= self.min_bits) & (lowered < bits[:, None])
            & (bits[:, None] != FLOAT_BITS))
      rate = (costs[:, None] - new) / np.maximum(bits[:, None] - lowered, 1)
      out[:, r, :] = np.where(ok, rate, -np.inf)
    return out

  def _lower_by_saving(self, w: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The drop with the largest saving per bit first; then bits given back.

    Ties go to the smallest drop, then the role with more bits, then the
    later layer, then activations (HAQ's order). Once the policy fits, each
    lowered role, last drop first, is raised back a bit at a time while the
    policy still fits.
    """
    limit = self.limit * (1 + hardware.budget.RTOL)
    start_w, start_a = w.copy(), a.copy()
    costs = self.layer_costs(w, a)
    n = len(w)
    layer = np.broadcast_to(np.arange(n)[:, None, None], (n, 2, 8)).ravel()
    role = np.broadcast_to(np.arange(2)[None, :, None], (n, 2, 8)).ravel()
    target = np.broadcast_to(np.arange(1, 9)[None, None, :], (n, 2, 8)).ravel()
    lowered: list[tuple[int, int]] = []
    while costs.sum() > limit:
      rates = self._drops(w, a, costs).ravel()
      now = np.stack([a, w], axis=1)[:, :, None].repeat(8, axis=2).ravel()
      ok = np.flatnonzero(np.isfinite(rates))
      if not ok.size:  # Unreachable: the constructor checked the minimum.
        raise ValueError(f"budget {self.budget} cannot be met")
      # np.lexsort's last key sorts first; the best drop sorts last.
      order = np.lexsort((-role[ok], layer[ok], now[ok], target[ok] - now[ok], rates[ok]))
      k = ok[order[-1]]
      i, r = int(layer[k]), int(role[k])
      (a if r == 0 else w)[i] = target[k]
      costs[i] = self.tensor[i, self._index(w[i]), self._index(a[i])]
      lowered.append((i, r))
    for i, r in reversed(lowered):
      bits, start = (a, start_a) if r == 0 else (w, start_w)
      while bits[i] < start[i]:
        bits[i] += 1
        new = self.tensor[i, self._index(w[i]), self._index(a[i])]
        if costs.sum() - costs[i] + new > limit:
          bits[i] -= 1
          break
        costs[i] = new
    return w, a

  def describe(self, w, a) -> dict[str, float]:
    """Cost, limit and ratios of a policy (JSON-ready)."""
    c = self.cost(w, a)
    ratio = c / self.reference if self.reference > 0 else float("nan")
    return {"cost": c, "limit": self.limit, "ratio": ratio,
            "budget_ratio": c / self.limit}

