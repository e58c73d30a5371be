"""The ``Objective`` API and loss aggregation (docs/methods/index.md).

An objective is chosen in YAML by ``class_path``. It declares, as attributes read once at setup
(``rlad_pl.objectives.plan``):

* ``inputs``: what its loss needs, computed for it and nothing else (``ADVANTAGES``, ``OLD_LOGPROBS``,
  ``TEACHER_LOGPROBS``, ``STUDENT_HIDDEN``, ``TEACHER_TOPK`` ...);
* ``responses``: where the responses it trains on come from: ``"student"`` (on-policy rollouts, the default),
  ``"teacher"`` (sampled from the frozen teacher) or ``"dataset"`` (the task's reference solutions);
* ``teacher_prompt``: what the teacher conditions on: ``"same"`` prompt as the student, or ``"privileged"`` (OPSD).

and maps a micro-batch plus the student's outputs to ``LossOutput(loss, metrics)``. The math lives in pure tensor
functions that tests call without a model. Objectives written against the older single ``requires`` set (inputs and
``teacher_prefixes`` / ``dataset_prefixes`` / ``privileged_prompt`` markers mixed) keep working: the set is split into
the two parts once, at setup.

Aggregation (per-token loss l, mask m, sequences i of the whole optimizer step, over every micro-batch and rank):

    token_mean               sum_{i,t} m l / sum_{i,t} m
    seq_mean_token_mean      (1/N_seq) sum_i ( sum_t m l / sum_t m )
    seq_mean_token_sum_norm  sum_{i,t} m l / (N_seq * L_max)            (Dr. GRPO, L_max a constant)

Each micro-batch returns its share of the step's loss (a partial sum divided by the step-wide denominator), so the
gradient does not depend on how the step is split into micro-batches or ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch
from torch import Tensor

from rlad_pl.core.batch import RolloutBatch
from rlad_pl.core.errors import ConfigError
from rlad_pl.objectives.off_policy import (
    KINDS,
    Correction,
    OffPolicy,
    OffPolicySetting,
    off_policy_weights,
    parse_off_policy,
)

AggMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")

# names an objective can put in ``inputs`` (what its loss needs)
ADVANTAGES = "advantages"  # group-normalized advantages (needs group_size >= 2)
OLD_LOGPROBS = "old_logprobs"  # pi_old at sampled tokens, computed before the first update
REF_LOGPROBS = "ref_logprobs"  # frozen reference (initial student) at sampled tokens
TEACHER_LOGPROBS = "teacher_logprobs"  # frozen teacher at sampled tokens
ENTROPY = "entropy"  # student token entropy, with gradient
STUDENT_HIDDEN = "student_hidden"  # student final hidden states [N, R, H] (full-vocabulary losses)
TEACHER_HIDDEN = "teacher_hidden"  # teacher final hidden states [N, R, H] (full-vocabulary losses)
TEACHER_TOPK = "teacher_topk"  # teacher top-k ids / log-probs + tail per position (rlad_pl.core.topk.TeacherTopK)
SAMPLER_LOGPROBS = "sampler_logprobs"  # log-probs reported by the inference engine (TIS correction); implies old
KNOWN_INPUTS = frozenset({ADVANTAGES, OLD_LOGPROBS, REF_LOGPROBS, TEACHER_LOGPROBS, ENTROPY, STUDENT_HIDDEN,
                          TEACHER_HIDDEN, TEACHER_TOPK, SAMPLER_LOGPROBS})
#: the inputs only a teacher can give
TEACHER_INPUT_NAMES = frozenset({TEACHER_LOGPROBS, TEACHER_HIDDEN, TEACHER_TOPK})

ResponseSource = Literal["student", "teacher", "dataset"]
TeacherPrompt = Literal["same", "privileged"]
RESPONSE_SOURCES = ("student", "teacher", "dataset")
TEACHER_PROMPTS = ("same", "privileged")

# the older API's markers for where responses come from, accepted in a ``requires`` set and split off at setup
TEACHER_PREFIXES = "teacher_prefixes"  # = responses "teacher"
PRIVILEGED_PROMPT = "privileged_prompt"  # = teacher_prompt "privileged"
DATASET_PREFIXES = "dataset_prefixes"  # = responses "dataset"
SOURCE_MARKERS = frozenset({TEACHER_PREFIXES, PRIVILEGED_PROMPT, DATASET_PREFIXES})
KNOWN_REQUIREMENTS = KNOWN_INPUTS | SOURCE_MARKERS


@dataclass
class Denominators:
    """Counts over the whole optimizer step (all micro-batches, all ranks)."""

    num_tokens: float
    num_sequences: float
    max_response_len: float

    @classmethod
    def of(cls, mask: Tensor, max_response_len: Optional[float] = None) -> Denominators:
        """Denominators of a single batch (used when a step has one micro-batch, and in tests)."""
        return cls(float(mask.sum()), float(mask.shape[0]),
                   float(mask.shape[1] if max_response_len is None else max_response_len))


def aggregate(values: Tensor, mask: Tensor, mode: AggMode, denom: Denominators) -> Tensor:
    """This micro-batch's share of the step-aggregated loss (see module docstring)."""
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / max(denom.num_tokens, 1.0)
    if mode == "seq_mean_token_mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
        return per_seq.sum() / max(denom.num_sequences, 1.0)
    if mode == "seq_mean_token_sum_norm":
        return (values * mask).sum() / max(denom.num_sequences * denom.max_response_len, 1.0)
    raise ValueError(f"loss_agg: unknown aggregation '{mode}' (expected token_mean, seq_mean_token_mean or "
                     "seq_mean_token_sum_norm)")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Token mean for metrics (no gradient)."""
    mask = mask.to(values.dtype)
    return ((values * mask).sum() / mask.sum().clamp_min(1.0)).detach()


def per_sample_token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``L_i = sum_t m_it v_it / max(sum_t m_it, 1)`` -> ``[N]`` (keeps the graph; 0 for an empty response)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


#: replaces NaN / -inf sampled-token log-probs of frozen models (same value as the module's floor)
LOGPROB_FLOOR = -20.0


def sanitize_logprobs(logp: Tensor, floor: float = LOGPROB_FLOOR) -> Tensor:
    """Detached log-probs with NaN / +-inf replaced by ``floor`` (+inf: 0) and values clamped to ``[floor, 0]``."""
    logp = logp.detach()
    return torch.nan_to_num(logp, nan=floor, posinf=0.0, neginf=floor).clamp(floor, 0.0)


def old_logprobs_of(batch: RolloutBatch, logp: Tensor) -> Tensor:
    """pi_old: the stored snapshot (non-finite entries replaced by the current value, i.e. ratio 1), or (one update
    per rollout batch) the detached current log-probs."""
    if batch.old_logprobs is None:
        return logp.detach()
    old = batch.old_logprobs.detach()
    return torch.where(torch.isfinite(old), old, logp.detach())


@dataclass
class StudentOutputs:
    """What the module computed for the student on one micro-batch (fields not required are ``None``)."""

    logprobs: Tensor  # [N, R] with gradient
    entropy: Optional[Tensor] = None  # [N, R]
    hidden: Optional[Tensor] = None  # [N, R, H]
    lm_head: Optional[torch.nn.Module] = None
    teacher_hidden: Optional[Tensor] = None  # [N, R, H_T], no gradient
    teacher_lm_head: Optional[torch.nn.Module] = None
    teacher_topk: Optional[object] = None  # rlad_pl.core.topk.TeacherTopK (requires teacher_topk)
    vocab_size: Optional[int] = None  # shared tokenizer range for full-vocabulary losses
    temperature: float = 1.0
    step: int = 0  # optimizer steps taken so far (for coefficient schedules)


@dataclass
class LossOutput:
    loss: Tensor  # scalar, this micro-batch's share of the step loss
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective:
    """Base class. Subclasses declare ``inputs`` / ``responses`` / ``teacher_prompt`` and implement ``compute``.

    ``weight`` scales the loss when several objectives are combined; ``name`` prefixes the metrics (default: the
    lower-cased class name). ``loss_agg`` is filled in by the module from its own ``loss_agg`` unless set here.
    A subclass may set these attributes in ``__init__`` from its arguments (e.g. ``teacher_top_k`` changes
    ``inputs``); they are read once, when the objectives are planned, and never recomputed.
    """

    #: what the loss needs (names above); only these are computed
    inputs: frozenset[str] = frozenset()
    #: where the responses it trains on come from
    responses: ResponseSource = "student"
    #: what the teacher conditions on: the student's prompt, or the task's privileged prompt (OPSD)
    teacher_prompt: TeacherPrompt = "same"
    #: needs groups of >= 2 responses per prompt (group-normalized advantages)
    needs_groups: ClassVar[bool] = False
    #: needs a teacher model (also implied by teacher inputs, teacher responses or a privileged teacher prompt)
    needs_teacher: ClassVar[bool] = False
    #: the off-policy correction ``off_policy: auto`` uses in an asynchronous run (``rlad_pl.objectives.off_policy``)
    declared_off_policy: ClassVar[str] = "none"
    #: the corrections that mean something for this loss (others are refused in one line)
    off_policy_kinds: ClassVar[tuple[str, ...]] = KINDS
    #: the correction in force (set by ``resolve_off_policy`` at setup; none until then)
    off_policy: OffPolicy = OffPolicy()
    off_policy_setting: Optional[OffPolicy] = None

    @property
    def requires(self) -> frozenset[str]:
        """The older single set: ``inputs`` plus a marker for a non-default response source / teacher prompt."""
        markers = {"teacher": {TEACHER_PREFIXES}, "dataset": {DATASET_PREFIXES}}.get(self.responses, set())
        if self.teacher_prompt == "privileged":
            markers = markers | {PRIVILEGED_PROMPT}
        return frozenset(self.inputs) | markers

    @requires.setter
    def requires(self, value) -> None:
        """``self.requires = ...`` in an objective written against the older API: split into the two parts."""
        value = frozenset(value)
        self.inputs = value - SOURCE_MARKERS
        if TEACHER_PREFIXES in value:
            self.responses = "teacher"
        elif DATASET_PREFIXES in value:
            self.responses = "dataset"
        if PRIVILEGED_PROMPT in value:
            self.teacher_prompt = "privileged"

    def __init__(self, weight: float = 1.0, name: Optional[str] = None, loss_agg: Optional[AggMode] = None,
                 off_policy: OffPolicySetting = "auto"):
        from rlad_pl.core.validation import check_choice, check_float

        self.name = name or type(self).__name__.lower()
        if not isinstance(self.name, str) or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{type(self).__name__.lower()}.name", f"expected a metric prefix of letters, digits, "
                              f"'_' or '-', got {name!r}")
        # NaN would skip every update, a negative weight would climb the loss
        self.weight = check_float(f"{self.name}.weight", weight, low=0.0)
        if loss_agg is not None:  # checked here, not at the first step
            check_choice(f"{self.name}.loss_agg", loss_agg, AGG_MODES)
        self.loss_agg = loss_agg
        self.off_policy_setting = parse_off_policy(f"{self.name}.off_policy", off_policy)
        if self.off_policy_setting is not None:  # checked against the loss at setup (``resolve_off_policy``)
            self.off_policy = self.off_policy_setting

    def resolve_off_policy(self, asynchronous: bool) -> OffPolicy:
        """Fix the correction in force: the one named in YAML, else (``auto``) the declared one when the run is
        asynchronous and none when it is not. A correction this loss cannot use is one line."""
        spec = self.off_policy_setting or OffPolicy(self.declared_off_policy if asynchronous else "none")
        kinds = self.off_policy_kinds if self.responses == "student" else ("none",)
        if spec.kind not in kinds:
            why = ("its responses do not come from the student, so they never go stale" if self.responses != "student"
                   else "see docs/async.md")
            raise ConfigError(f"{self.name}.off_policy", f"{type(self).__name__} takes {', '.join(kinds)}, got "
                              f"{spec.kind!r} ({why})")
        self.off_policy = spec
        return spec

    def off_policy_correction(self, batch: RolloutBatch, logp: Tensor) -> Correction:
        """This micro-batch's weights from the correction in force (``weights`` None: no correction)."""
        if not self.off_policy.active:
            return Correction(None, {})
        if batch.sampler_logprobs is None:
            raise ConfigError(f"{self.name}.off_policy", f"the {self.off_policy.kind} correction needs the sampler's "
                              "log-probs, and this sampler reports none (ServerSampler and VLLMSampler do)")
        return off_policy_weights(self.off_policy, old_logprobs_of(batch, logp), batch.sampler_logprobs,
                                  batch.response_mask)

    def compute(self, batch: RolloutBatch, out: StudentOutputs, denom: Denominators) -> LossOutput:
        raise NotImplementedError

    def aggregate(self, values: Tensor, mask: Tensor, denom: Denominators) -> Tensor:
        return aggregate(values, mask, self.loss_agg or "token_mean", denom)

    def state_dict(self) -> dict:
        """State that changes during training (saved in checkpoints, restored on resume); stateless: ``{}``."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight}, loss_agg={self.loss_agg})"


class TokenObjective(Objective):
    """An objective defined by a per-token loss ``v_it``: ``loss = agg(v, response_mask)`` (``self.aggregate``).

    Subclasses implement ``per_token(batch, out) -> (values [N, R], metrics)``; wrappers that reweight whole samples
    (``ReNIO``) call ``per_token`` directly. Values at masked positions are ignored but must be finite.
    """

    def per_token(self, batch: RolloutBatch, out: StudentOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    #: ``per_token`` applies the off-policy correction itself (GRPO: to the surrogate only)
    corrects_in_per_token: ClassVar[bool] = False

    def corrected_per_token(self, batch: RolloutBatch, out: StudentOutputs) -> tuple[Tensor, dict[str, Tensor]]:
        """``per_token`` with the off-policy weights in force applied (``w_t v_t``)."""
        values, metrics = self.per_token(batch, out)
        if not self.corrects_in_per_token:
            corr = self.off_policy_correction(batch, out.logprobs)
            if corr.weights is not None:
                values = values * corr.weights.to(values.dtype)
            metrics.update(corr.metrics)
        return values, metrics

    def compute(self, batch: RolloutBatch, out: StudentOutputs, denom: Denominators) -> LossOutput:
        values, metrics = self.corrected_per_token(batch, out)
        return LossOutput(self.aggregate(values, batch.response_mask, denom), metrics)
