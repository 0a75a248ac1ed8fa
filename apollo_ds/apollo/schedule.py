"""Stage schedule of a run: which stage (and so how many unique layers N) each optimizer
step belongs to, where expansions happen, and the per-micro-batch (depth, layer map) plan.

Steps are 1-based. Stage k covers steps (end_{k-1}, end_k] with end_{-1} = 0 and the last
stage ending at train.steps; the ends come from ``apollo_ds.config.stage_end_steps``.
The plan is a pure function of the config and the step, so every rank derives the same
depths without communication.
"""
from __future__ import annotations

import bisect

from apollo_ds.config import RunConfig, stage_end_steps

from .layer_maps import layer_map
from .samplers import depth_pmf, expected_depth, sample_depth


class StageSchedule:
    def __init__(self, cfg: RunConfig, dp: int = 1):
        m, a, t = cfg.model, cfg.apollo, cfg.train
        self.layers = m.layers                 # L
        self.steps = t.steps
        self.seed = t.seed
        self.enabled = bool(a.enabled)
        self.sampler = a.sampler
        self.grow = a.grow
        if t.micro_batch < 1 or t.global_batch % (t.micro_batch * dp):
            raise ValueError(f"train.global_batch={t.global_batch} must be a multiple of "
                             f"train.micro_batch={t.micro_batch} x dp={dp}")
        # One depth per micro-step, shared by the dp ranks' micro-batches of that micro-step
        # (the "micro-batch" of a plan is data-parallel-wide): ZeRO-3 gathers parameters per
        # module call, so every DP rank must run the same layer sequence, and equal depths keep
        # DP ranks from waiting on the deepest one at the gradient all-reduce.
        self.micro_batches_per_step = t.global_batch // (t.micro_batch * dp)
        if self.enabled:
            self.unique = list(a.stages)
            self.ends = stage_end_steps(cfg)
        else:
            # Disabled: one full-depth stage, whatever apollo.stages says.
            self.unique, self.ends = [m.layers], [t.steps]
        if len(self.unique) != len(self.ends):
            raise ValueError(f"apollo.stages={self.unique} and stage ends {self.ends} differ "
                             f"in length; validate the config first")
        if any(x >= y for x, y in zip(self.ends, self.ends[1:])) or self.ends[0] < 1:
            raise ValueError(f"stage end steps {self.ends} must be increasing and >= 1")

    # --- stages ------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.unique)

    def _check_step(self, step: int) -> None:
        if not 1 <= step <= self.steps:
            raise ValueError(f"step {step} is outside the run's steps 1..{self.steps}")

    def _check_stage(self, k: int) -> None:
        if not 0 <= k < self.num_stages:
            raise ValueError(f"stage {k} does not exist (0..{self.num_stages - 1})")

    def stage_index(self, step: int) -> int:
        self._check_step(step)
        # first stage whose end is >= step
        return bisect.bisect_left(self.ends, step)

    def unique_at(self, step: int) -> int:
        return self.unique[self.stage_index(step)]

    def start_step(self, k: int) -> int:
        self._check_stage(k)
        return 1 if k == 0 else self.ends[k - 1] + 1

    def end_step(self, k: int) -> int:
        self._check_stage(k)
        return self.ends[k]

    def is_expansion_after(self, step: int) -> bool:
        """True when ``step`` is the last step of a non-final stage: grow the pool after it."""
        self._check_step(step)
        return step in self.ends[:-1]

    # --- depths ------------------------------------------------------------------------
    def stage_pmf(self, k: int) -> dict[int, float]:
        self._check_stage(k)
        return depth_pmf(self._sampler(), self.layers, self.unique[k])

    def stage_expected_depth(self, k: int) -> float:
        self._check_stage(k)
        return expected_depth(self._sampler(), self.layers, self.unique[k])

    def _sampler(self) -> str:
        # Disabled Apollo is always full depth; N == L makes every sampler return L anyway.
        return self.sampler if self.enabled else "constant_high"

    def depth(self, step: int, micro: int) -> int:
        """Depth of micro-step ``micro`` (0-based, shared by all DP ranks) of ``step``."""
        if not 0 <= micro < self.micro_batches_per_step:
            raise ValueError(f"micro-batch index {micro} is outside "
                             f"0..{self.micro_batches_per_step - 1}")
        N = self.unique_at(step)
        return sample_depth(self._sampler(), self.layers, N, self.seed, step, micro)

    def plan(self, step: int) -> list[tuple[int, list[int]]]:
        """(depth, layer map) for every micro-step of ``step``, in order."""
        N = self.unique_at(step)
        out = []
        for j in range(self.micro_batches_per_step):
            d = sample_depth(self._sampler(), self.layers, N, self.seed, step, j)
            out.append((d, layer_map(N, d, self.grow)))
        return out
