"""Checkpoints that lose no work: ``RolloutCheckpoint`` (the CLI's default checkpoint callback, ``--checkpoint.*``).

* ``last.ckpt`` is rewritten at the end of every rollout batch (``every_n_epochs``, default 1) and always at the end
  of the run, whatever the validation schedule; ``keep_every_n_epochs`` also keeps numbered copies
  (``epoch=N-step=M.ckpt``, hard links of ``last.ckpt``: no second write). One file per run by default, overwritten in
  place: a 135M-parameter student with AdamW state is ~1.6 GB.
* Writes are atomic: the checkpoint goes to a temporary name in the same folder, is fsync'ed, then ``os.replace``'d
  onto its final name, so a full disk or a kill -9 never leaves a truncated file under a final name (the previous
  checkpoint stays valid).
* A checkpoint whose student weights are not finite is never written (one-line error instead).
* Ctrl-C (``KeyboardInterrupt``): if optimizer steps were taken since the last rollout-batch checkpoint, their state
  goes to ``interrupted.ckpt`` (``last.ckpt`` keeps the exact rollout-batch boundary, so ``--ckpt_path last`` resumes
  bit-exactly); then the Hugging Face export of the current student is written.
* ``--ckpt_path last`` finds the newest ``last.ckpt`` of every ``version_*`` of the run's log folder (a resumed run
  logs to a new version), not only of the new version's own (empty) folder.
* Output folders are checked for writability in ``setup``, before any compute.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from rlad_pl.core.errors import ConfigError
from rlad_pl.core.validation import check_writable  # noqa: F401  (re-exported)

INTERRUPTED_NAME = "interrupted"


# ----------------------------------------------------------------------------------------------- file helpers
def _fsync(path: str) -> None:
    """fsync a file, or every file of a folder tree (a sharded checkpoint), then the folder entries."""
    paths = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path if os.path.isdir(path) else os.path.dirname(path))


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def atomic_replace(tmp: str, final: str) -> None:
    """Move a fully written ``tmp`` (file or folder, same folder as ``final``) onto ``final``.

    A file is one ``os.replace`` (atomic). A folder (sharded checkpoint) cannot replace a non-empty folder in one
    step: the old one is renamed aside first, so ``final`` names either the old or the new complete checkpoint,
    never a partial one."""
    _fsync(tmp)
    if os.path.isdir(tmp) and os.path.isdir(final):
        old = final + ".old"
        _remove(old)
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))


def weights_finite(module: torch.nn.Module) -> bool:
    """True when every parameter of ``module`` is finite (local shards under FSDP2)."""
    for p in module.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        if not torch.isfinite(t).all():
            return False
    return True


@contextmanager
def defer_sigint():
    """Hold Ctrl-C (SIGINT) back while the block runs, then deliver it: the optimizer update is never half applied,
    so an interrupt checkpoint holds the state before or after a step. No-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: pending.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and callable(previous):
            previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt here


# ----------------------------------------------------------------------------------------------- callback
class RolloutCheckpoint(ModelCheckpoint):
    """Write ``<log_dir>/checkpoints/last.ckpt`` at the end of every ``every_n_epochs`` rollout batches, atomically.

    Args:
        dirpath: checkpoint folder; default ``<log_dir>/checkpoints`` (``log_dir`` of the first logger, else
            ``<default_root_dir>/checkpoints``).
        every_n_epochs: rewrite ``last.ckpt`` every this many rollout batches (epochs); the last epoch of the run is
            always written.
        keep_every_n_epochs: also keep ``epoch=N-step=M.ckpt`` every this many epochs (hard links of ``last.ckpt``);
            null keeps only ``last.ckpt``.
        save_on_interrupt: on Ctrl-C write ``interrupted.ckpt`` (when steps were taken since ``last.ckpt``) and the
            Hugging Face export (``HFExport``).

    A ``ModelCheckpoint`` of your own in ``trainer.callbacks`` replaces this one; ``trainer.enable_checkpointing:
    false`` removes it.
    """

    def __init__(self, dirpath: Optional[str] = None, every_n_epochs: int = 1,
                 keep_every_n_epochs: Optional[int] = None, save_on_interrupt: bool = True):
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ConfigError("checkpoint.every_n_epochs", f"expected an integer >= 1, got {every_n_epochs!r}")
        if keep_every_n_epochs is not None and (not isinstance(keep_every_n_epochs, int) or keep_every_n_epochs < 1):
            raise ConfigError("checkpoint.keep_every_n_epochs",
                              f"expected an integer >= 1 or null, got {keep_every_n_epochs!r}")
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_epochs=every_n_epochs,
                         save_on_train_epoch_end=True, enable_version_counter=False)
        self.keep_every_n_epochs, self.save_on_interrupt = keep_every_n_epochs, save_on_interrupt
        self._saved_epochs = -1  # finished epochs (rollout batches) held by last.ckpt
        self._user_dirpath = dirpath is not None

    # ------------------------------------------------------------------------------------- setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:
            check_writable(trainer.default_root_dir, "trainer.default_root_dir")
            check_writable(self.dirpath, "checkpoint.dirpath")

    # ------------------------------------------------------------------------------------- when to save
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a resumed run starts from a saved state: nothing new to write until a step is taken
        self._last_global_step_saved = trainer.global_step
        self._saved_epochs = self._finished_epochs(trainer)

    @staticmethod
    def _finished_epochs(trainer: L.Trainer) -> int:
        return trainer.fit_loop.epoch_progress.current.processed

    def _run_ends_now(self, trainer: L.Trainer) -> bool:
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        return (trainer.should_stop or (max_epochs is not None and 0 <= max_epochs <= self._finished_epochs(trainer))
                or (max_steps is not None and 0 <= max_steps <= trainer.global_step))

    def on_train_batch_end(self, *args, **kwargs) -> None:
        pass  # rollout-batch granularity: see on_train_epoch_end

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # checkpoints do not depend on the validation schedule

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        done = self._finished_epochs(trainer)
        keep = bool(self.keep_every_n_epochs) and done % self.keep_every_n_epochs == 0
        if done % self._every_n_epochs == 0 or self._run_ends_now(trainer) or keep:
            self.write_last(trainer)
        if keep:
            self._keep_copy(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run and self._saved_epochs != self._finished_epochs(trainer):
            self.write_last(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or not self.save_on_interrupt or trainer.fast_dev_run:
            return
        lines = []
        if trainer.global_step != self._last_global_step_saved and self.dirpath:
            path = os.path.join(self.dirpath, INTERRUPTED_NAME + self.FILE_EXTENSION)
            self._save_checkpoint(trainer, path)
            lines.append(f"optimizer step {trainer.global_step} -> {path}")
        if self.last_model_path:
            lines.append(f"rollout batch {self._saved_epochs} -> {self.last_model_path} (resume: --ckpt_path last)")
        from rlad_pl.training.export import HFExport

        for cb in trainer.callbacks:
            if isinstance(cb, HFExport) and cb.enabled:
                cb.export(trainer, pl_module)
                lines.append(f"export -> {cb.last_path}")
        if trainer.is_global_zero:
            print("rlad_pl: interrupted; saved " + "; ".join(lines), file=sys.stderr)

    # ------------------------------------------------------------------------------------- writing
    def write_last(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` now (atomically)."""
        path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        with defer_sigint():  # the file and the bookkeeping of what it holds change together (Ctrl-C waits)
            self.last_model_path = path
            self._save_checkpoint(trainer, path)
            self._saved_epochs = self._finished_epochs(trainer)

    def _keep_copy(self, trainer: L.Trainer) -> None:
        if not self.last_model_path or not trainer.is_global_zero:
            trainer.strategy.barrier("keep_checkpoint")
            return
        name = self.format_checkpoint_name({"epoch": torch.tensor(trainer.current_epoch),
                                            "step": torch.tensor(trainer.global_step)})
        _remove(name)
        if os.path.isdir(self.last_model_path):
            shutil.copytree(self.last_model_path, name)
        else:
            try:
                os.link(self.last_model_path, name)  # last.ckpt is replaced by rename later: the link keeps this one
            except OSError:
                shutil.copy2(self.last_model_path, name)
        trainer.strategy.barrier("keep_checkpoint")

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        module = trainer.lightning_module
        student = getattr(module, "student", module)
        if not weights_finite(student):
            raise ConfigError("model", f"the student's weights are not finite at optimizer step {trainer.global_step}; "
                              f"not writing {filepath} (the previous checkpoint is unchanged). Lower the learning "
                              "rate or check the objectives")
        folder = os.path.dirname(os.path.abspath(filepath))
        tmp = os.path.join(folder, f".{os.path.basename(filepath)}.tmp")
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            _remove(tmp)
        trainer.strategy.barrier("checkpoint_tmp")
        try:
            trainer.save_checkpoint(tmp, self.save_weights_only)
            if trainer.is_global_zero:
                atomic_replace(tmp, filepath)
        except (OSError, RuntimeError) as e:
            if trainer.is_global_zero:
                _remove(tmp)
            reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e).splitlines()[0]
            if isinstance(e, RuntimeError) and "write" not in str(e).lower():
                raise
            raise ConfigError("checkpoint.dirpath", f"cannot write {filepath}: {reason}; the previous checkpoint "
                              "there is unchanged") from None
        trainer.strategy.barrier("checkpoint_replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    # ------------------------------------------------------------------------------------- resume
    def last_checkpoint_pattern(self, trainer: L.Trainer) -> Optional[str]:
        """Where ``--ckpt_path last`` looks beyond this run's own folder, ``*`` standing for the version folder:
        ``<save_dir>/<name>/*/checkpoints/last.ckpt`` with a logger, else
        ``<default_root_dir>/checkpoints/last.ckpt``; None when ``dirpath`` was given (only that folder counts)."""
        where = self._last_search(trainer)
        return None if where is None else os.path.join(*where)

    def _last_search(self, trainer: L.Trainer) -> Optional[tuple[str, ...]]:
        """``(folder, *glob parts)`` of ``last_checkpoint_pattern`` (the folder is a literal path, not a glob)."""
        if self._user_dirpath:
            return None
        name = self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
        if trainer.loggers:
            logger = trainer.loggers[0]
            root = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name))
            return root, "*", "checkpoints", name
        return str(trainer.default_root_dir), "checkpoints", name

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        found = set(super()._find_last_checkpoints(trainer))
        where = self._last_search(trainer)
        if where is None:
            return found
        folder, *parts = where
        return found | {os.path.normpath(p) for p in glob.glob(os.path.join(glob.escape(folder), *parts))}

    def load_state_dict(self, state_dict: dict) -> None:
        # a resumed run writes to its own version folder: keep this run's paths, without the dirpath warning
        self.best_model_path = state_dict.get("best_model_path", "")


__all__ = ["RolloutCheckpoint", "atomic_replace", "check_writable", "defer_sigint", "weights_finite"]
