"""TensorBoard opens on what matters: a one-page custom-scalars overview and a meaningful ``hp_metric``.

Lightning's TensorBoard page starts with ``epoch`` and a constant ``hp_metric = -1`` and folds the run's real signals
into alphabetical groups. ``TensorBoardOverview`` (registered by the CLI as ``--tensorboard.*``) fixes both:

* **Layout.** After the first training step it writes a custom-scalars layout (CUSTOM SCALARS tab,
  ``http://localhost:6006/#custom_scalars``) whose first category, *Overview*, holds reward / accuracy, validation
  Mean@k per difficulty level, Pass@k, teacher divergence, clip and clamp fractions, entropy, grad norm, loss and
  time per phase; it is written again after a validation or at the end of ``fit`` when tags that first appear
  later (``sync/*`` after the first weight sync, counters) change it. Charts are regexes from ``CATALOGUE``; only those
  that match a tag this run logs are kept (a GRPO run has no teacher chart), and logged tags that no catalogue chart
  covers get one chart per prefix under *Other*.
* **hp_metric.** Lightning's ``-1`` placeholder is switched off; at the end of ``fit`` the run's hyperparameters
  (the CLI config: ``model.*``, ``data.*``, seed, epochs) are written to the HPARAMS tab with
  ``hp_metric`` = the last logged ``val/all/mean@k``. A run that never validated gets no ``hp_metric``.
* **Sources.** What the run trained on, exactly (``run_sources``): the student, teacher and tokenizer as loaded
  (``org/name@<commit>`` for hub ids, the folder otherwise: the module's ``model_tags``) and the dataset
  (``org/name@<commit>`` for a hub dataset: the task's ``source_tag``). They are recorded as ``sources`` in every
  logger's hyperparameters (the run's ``hparams.yaml``), under ``sources/*`` in the HPARAMS tab, and as
  ``hyper_parameters["sources"]`` in every checkpoint.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any, Optional

import lightning as L

#: (category, chart title, tag regexes); TensorBoard matches a regex at the start of a tag (``re.match``)
CATALOGUE: list[tuple[str, str, list[str]]] = [
    ("Overview", "reward and accuracy (rollouts)", [r"rollout/reward_mean$", r"rollout/accuracy$"]),
    ("Overview", "validation Mean@k per level", [r"val/.+/mean@\d+$"]),
    ("Overview", "validation Pass@k (all problems)", [r"val/all/pass@\d+$"]),
    ("Overview", "teacher divergence (student - teacher log-prob, KL)",
     [r".+/teacher_log_ratio_mean$", r".+/reverse_kl_sampled$", r".+/kd_estimate$", r".+/divergence$",
      r".+/fkl$", r".+/rkl$"]),
    ("Overview", "clip and clamp fractions",
     [r".+/clip_frac_low$", r".+/clip_frac_high$", r".+/teacher_clamp_frac$", r".+/tis_clip_frac$",
      r".+/kd_masked_frac$"]),
    ("Overview", "entropy (student tokens)", [r"train/entropy$"]),
    ("Overview", "grad norm (before clipping)", [r"train/grad_norm$"]),
    ("Overview", "loss (total and per objective)", [r".+/loss$"]),
    ("Overview", "time per phase (s)", [r"timing/.+"]),
    ("Validation", "Pass@k per level", [r"val/.+/pass@\d+$"]),
    ("Validation", "response length", [r"val/response_length_mean$"]),
    ("Rollouts", "response length", [r"rollout/response_length_mean$", r"rollout/response_length_max$"]),
    ("Rollouts", "reward std", [r"rollout/reward_std$"]),
    ("Rollouts", "truncated responses, zero-variance groups",
     [r"rollout/truncated_fraction$", r"rollout/zero_variance_groups$"]),
    ("Rollouts", "prompts truncated", [r"rollout/prompt_truncated$"]),
    ("Rollouts", "generated tokens / s", [r"rollout/generated_tokens_per_s$"]),
    ("Rollouts", "teacher cache hits", [r"rollout/teacher_cache_hits$"]),
    ("Optimization", "policy ratio", [r".+/ratio_mean$", r".+/ratio_max$", r".+/log_ratio_mean$"]),
    ("Optimization", "advantages |A| mean", [r".+/advantage_abs_mean$"]),
    ("Optimization", "reference KL", [r".+/ref_kl$"]),
    ("Optimization", "TIS weights", [r".+/tis_weight_mean$", r".+/tis_active$"]),
    ("Optimization", "learning rate", [r"train/lr$"]),
    ("Optimization", "response tokens per step", [r"train/tokens$"]),
    ("Sampler", "train / sampler log-prob mismatch", [r"mismatch/.+"]),
    ("Sampler", "weight sync", [r"sync/.+"]),
    ("Sampler", "non-finite values (counts)", [r"nonfinite/.+"]),
]

#: tags left out of the layout: Lightning's bookkeeping and the progress-bar copy of ``rollout/reward_mean``
IGNORED_TAGS = frozenset({"epoch", "hp_metric", "reward"})


def overview_layout(tags: Iterable[str]) -> dict[str, dict[str, list]]:
    """The custom-scalars layout for a run that logs ``tags``, as ``SummaryWriter.add_custom_scalars`` takes it:
    ``{category: {chart title: ["Multiline", [regex, ...]]}}``.

    Every kept regex matches at least one of ``tags``; charts and categories left empty are dropped. Tags that no
    catalogue regex matches get charts under ``Other``, one per tag prefix (``renio/weight_mean`` -> ``renio``)."""
    tags = sorted(set(tags) - IGNORED_TAGS)
    layout: dict[str, dict[str, list]] = {}
    covered: set[str] = set()
    for category, title, regexes in CATALOGUE:
        kept = []
        for rx in regexes:
            hits = [t for t in tags if re.match(rx, t)]
            if hits:
                kept.append(rx)
                covered.update(hits)
        if kept:
            layout.setdefault(category, {})[title] = ["Multiline", kept]
    other: dict[str, list[str]] = {}
    for t in tags:
        if t not in covered:
            other.setdefault(t.split("/")[0] if "/" in t else t, []).append(re.escape(t) + "$")
    if other:
        layout["Other"] = {prefix: ["Multiline", rxs] for prefix, rxs in other.items()}
    return layout


def expected_eval_tags(pl_module, prefix: str = "val") -> list[str]:
    """Tags that ``DistillationModule._log_eval`` writes for the module's ``MeanPassAtK``: ``<prefix>/<level>/mean@n``,
    ``<prefix>/<level>/pass@k`` for ``all`` and each difficulty bucket, and ``<prefix>/response_length_mean``."""
    metric = getattr(pl_module, "val_metric", None)
    if metric is None:
        return []
    tags = [f"{prefix}/response_length_mean"]
    for level in ["all"] + list(metric.buckets):
        tags += [f"{prefix}/{level}/mean@{metric.n}"] + [f"{prefix}/{level}/pass@{k}" for k in metric.ks]
    return tags


def flat_params(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"model/objectives/0/init_args/alpha": 0.5, ...}`` (lists by index; ``None`` dropped, so
    a column never mixes ``"None"`` strings with numbers across runs)."""
    out: dict[str, Any] = {}
    items = config.items() if isinstance(config, dict) else enumerate(config)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list, tuple)):
            out.update(flat_params(v if isinstance(v, dict) else list(v), key + "/"))
        elif v is not None:
            out[key] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def run_sources(trainer: L.Trainer, pl_module) -> dict[str, str]:
    """Exactly what the run trains on: ``{"student": "org/name@<commit>", "teacher": ..., "tokenizer": ...,
    "dataset": ...}`` from the module's ``model_tags`` (hub ids at their resolved commit, local folders as given)
    and the data module's ``task.source_tag``; entries that do not apply (no teacher, a generated task) are left
    out."""
    sources = {str(k): str(v) for k, v in (getattr(pl_module, "model_tags", None) or {}).items() if v}
    task = getattr(getattr(trainer, "datamodule", None), "task", None)
    if getattr(task, "source_tag", None):
        sources["dataset"] = str(task.source_tag)
    return sources


def run_hyperparameters(trainer: L.Trainer, pl_module) -> dict[str, Any]:
    """The run's hyperparameters for the HPARAMS tab: the CLI config's ``model``, ``data`` and ``seed_everything``
    plus ``trainer/max_epochs`` / ``max_steps`` (from ``SaveConfigCallback``); without the CLI, the module's
    ``hparams_initial``. Either way with ``sources/*`` (``run_sources``)."""
    from lightning.pytorch.cli import SaveConfigCallback

    sources = flat_params({"sources": run_sources(trainer, pl_module)})
    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback):
            cfg = cb.config.as_dict() if hasattr(cb.config, "as_dict") else dict(cb.config)
            picked = {k: cfg[k] for k in ("seed_everything", "model", "data") if k in cfg}
            picked["trainer"] = {k: cfg.get("trainer", {}).get(k) for k in ("max_epochs", "max_steps")}
            return {**flat_params(picked), **sources}
    return {**flat_params(dict(pl_module.hparams_initial)), **sources}


def _tensorboard_loggers(trainer: L.Trainer) -> list:
    from lightning.pytorch.loggers import TensorBoardLogger

    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class TensorBoardOverview(L.Callback):
    """Writes the custom-scalars overview and the final-validation ``hp_metric`` to every TensorBoard logger.

    Args:
        layout: write the custom-scalars layout after the first training step.
        hp_metric: replace Lightning's constant ``hp_metric = -1`` by the last ``val/all/mean@k`` of ``fit``, logged
            with the run's hyperparameters (HPARAMS tab). False: no ``hp_metric`` at all.
    """

    def __init__(self, layout: bool = True, hp_metric: bool = True):
        self.layout, self.hp_metric = layout, hp_metric
        self.written_layout: Optional[dict] = None
        self.final_val: Optional[float] = None
        self.tags: set[str] = set()

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # Trainer._log_hyperparams runs after setup / on_fit_start: without this it logs hp_metric = -1
        for lg in _tensorboard_loggers(trainer):
            lg._default_hp_metric = False
        self.written_layout, self.final_val, self.tags = None, None, set()
        # before Trainer._log_hyperparams merges the module's hyperparameters and writes hparams.yaml
        sources = run_sources(trainer, pl_module)
        if sources:
            for lg in trainer.loggers:
                lg.log_hyperparams({"sources": sources})

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        sources = run_sources(trainer, pl_module)
        if sources:  # a new dict: the module's own hparams stay as they are
            checkpoint["hyper_parameters"] = {**(checkpoint.get("hyper_parameters") or {}), "sources": sources}

    def _write_layout(self, trainer: L.Trainer, pl_module, predict_eval: bool = True) -> None:
        """(Re)write the layout when the tags seen so far give a different one than the last written.
        ``predict_eval``: add the validation tags the module will log (before the first validation has run)."""
        from rlad_pl.training.validate import ValidateAtStart

        tags = set(self.tags)
        for cb in trainer.callbacks:  # ValidateAtStart logs straight to the loggers
            if isinstance(cb, ValidateAtStart):
                tags |= set(cb.metrics)
        if predict_eval and self._validates(trainer):
            tags |= set(expected_eval_tags(pl_module))
        layout = overview_layout(tags)
        if layout != self.written_layout:
            self.written_layout = layout
            for lg in _tensorboard_loggers(trainer):
                lg.experiment.add_custom_scalars(layout)

    def _validates(self, trainer: L.Trainer) -> bool:
        from rlad_pl.training.validate import ValidateAtStart

        at_start = any(isinstance(cb, ValidateAtStart) and cb.enabled for cb in trainer.callbacks)
        return at_start or bool(trainer.limit_val_batches)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.layout or not trainer.is_global_zero:
            return
        self.tags |= set(trainer.callback_metrics) | set(trainer.logged_metrics)
        if self.written_layout is None:
            self._write_layout(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.tags |= set(trainer.callback_metrics)
        if self.layout and trainer.is_global_zero and self.written_layout is not None:
            self._write_layout(trainer, pl_module)
        value = _all_mean_at_k(trainer.callback_metrics)
        if value is not None:
            self.final_val = value

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.layout and trainer.is_global_zero and self.written_layout is not None:
            # tags that first appeared after step 1 (e.g. sync/*); validation charts only if validation ran
            self._write_layout(trainer, pl_module, predict_eval=False)
        if not self.hp_metric:
            return
        value = self.final_val
        if value is None:  # only the step-0 validation ran (it logs outside trainer.callback_metrics)
            from rlad_pl.training.validate import ValidateAtStart

            for cb in trainer.callbacks:
                if isinstance(cb, ValidateAtStart) and cb.metrics:
                    value = _all_mean_at_k(cb.metrics)
        if value is None:
            return
        params = run_hyperparameters(trainer, pl_module)
        for lg in _tensorboard_loggers(trainer):
            saved = copy.deepcopy(lg.hparams)  # keep hparams.yaml as Lightning wrote it (the module's init arguments)
            lg.log_hyperparams(params, {"hp_metric": value}, step=trainer.global_step)
            lg.hparams = saved


def _all_mean_at_k(metrics: dict) -> Optional[float]:
    for k, v in metrics.items():
        if re.fullmatch(r"val/all/mean@\d+", k):
            return float(v)
    return None
