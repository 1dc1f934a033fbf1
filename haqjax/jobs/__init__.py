"""Search jobs: a search family between the shared stages, end to end.

`stages` holds what every job does (prepare and the FP32 model, save the
policy, fine-tune, results, report); `rl` (HAQ's DDPG search), `gumbel` (the
differentiable search) and `sweep` (K vmapped Gumbel searches) are each a
thin job on them. The launchers (`python -m experiments.imagenet
--mode=rl|gumbel`, `python -m experiments.sweep`) call these jobs, and so can
notebooks and tests.
"""
