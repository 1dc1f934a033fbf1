"""Training configuration: one frozen dataclass, validated on creation.

The launcher builds it from absl flags; tests and notebooks build it directly.
Every field is documented here, and the config is saved as `config.json`
beside the results of each run.
"""

from __future__ import annotations

import dataclasses
import os
import re

from haqjax.configs import JsonConfig

MODES = ("train", "qat", "ptq", "rl", "gumbel", "hawq", "export")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "bfloat16")
_UNIFORM_POLICY = re.compile(r"^w(\d+)a(\d+)$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(JsonConfig):
  """What `train_and_evaluate` runs.

  Attributes:
    mode: 'train' for floating-point training, 'qat' for quantization-aware
      training (fine-tuning) under `policy`, 'ptq' for post-training
      quantization of the `init_from` model under `policy`, 'rl' for the HAQ
      job: FP32 model (trained here, or `init_from`), RL bit search under a
      hardware budget (`haqjax.search.SearchConfig`), fine-tune of the best
      policy, test and report; 'gumbel' for the same job with the
      differentiable search (`haqjax.search.gumbel`) in place of the RL one;
      'hawq' for the same job with Hessian-aware sensitivities and an ILP
      allocation (`haqjax.search.hawq`); 'export' for the integer model of
      the finished quantized run `init_from`, scored and written to
      `workdir/export/` (`haqjax.jobs.export`).
    dataset: digits, fashion_mnist, cifar10 or imagenet2012.
    data_dir: where prepared datasets live (None: $HAQJAX_DATA_DIR or
      ~/.cache/haqjax/datasets).
    manual_dir: where raw files are found for preparation (None: the
      dataset's standard places).
    val_size: held-out validation carved from train: a count, or a fraction in
      [0, 1). Searches score policies on it; the test split is never searched.
    model: a name from `haqjax.models.MODELS`.
    width_mult: width multiplier for models that take one.
    policy: for mode 'qat': 'wXaY' (uniform) or a path to a policy JSON file.
    init_from: a workdir (or its checkpoints/ folder) whose latest checkpoint
      initialises the parameters, e.g. the FP32 run a QAT run fine-tunes.
    weight_quantizer: weight quantizer, a name from
      `haqjax.quant.WEIGHT_QUANTIZERS` (minmax, mse, lsq, kmeans, ...).
    act_quantizer: activation quantizer, a name from
      `haqjax.quant.ACT_QUANTIZERS` (static, dynamic, lsq, pact, haq, ...);
      'static' ranges are calibrated on `calibration_batches` and then fixed,
      as a deployed model's, so logits do not depend on the batch; 'dynamic'
      takes each batch's min/max.
    first_layer_w8: HAQ's convention: the first layer at 8-bit weights with
      its input (the image) in floating point, whatever the policy says.
    last_layer_w8a8: HAQ's option: the last layer (classifier) at W8A8.
    fold_bn: QAT: quantize the BN-folded weights `W * gamma / sqrt(var +
      eps)`, as an integer deployment stores them (simulated BN folding,
      Krishnamoorthi 2018; see `haqjax.models.cnn`). Same variables as
      without it, so FP32 checkpoints initialise it.
    freeze_bn_stats: QAT: BN normalizes with the running statistics of the
      `init_from` model and keeps them (its scale and bias still train).
      Batch statistics divide by a channel's batch deviation, which
      quantization can make zero (every weight or input of the channel
      rounded to one level): its gradient is then scaled by
      `1 / sqrt(eps)`, about 300x, at each such layer.
    calibration_batches: training batches that calibrate the quantizers
      (LSQ steps, PACT clips, k-means codebooks, static ranges) before QAT.
    calibration_size: training images that calibrate PTQ.
    ptq_cle: PTQ: cross-layer equalization and high-bias absorption.
    ptq_relu6: PTQ: 'skip' (ReLU6 pairs are not equalized) or 'relu'.
    ptq_adaround: PTQ: AdaRound the weights.
    adaround_iters: PTQ: AdaRound iterations per layer.
    ptq_bias_correction: PTQ: 'none', 'empirical' or 'analytic' (nearest
      rounding only; AdaRound replaces it).
    ptq_weight_range: PTQ: 'minmax' or 'mse' weight ranges.
    ptq_act_range: PTQ: activation ranges, 'minmax', 'ema', 'percentile', 'mse'
      or 'kl'.
    epochs: passes over the training split.
    batch_size: global training batch size (split over all devices).
    eval_batch_size: global evaluation batch size.
    optimizer: 'sgd' (with momentum, Nesterov) or 'adamw'.
    learning_rate: peak learning rate.
    momentum: SGD momentum / AdamW beta1.
    weight_decay: L2 (sgd, added to the gradient) or decoupled (adamw).
    schedule: 'cosine' (decay to 0 after warm-up) or 'constant'.
    warmup_epochs: linear warm-up length, may be fractional.
    label_smoothing: label smoothing of the cross-entropy.
    augment: dataset augmentation (random crop/flip where it applies).
    seed: seed of parameter init and data order.
    split_seed: seed of the train/validation carve (fixed across runs).
    dtype: computation dtype; parameters and optimizer state stay float32.
    log_every_steps: how often training metrics are written.
    checkpoint_every_steps: extra checkpoints inside an epoch (0: only at
      epoch ends).
    keep_checkpoints: how many recent checkpoints to keep.
    progress: show a progress bar (None: only on a terminal).
    tensorboard: also write TensorBoard event files.
  """
  mode: str = "train"
  dataset: str = "fashion_mnist"
  data_dir: str | None = None
  manual_dir: str | None = None
  val_size: float = 5000
  model: str = "quickstart_cnn"
  width_mult: float = 1.0
  policy: str | None = None
  init_from: str | None = None
  weight_quantizer: str = "minmax"
  act_quantizer: str = "static"
  first_layer_w8: bool = False
  last_layer_w8a8: bool = False
  fold_bn: bool = False
  freeze_bn_stats: bool = False
  calibration_batches: int = 4
  calibration_size: int = 1024
  ptq_cle: bool = True
  ptq_relu6: str = "skip"
  ptq_adaround: bool = True
  adaround_iters: int = 2000
  ptq_bias_correction: str = "empirical"
  ptq_weight_range: str = "mse"
  ptq_act_range: str = "mse"
  epochs: float = 10
  batch_size: int = 128
  eval_batch_size: int = 500
  optimizer: str = "sgd"
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  schedule: str = "cosine"
  warmup_epochs: float = 0.0
  label_smoothing: float = 0.0
  augment: bool = False
  seed: int = 0
  split_seed: int = 0
  dtype: str = "float32"
  log_every_steps: int = 100
  checkpoint_every_steps: int = 0
  keep_checkpoints: int = 2
  progress: bool | None = None
  tensorboard: bool = True

  def __post_init__(self):
    def choice(field, allowed):
      value = getattr(self, field)
      if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; allowed: {', '.join(allowed)}")

    def positive(field, strict=True):
      value = getattr(self, field)
      bad = value <= 0 if strict else value < 0
      if isinstance(value, bool) or bad:
        raise ValueError(f"{field}={value!r} must be {'> 0' if strict else '>= 0'}")

    choice("mode", MODES)
    choice("optimizer", OPTIMIZERS)
    choice("schedule", SCHEDULES)
    choice("dtype", DTYPES)
    from haqjax import quant  # pylint: disable=g-import-not-at-top
    choice("weight_quantizer", quant.WEIGHT_QUANTIZERS)
    choice("act_quantizer", quant.ACT_QUANTIZERS)
    for field in ("epochs", "batch_size", "eval_batch_size", "learning_rate",
                  "width_mult", "log_every_steps", "keep_checkpoints",
                  "calibration_batches", "calibration_size", "adaround_iters"):
      positive(field)
    for field in ("momentum", "weight_decay", "warmup_epochs", "label_smoothing",
                  "val_size", "checkpoint_every_steps"):
      positive(field, strict=False)
    if not 0 <= self.momentum < 1:
      raise ValueError(f"momentum={self.momentum} must be in [0, 1)")
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
    if self.warmup_epochs > self.epochs:
      raise ValueError(f"warmup_epochs={self.warmup_epochs} must be <= epochs={self.epochs}")
    if self.mode in ("qat", "ptq") and not self.policy:
      raise ValueError(f"policy is empty; mode {self.mode!r} needs a policy: 'wXaY' "
                       "(e.g. w4a4) or a policy JSON file")
    if self.mode == "ptq" and not self.init_from:
      raise ValueError("init_from is empty; mode 'ptq' quantizes a trained model: "
                       "pass the FP32 run's workdir")
    if self.mode == "export" and not self.init_from:
      raise ValueError("init_from is empty; mode 'export' exports a finished run: "
                       "pass the workdir of a qat or ptq run")
    choice("ptq_relu6", ("skip", "relu"))
    choice("ptq_bias_correction", ("none", "empirical", "analytic"))
    choice("ptq_weight_range", ("minmax", "mse"))
    choice("ptq_act_range", quant.CALIBRATION_METHODS)
    if self.policy:
      self.uniform_bits()  # Validates the 'wXaY' form.

  def uniform_bits(self) -> tuple[int, int] | None:
    """(w, a) when `policy` is 'wXaY'; None when it is a file path."""
    m = _UNIFORM_POLICY.match(self.policy or "")
    if not m:
      if self.policy and not os.path.exists(self.policy):
        raise ValueError(f"policy={self.policy!r} is neither 'wXaY' (e.g. w4a4) "
                         "nor an existing policy JSON file")
      return None
    w, a = int(m.group(1)), int(m.group(2))
    for name, b in (("w", w), ("a", a)):
      if not (1 <= b <= 8 or b == 32):
        raise ValueError(f"policy={self.policy!r}: {name} bits {b} is outside 1..8 "
                         "(or 32 for floating point)")
    return w, a
