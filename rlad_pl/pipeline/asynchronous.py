"""Asynchronous rollouts with bounded staleness: ``data.max_off_policy_steps: k`` (docs/async.md).

Rollout batch ``e`` (one epoch: ``U = updates_per_rollout`` optimizer steps) is trained from slot ``e U`` on, where
a slot is an optimizer-step position counted from the start of training. With ``k = 0`` it is sampled right before
(the synchronous pipeline, untouched). With ``k > 0`` it is sampled from the student's weights as they are after
slot ``e U - k`` (or, before the run's first slot, the weights the run starts with), so:

* every batch is at most ``k`` optimizer steps old when its first update starts (exactly ``k`` once the run is
  under way), the same in every run: the schedule does not depend on timing, so a run is reproducible;
* a batch is never dropped: when generation is slower than training, the trainer waits for it
  (``timing/wait_for_rollout``), which keeps long and short rollouts in their true proportions;
* the weight version (optimizer steps taken) that sampled each row is recorded (``RolloutBatch.weight_version``)
  and its age at each update is logged (``off_policy/staleness_mean`` / ``_max``).

When a batch is due, the trainer takes a ``snapshot`` of the weights on every rank (FSDP2 gathers run in the
trainer's thread, in the same order everywhere). A sampler that ``overlaps`` (a server) then generates on rank 0's
worker thread, for every rank (each rank's problems with the seed it would use itself), while the trainer trains;
at the batch's first step each rank takes its part (``scatter_object_list``). ``StaleSampler`` generates inline from
the snapshot instead (same batches, no overlap: a study tool). Old / reference / teacher log-probs are computed when
the batch is trained (the trainer's thread): the teacher's signal is always computed on the tokens actually trained,
and ``old_logprobs`` is the trainer's own pre-update policy, against which the objectives' off-policy corrections
weigh the sampler's log-probs (``rlad_pl.objectives.off_policy``).

Checkpoints hold neither in-flight batches nor snapshots: after ``--ckpt_path`` the batches due at the restored slot
(the next ``floor(k / U) + 1``) are sampled from the restored weights, so their staleness is lower than in an
uninterrupted run and the run continues from there (not bit-exact; ``k = 0`` resumes exactly as before).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

from rlad_pl.core.errors import ConfigError
from rlad_pl.models.distributed import rank_world

Rollout = Any  # rlad_pl.pipeline.pipeline.Rollout (which imports this module)
RolloutPipeline = Any


@dataclass
class _Due:
    """A rollout batch that is due: the weights to sample it from and their version."""

    snapshot: Any
    version: int
    future: Optional[Future] = None  # overlapping samplers: rank 0's worker making every rank's rollout


class AsyncRollouts:
    """The schedule above, for one ``RolloutPipeline`` (``pipeline.asynchronous``)."""

    def __init__(self, pipeline: RolloutPipeline, k: int):
        self.pipeline, self.k = pipeline, k
        self.U = pipeline.settings.updates_per_rollout
        self.due: dict[int, _Due] = {}
        self.next_epoch: Optional[int] = None  # the next batch to make due (None: before the first step)
        self.last_epoch: Optional[int] = None  # the run's last epoch (no batch is made past it)
        self._worker: Optional[ThreadPoolExecutor] = None
        self._loaded: Optional[int] = None  # id of the snapshot the sampler holds

    @staticmethod
    def check(k: int, sampler, responses: Optional[str] = None) -> None:
        """One line for a setting that cannot run asynchronously (before any compute)."""
        from rlad_pl.rollout.stale import StaleSampler

        if k and not (sampler is not None and (sampler.overlaps or isinstance(sampler, StaleSampler))):
            name = type(sampler).__name__ if sampler is not None else "HFSampler (the default)"
            raise ConfigError("data.max_off_policy_steps", f"{k} needs a sampler that generates beside the trainer "
                              f"(rlad_pl.rollout.server.ServerSampler); {name} generates on the trainer's own device, "
                              "so nothing could overlap (to study staleness without a server, wrap it in "
                              "rlad_pl.rollout.stale.StaleSampler)")
        if k and responses is not None and responses != "student":
            raise ConfigError("data.max_off_policy_steps", f"{k}: the objectives train on {responses} responses, "
                              "which do not depend on the student's weights and never go stale; set 0")

    @property
    def sampler(self):
        return self.pipeline.sampler

    # ------------------------------------------------------------------------------------------------ schedule
    def first_slot(self, epoch: int) -> int:
        return epoch * self.U

    def make_due(self, position: int, step: int) -> None:
        """Every batch whose sampling slot ``e U - k`` is at or before ``position`` becomes due, sampled from the
        weights as they are now (version ``step``); one snapshot serves all of them."""
        snap, taken = None, False
        while (self.next_epoch is not None and self.first_slot(self.next_epoch) - self.k <= position
               and (self.last_epoch is None or self.next_epoch <= self.last_epoch)):
            if not taken:  # (a snapshot is None on ranks that do not send: they only take part in the gathers)
                self.pipeline.sync(step, setup_only=True)
                snap, taken = self.sampler.snapshot(self.pipeline.policy.student), True
            epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
            due = _Due(snap, step)
            rank, world = rank_world()
            if self.sampler.overlaps and rank == 0:
                if self._worker is None:
                    self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlad_pl-rollouts")
                due.future = self._worker.submit(self._make_all, epoch, due, world)
            self.due[epoch] = due

    def after_slot(self, epoch: int, batch_idx: int, step: int) -> None:
        """The trainer finished slot ``epoch U + batch_idx`` with the student at version ``step``."""
        if self.next_epoch is not None:
            self.make_due(self.first_slot(epoch) + batch_idx + 1, step)

    # ------------------------------------------------------------------------------------------------ sampling
    def _load(self, due: _Due) -> dict[str, float]:
        if self._loaded == id(due.snapshot):
            return {}
        t0 = time.perf_counter()
        stats = self.sampler.load_snapshot(due.snapshot)
        self._loaded = id(due.snapshot)
        self.pipeline.forget_sync()
        return {"timing/weight_sync": time.perf_counter() - t0, **{f"sync/{k}": v for k, v in stats.items()}}

    def _make(self, epoch: int, rank: int, world: int, due: _Due) -> Rollout:
        p, cfg = self.pipeline, self.pipeline.settings
        offset = cfg.problem_offset(epoch, rank, world)
        problems = p.task.problems("train", cfg.prompts_per_rollout, offset=offset)
        rollout = p.rollout(problems, cfg.rollout_seed(epoch, rank), due.version, first_index=offset, sync=False)
        rollout.batch.weight_version = torch.full((rollout.batch.num_sequences,), due.version, dtype=torch.long)
        return rollout

    def _make_all(self, epoch: int, due: _Due, world: int) -> tuple[list[Rollout], float]:
        """Rank 0's worker: load the snapshot, then every rank's rollout of ``epoch``."""
        t0 = time.perf_counter()
        sync = self._load(due)
        rollouts = [self._make(epoch, r, world, due) for r in range(world)]
        for r in rollouts:
            r.stats.update(sync)
        return rollouts, time.perf_counter() - t0

    def rollout(self, epoch: int, step: int) -> Rollout:
        """Rollout batch ``epoch`` for this rank, the trainer at version ``step`` (waits for it when needed)."""
        if self.next_epoch is None:  # the run's first batch (or the first after a resume)
            self.next_epoch = epoch
            self.make_due(self.first_slot(epoch), step)
        if epoch not in self.due:
            raise RuntimeError(f"rollout batch {epoch} was never scheduled (next: {self.next_epoch})")
        due = self.due.pop(epoch)
        rank, world = rank_world()
        t0 = time.perf_counter()
        job = 0.0
        if not self.sampler.overlaps:  # StaleSampler: inline, from the snapshot
            sync = self._load(due)
            rollout = self._make(epoch, rank, world, due)
            rollout.stats.update(sync)
            job = time.perf_counter() - t0
        else:
            mine: list = [None]
            if rank == 0:
                rollouts, job = due.future.result()  # an error of the worker surfaces here, as if made now
                parts = [(r, job) for r in rollouts]
            if world > 1:
                torch.distributed.scatter_object_list(mine, parts if rank == 0 else None, src=0)
            else:
                mine = [parts[0]]
            rollout, job = mine[0]
        waited = time.perf_counter() - t0
        rollout.stats.update({"timing/wait_for_rollout": waited, "timing/rollout_job": job,
                              "timing/overlap": max(job - waited, 0.0) if self.sampler.overlaps else 0.0})
        return rollout

    def staleness(self, rollout: Rollout, step: int, j: int) -> dict[str, float]:
        """The age of the batch's rows at its ``j``-th update (the trainer at version ``step + j``)."""
        v = rollout.batch.weight_version
        if v is None:
            return {}
        age = (step + j - v).float()
        return {"off_policy/staleness_mean": age.mean().item(), "off_policy/staleness_max": age.max().item()}

    # ------------------------------------------------------------------------------------------------ lifecycle
    def drain(self) -> None:
        """Wait for rank 0's worker to finish what it started (before the trainer uses the sampler itself)."""
        for due in list(self.due.values()):
            if due.future is not None:
                due.future.exception()
        self._loaded = None  # the caller is about to load other weights

    def close(self) -> None:
        for due in self.due.values():
            if due.future is not None:
                due.future.cancel()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        self.due.clear()
        self.next_epoch, self._loaded = None, None


__all__ = ["AsyncRollouts"]
