"""``DistillationModule``: the trainable student, an optional frozen teacher (and reference), and the objectives.

The module computes only the inputs the objectives' plan declares (``rlad_pl.objectives.plan``). Optimization is
manual so that the loss denominators can span the whole optimizer step: every micro-batch contributes
``sum(loss terms) / step_denominator`` and its backward is scaled by the world size, which cancels the gradient
averaging of DDP / FSDP. The result does not depend on how a step is split into micro-batches or ranks.
"""

from __future__ import annotations

import math
import sys
import time
from collections import defaultdict
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch, StepBatch
from rlad_pl.core.metrics import MeanPassAtK
from rlad_pl.core.topk import check_top_k_vocab
from rlad_pl.models.compiled import check_compile
from rlad_pl.objectives.base import (
    AggMode,
    Denominators,
    Objective,
    StudentOutputs,
)
from rlad_pl.objectives.plan import check_objectives, plan_objectives
from rlad_pl.pipeline import Annotator, Policy, RolloutSettings
from rlad_pl.teacher import TeacherScorer
from rlad_pl.teacher.routes import TeacherConfig
from rlad_pl.training.checkpointing import defer_sigint
from rlad_pl.training.hooks import EvaluationHooks
from rlad_pl.training.link import RolloutLink
from rlad_pl.training.loss import student_outputs
from rlad_pl.training.models import load_models, load_routes, routed_scorer, routed_teachers, shard_models
from rlad_pl.training.module_checks import check_optimizer, check_rollout_settings, check_settings
from rlad_pl.training.state import STATE_KEY, drop_frozen_keys, load_training_state, training_state
from rlad_pl.training.step_guard import StepGuard


def _default_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)


class DistillationModule(EvaluationHooks, L.LightningModule):
    """Student + frozen teacher + objectives: the models, the loss and the optimization.

    It never reads the data module: ``RolloutLink`` hands it the rollout settings (``configure_rollouts``) and
    gives the pipeline its models (``policy``); the steps arrive as ``StepBatch``es carrying their statistics.

    Args (details: docs/configuration.md):
        student: the trainable student: a local ``save_pretrained`` folder or a hub id ``org/name[@revision]``.
        objectives: one or more ``Objective`` instances (``class_path`` / ``init_args``), summed with their weights.
        teacher: the frozen teacher (folder or hub id); loaded only when an objective needs it.
        tokenizer: tokenizer folder or hub id (default: the student's, from the same snapshot).
        teacher_tokenizer: the teacher's tokenizer (default: the teacher's). Another tokenizer than the student's
            is scored on re-tokenized text (sampled-token objectives; docs/methods/cross_tokenizer.md).
        student_revision, teacher_revision, tokenizer_revision: hub revision (branch, tag or commit) of a hub id.
        cache_dir: Hugging Face cache folder (default: ``HF_HUB_CACHE`` / ``$HF_HOME/hub``).
        trust_remote_code: allow a hub model's own Python code (``auto_map``) to run. Off by default.
        loss_agg: default aggregation for objectives that do not set their own.
        optimizer: optimizer factory, e.g. ``{class_path: torch.optim.AdamW, init_args: {lr: 1e-6}}``.
        lr_scheduler: optional scheduler factory, stepped once per optimizer step.
        grad_clip: max global gradient norm (None: no clipping).
        temperature: logits are divided by this before every log-prob and full-vocabulary distribution (student,
            old policy, reference, teacher). Default (None): ``data.sampling.temperature`` (1.0 if it is 0).
        logprob_chunk_size: sequence positions per LM-head chunk.
        annotate_batch_size: sequences per no-grad forward when computing old / reference / teacher log-probs.
        dtype: student weights dtype; ``teacher_dtype`` defaults to it.
        gradient_checkpointing: recompute transformer blocks in backward.
        log_entropy: log the student token entropy (computed in the same chunked pass).
        log_sampler_mismatch: when the sampler reports log-probs (vLLM), log the train / inference mismatch.
        fsdp_mixed_precision: under ``ModelParallelStrategy`` (FSDP2), compute in ``bf16`` / ``fp16`` with fp32
            gradient reduction and master weights. None: the parameters' dtype.
        max_consecutive_skipped_steps: a step with a non-finite loss or gradient is skipped (weights untouched,
            ``nonfinite/steps_skipped``); this many in a row stop the run with one line.
        lora: PEFT ``LoraConfig`` fields to train a LoRA student (``rlad_pl.models.lora``). None: full fine-tuning.
        teacher_backend: how the teacher scores rollouts (``rlad_pl.teacher``): ``LocalTeacher`` (default),
            ``VLLMTeacher`` or ``ServerTeacher``.
        compile: ``torch.compile`` the training backbones (``rlad_pl.models.compiled``); ~1e-5 from eager.
        teachers: named teachers instead of ``teacher`` (``rlad_pl.teacher.routes.TeacherConfig`` each: ``model``,
            ``tokenizer``, ``revision``, ``dtype``, ``backend``, ``prompt_format``); the task routes each problem to
            one (``Problem.teacher``); only routed teachers load; several: sampled-token objectives, top-k ones.
        default_teacher: the teacher of problems that name none (default: the only one).
    """

    def __init__(self, student: str, objectives: list[Objective], teacher: Optional[str] = None,
                 tokenizer: Optional[str] = None, teacher_tokenizer: Optional[str] = None,
                 loss_agg: AggMode = "seq_mean_token_mean", optimizer: OptimizerCallable = _default_optimizer,
                 lr_scheduler: Optional[LRSchedulerCallable] = None, grad_clip: Optional[float] = 1.0,
                 temperature: Optional[float] = None, logprob_chunk_size: int = 256, annotate_batch_size: int = 32,
                 dtype: str = "float32", teacher_dtype: Optional[str] = None, gradient_checkpointing: bool = False,
                 log_entropy: bool = True, log_sampler_mismatch: bool = True,
                 fsdp_mixed_precision: Optional[str] = None, student_revision: Optional[str] = None,
                 teacher_revision: Optional[str] = None, tokenizer_revision: Optional[str] = None,
                 cache_dir: Optional[str] = None, trust_remote_code: bool = False,
                 max_consecutive_skipped_steps: int = 5, lora: Optional[dict[str, Any]] = None,
                 teacher_backend: Optional[TeacherScorer] = None, compile: bool = False,
                 teachers: Optional[dict[str, TeacherConfig]] = None, default_teacher: Optional[str] = None):
        super().__init__()
        self.save_hyperparameters(ignore=["objectives", "optimizer", "lr_scheduler", "teacher_backend"])
        self.automatic_optimization = False
        self.step_guard = StepGuard(max_consecutive_skipped_steps)
        self.strict_loading = False  # frozen teacher / reference weights are not saved in checkpoints
        self.objectives = check_objectives(objectives, loss_agg)
        self.plan = plan_objectives(self.objectives)  # what to compute and where responses come from, once
        check_settings(grad_clip, temperature, logprob_chunk_size, annotate_batch_size, fsdp_mixed_precision)
        check_optimizer(optimizer, lr_scheduler)  # the factories run only in configure_optimizers: probe them now
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.grad_clip, self.temperature = grad_clip, temperature if temperature is not None else 1.0
        self._temperature_from_data = temperature is None
        self.chunk_size, self.annotate_batch_size = logprob_chunk_size, annotate_batch_size
        self.log_entropy, self.log_sampler_mismatch = log_entropy, log_sampler_mismatch
        m = load_models(self.plan, student=student, teacher=teacher, tokenizer=tokenizer,
                        teacher_tokenizer=teacher_tokenizer, student_revision=student_revision,
                        teacher_revision=teacher_revision, tokenizer_revision=tokenizer_revision, cache_dir=cache_dir,
                        trust_remote_code=trust_remote_code, dtype=dtype, teacher_dtype=teacher_dtype, lora=lora,
                        gradient_checkpointing=gradient_checkpointing, compile=compile,
                        teacher_backend=teacher_backend, teachers=teachers)
        self.tokenizer, self.student, self.lora = m.tokenizer, m.student, m.lora
        self.teacher_backend, self.teacher, self.reference = m.teacher_backend, m.teacher, m.reference
        self.model_tags, self.vocab_size = m.tags, m.vocab_size
        self.routes, self.default_teacher, self._student_source = m.routes, default_teacher, m.student_source
        self._named, self.loss_teacher = bool(teachers), m.teacher_backend  # named: RoutedTeachers (_load_routes)
        self.teachers = torch.nn.ModuleDict()  # the routed teachers' models that run in the trainer
        self.compiled = bool(compile)  # (not ``self.compile``: that is nn.Module.compile)
        check_top_k_vocab(self.objectives, self.vocab_size)  # teacher_top_k <= the shared vocabulary
        self.counters: dict[str, float] = defaultdict(float)
        self.val_metric: Optional[MeanPassAtK] = None  # set by configure_rollouts when the task has buckets
        self.fsdp_mixed_precision = fsdp_mixed_precision
        # checkpoints hold the student only (also sharded checkpoints, whose keys come from ``state_dict()``)
        self.register_state_dict_post_hook(drop_frozen_keys)
        if self.lora is not None:  # ... and of a LoRA student only the trainable (adapter) tensors
            from rlad_pl.models.lora import drop_frozen_student_keys

            self.register_state_dict_post_hook(drop_frozen_student_keys)

    # ------------------------------------------------------------------------------------------ the link
    def configure_rollouts(self, settings: RolloutSettings, pass_k: list[int], buckets: Optional[list[str]],
                           teacher_keys=None) -> None:
        """The data side's settings, handed over once before ``setup`` (``RolloutLink``): group objectives are
        checked against the group size and sampling, ``model.temperature`` defaults to the sampling temperature,
        and the validation metric covers the task's difficulty buckets."""
        check_rollout_settings(self.plan, self.objectives, settings)
        if self._temperature_from_data and settings.sampling.temperature > 0:
            self.temperature = float(settings.sampling.temperature)
        if buckets is not None:
            self.val_metric = MeanPassAtK(settings.val_k, pass_k, buckets)
        if self._named:  # named teachers: load those problems route to
            self._load_routes(routed_teachers(self.routes, teacher_keys, self.default_teacher, "data.task"))

    def _load_routes(self, names) -> None:
        self._routed, self.loss_teacher = list(names), routed_scorer(self.routes, names)
        for model in load_routes(self.routes, names, student_source=self._student_source,
                                 student_dtype=self.hparams.dtype, lora=self.lora, vocab_size=self.vocab_size):
            self.teachers[str(len(self.teachers))] = model

    def annotator(self) -> Annotator:
        """The frozen-model passes over a fresh rollout batch, with this module's models and settings."""
        if self._named and not hasattr(self, "_routed"):  # not linked: every named teacher
            self._load_routes(list(self.routes))
        routes = None if self.routes is None else {n: self.routes[n] for n in getattr(self, "_routed", self.routes)}
        return Annotator(self.student, self.plan.inputs, teacher=self.teacher_backend, routes=routes,
                         reference=self.reference, temperature=self.temperature, chunk_size=self.chunk_size,
                         vocab_size=self.vocab_size, batch_size=self.annotate_batch_size,
                         log_sampler_mismatch=self.log_sampler_mismatch)

    def policy(self) -> Policy:
        """What the rollout pipeline samples from and scores with."""
        ann = self.annotator()
        return Policy(self.student, self.tokenizer, ann, self.plan, teacher=self.teacher,
                      teacher_tag=self.model_tags["teacher"], teacher_names=list(ann.routes) if self._named else None,
                      default_teacher=self.default_teacher,
                      needs_prompt_texts=any(r.cross for r in (ann.routes or {}).values()))

    def configure_callbacks(self):
        return [RolloutLink()]

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2-shard student, teacher and reference (``shard_models``)."""
        if self.device_mesh is not None:
            shard_models((self.student, self.teacher, self.reference, *self.teachers.values()), self.device_mesh,
                         self.fsdp_mixed_precision)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if self.compiled and self._trainer is not None:
            check_compile(self.trainer.strategy.root_device, type(self.trainer.strategy).__name__)

    def teardown(self, stage: str) -> None:
        for scorer in {id(b): b for b in [self.teacher_backend] + [r.scorer for r in (self.routes or {}).values()]
                       if b is not None}.values():
            scorer.close()  # an engine-backed teacher frees its engine (a later scoring restarts it)

    def configure_optimizers(self):
        opt = self.optimizer_factory([p for p in self.student.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        drop_frozen_keys(self, checkpoint.get("state_dict", {}))
        checkpoint[STATE_KEY] = training_state(self.counters, self.step_guard, self.objectives)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get(STATE_KEY) is not None:
            load_training_state(checkpoint[STATE_KEY], self.counters, self.step_guard, self.objectives)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in (self.teacher, self.reference, *self.teachers.values()):  # frozen models stay in eval mode
            if isinstance(m, torch.nn.Module):  # (a LoRA base view runs in eval mode by itself)
                m.eval()
        return self

    # ------------------------------------------------------------------------------------------ the loss
    def student_outputs(self, batch: RolloutBatch) -> StudentOutputs:
        return student_outputs(self.student, batch, plan=self.plan, teacher=self.loss_teacher,
                               temperature=self.temperature, chunk_size=self.chunk_size, vocab_size=self.vocab_size,
                               log_entropy=self.log_entropy, step=self.global_step if self._trainer is not None else 0)

    def compute_loss(self, batch: RolloutBatch, denom: Denominators) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Weighted sum of the objectives on one micro-batch -> (loss, metrics, student log-probs)."""
        out = self.student_outputs(batch)
        total = out.logprobs.new_zeros(())
        metrics: dict[str, Tensor] = {}
        for obj in self.objectives:
            res = obj.compute(batch, out, denom)
            total = total + obj.weight * res.loss
            metrics[f"{obj.name}/loss"] = res.loss.detach()
            metrics.update({f"{obj.name}/{k}": v.detach() for k, v in res.metrics.items()})
        if out.entropy is not None:
            m = batch.response_mask
            metrics["train/entropy"] = ((out.entropy.detach() * m).sum() / m.sum().clamp_min(1)).detach()
        return total, metrics, out.logprobs

    # ------------------------------------------------------------------------------------------ training
    def step_denominators(self, step: StepBatch) -> Denominators:
        local = torch.tensor([step.num_tokens, float(step.num_sequences)], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            local = self.trainer.strategy.reduce(local, reduce_op="sum")
        max_len = float(step.max_response_len if step.max_response_len is not None else
                        max(mb.response_len for mb in step.micro_batches))
        return Denominators(num_tokens=float(local[0]), num_sequences=float(local[1]), max_response_len=max_len)

    def training_step(self, step: StepBatch, batch_idx: int):
        t0 = time.perf_counter()
        for k in [k for k in (step.stats or {}) if k.startswith("nonfinite/")]:  # counted by the annotator
            self.counters[k] += step.stats.pop(k)
        opt = self.optimizers()
        denom = self.step_denominators(step)
        opt.zero_grad(set_to_none=True)
        scale = float(self.trainer.world_size)
        loss_sum = torch.zeros((), device=self.device)
        sums: dict[str, list[Tensor]] = defaultdict(list)
        bad_micro_batches = 0
        for mb in step.micro_batches:
            loss, metrics, logp = self.compute_loss(mb, denom)
            if not torch.isfinite(loss):
                self.counters["nonfinite/loss"] += 1
                bad_micro_batches += 1
                loss = (logp * 0.0).sum()  # keep every rank in the backward collective, contribute nothing
            self.manual_backward(loss * scale)
            loss_sum += loss.detach()
            for k, v in metrics.items():
                sums[k].append(v.float())
        params = [p for p in self.student.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip else math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        bad = torch.tensor(float(bad_micro_batches), device=self.device)
        if self.trainer.world_size > 1:  # every rank takes the same decision
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bool(bad == 0) and bool(torch.isfinite(grad_norm)):
            with defer_sigint():  # Ctrl-C never lands between the parameter and optimizer-state updates
                opt.step()
                sched = self.lr_schedulers()
                if sched is not None:
                    sched.step()
            self.step_guard.step_taken()
        else:
            epoch = self.trainer.current_epoch if self._trainer is not None else 0
            warning = self.step_guard.skip(self.counters, int(bad), len(step.micro_batches), epoch)
            if warning and self.global_rank == 0:
                print(warning, file=sys.stderr)
            opt.zero_grad(set_to_none=True)
        # a micro-batch loss is a partial sum over step-wide denominators: the step's loss is their sum
        logs = {k: torch.stack(v).sum() if k.endswith("/loss") else torch.stack(v).mean() for k, v in sums.items()}
        logs.update({"train/loss": loss_sum, "train/grad_norm": grad_norm.detach().float(),
                     "train/lr": torch.tensor(opt.param_groups[0]["lr"]),
                     "train/tokens": torch.tensor(denom.num_tokens),
                     "timing/train_step": torch.tensor(time.perf_counter() - t0)})
        logs.update({k: torch.tensor(v) for k, v in self.counters.items()})
        self._log_train(logs, step)
        return loss_sum
