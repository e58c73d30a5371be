"""GPU check: bf16 FSDP2 training throughput and memory, the LoRA student, and an end-to-end CLI fit, in one JSON file.

    bash tools/gpu_check.sh                      # one GPU: ~0.6B Qwen3-shaped model, ~2-3 min, < 10 min worst case
    bash tools/gpu_check.sh --cpu --tiny         # CPU smoke mode: the same code paths on a tiny shape, < 60 s

``tools/gpu_check.sh`` installs missing pure-Python runtime dependencies from ``.gpu_wheels/`` first
(``tools/fetch_gpu_wheels.sh``); it needs no network and no vLLM. Results go to ``$OUT/gpu_check.json`` when ``OUT``
is set (the device machine's output folder), else ``runs/gpu_check/gpu_check.json`` (``--out`` overrides), with the
phases' output in ``gpu_check.log`` beside it. Each phase runs in its own subprocess under a timeout, and the JSON
is rewritten after each, so a phase that fails, runs out of memory or hangs costs only itself.

Phases (model: a random-init ``Qwen3ForCausalLM`` built locally from a ``Qwen3Config`` with Qwen3-0.6B's shape:
hidden 1,024, 28 layers, 16 query / 8 KV heads of 128, MLP 3,072, tied 151,936-token vocabulary, 0.60B parameters):

1. ``train``: full fine-tuning under Lightning's ``ModelParallelStrategy`` (FSDP2 via ``rlad_pl.models.distributed``, bf16
   compute with fp32 master weights: ``MixedPrecisionPolicy``), gradient checkpointing, token NLL of the response
   positions of fixed random sequences. Steps alternate between the chunked LM head (``rlad_pl.core.logprobs``, as the
   module runs it) and an unchunked one (the ``[B, R, 151936]`` logits at once), so both are measured side by side
   on the same weights: tokens per second and peak ``torch.cuda.max_memory_allocated`` per step, warm-up excluded,
   and the largest log-prob difference of the two heads on the first batch.
2. ``lora``: the LoRA student (``rlad_pl.models.lora.apply_lora``, r 64 / alpha 128 on every projection) on the bf16 base
   under the same strategy: the adapters must stay fp32 and the base bf16 (checked on the sharded parameters before
   and after training), the optimizer sees only adapters, first- and last-layer adapters get gradients (gradient
   checkpointing), the loss on a fixed batch decreases; peak memory against phase 1's full fine-tuning.
3. ``fit``: ``python -m rlad_pl fit`` through the real CLI (its entry point ``rlad_pl.cli.main``, called in the
   phase's process) on ``configs/trrd_tiny.yaml`` with overrides: TRRD with the Hugging Face sampler on the GPU,
   student and teacher the phase's model saved in bf16 with a local word-level tokenizer of exactly 151,936 ids,
   ``ModelParallelStrategy``, bf16, gradient checkpointing, 2 rollout batches and a validation; checks that it
   finishes and that ``hf_export`` holds a model ``transformers`` loads with the same parameter count.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the repository itself, not an installed rlad_pl (the device machine has none)
    sys.path.insert(0, str(REPO))
PHASES = ("train", "lora", "fit")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Qwen3Config fields of the model each shape builds
SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151_936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, vocab_size=2048),
}


@dataclasses.dataclass
class Settings:
    """Everything a phase needs (passed to the phase subprocess as JSON)."""

    device: str  # "cuda" or "cpu"
    shape: str  # key of SHAPES
    batch: int  # sequences per step
    seq_len: int  # tokens per sequence
    prompt_len: int  # positions 0 .. prompt_len-1 are the prompt; the rest are scored ("response")
    chunk_size: int  # LM-head chunk (positions) of the chunked head
    warmup: int  # steps per LM-head variant excluded from the statistics
    steps: int  # timed steps per LM-head variant
    lr: float  # full fine-tuning AdamW learning rate
    lora_steps: int
    lora_lr: float
    lora_r: int
    lora_alpha: int
    fit_new_tokens: int  # max_new_tokens of the end-to-end fit
    fit_prompts: int  # prompts per rollout batch (x group_size 8)
    step_budget_s: float  # a phase stops stepping after this many seconds of steps (slow devices)
    workdir: str  # scratch folder (models, runs)
    seed: int = 0

    @property
    def arch(self) -> dict[str, int]:
        return SHAPES[self.shape]


def settings_for(cpu: bool, tiny: bool, workdir: str) -> Settings:
    common = dict(device="cpu" if cpu else "cuda", workdir=workdir, lora_r=64, lora_alpha=128)
    if tiny:
        return Settings(shape="tiny", batch=2, seq_len=48, prompt_len=8, chunk_size=16, warmup=1, steps=2, lr=1e-3,
                        lora_steps=4, lora_lr=1e-2, fit_new_tokens=8, fit_prompts=4, step_budget_s=60, **common)
    return Settings(shape="qwen3-0.6b", batch=8, seq_len=2048, prompt_len=256, chunk_size=256, warmup=2, steps=6,
                    lr=1e-5, lora_steps=10, lora_lr=1e-3, fit_new_tokens=32, fit_prompts=8, step_budget_s=120,
                    **common)


# ----------------------------------------------------------------------------------------------------------------
# pieces shared by the phases (run inside the phase subprocess)
# ----------------------------------------------------------------------------------------------------------------

def build_model(s: Settings, dtype):
    """A random-init ``Qwen3ForCausalLM`` of ``s.shape`` (tied embeddings, SDPA attention), built on ``s.device``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**s.arch, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1_000_000.0,
                      rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    torch.manual_seed(s.seed)
    with torch.device(s.device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def param_counts(model) -> dict[str, int]:
    emb = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "params_non_embedding": total - emb}


def fixed_batch(s: Settings):
    """One fixed batch of random token ids (ids 3 .. vocab-1; all positions attended)."""
    import torch

    g = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(3, s.arch["vocab_size"], (s.batch, s.seq_len), generator=g)
    return ids, torch.ones_like(ids)


def peak_gib(s: Settings) -> Optional[float]:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if s.device == "cuda" else None


def local_dtype(p) -> str:
    from rlad_pl.models.distributed import is_dtensor

    return str((p.to_local() if is_dtensor(p) else p).dtype).replace("torch.", "")


def make_module(model, s: Settings, modes: tuple[str, ...], lr: float):
    """A LightningModule that trains ``model`` on the token NLL of the response positions, FSDP2-sharded with the
    bf16 policy in ``configure_model``, alternating the LM-head variants in ``modes`` step by step."""
    import lightning as L
    import torch

    from rlad_pl.models.distributed import fsdp_mesh, mixed_precision_policy, root_call, shard_model
    from rlad_pl.core.logprobs import _head_chunk, chunked_token_logprobs, response_hidden

    class HeadBench(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.losses: dict[str, list[float]] = {m: [] for m in modes}
            self.logprob_diff: Optional[float] = None

        def configure_model(self):
            shard_model(self.model, fsdp_mesh(self.device_mesh), mixed_precision_policy("bf16"))

        def logprobs(self, ids, mask, mode: str):
            # as DistillationModule.student_outputs: backbone under the FSDP2 root hooks, then the head's weight
            hidden = root_call(self.model, response_hidden, self.model, ids, mask, s.prompt_len)
            weight, targets = self.model.get_output_embeddings().weight, ids[:, s.prompt_len:]
            if mode == "chunked":
                return chunked_token_logprobs(hidden, weight, targets, chunk_size=s.chunk_size)[0]
            return _head_chunk(hidden, weight, None, targets, 1.0, False)[0]  # all positions' logits at once

        def training_step(self, batch, batch_idx):
            ids, mask = batch
            if batch_idx == 0 and len(modes) > 1:
                with torch.no_grad():
                    a, b = (self.logprobs(ids, mask, m) for m in modes)
                    self.logprob_diff = float((a - b).abs().max())
            mode = modes[batch_idx % len(modes)]
            loss = -self.logprobs(ids, mask, mode).mean()
            self.losses[mode].append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    return HeadBench()


class StepTimer:
    """Callback factory: per-step seconds and peak memory (device synchronized around each step, peak reset before
    it); stops the run after ``budget_s`` seconds of steps."""

    def __new__(cls, s: Settings, budget_s: float):
        import lightning as L
        import torch

        class _Timer(L.Callback):
            def __init__(self):
                self.seconds: list[float] = []
                self.peaks: list[Optional[float]] = []
                self.resident: list[Optional[float]] = []  # allocated when a step starts (weights, optimizer)
                self.started: Optional[float] = None

            def _sync(self):
                if s.device == "cuda":
                    torch.cuda.synchronize()

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self._sync()
                if s.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                self.resident.append(torch.cuda.memory_allocated() / 2**30 if s.device == "cuda" else None)
                self.t0 = time.perf_counter()
                self.started = self.started or self.t0

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self._sync()
                t1 = time.perf_counter()
                self.seconds.append(t1 - self.t0)
                self.peaks.append(peak_gib(s))
                if t1 - self.started > budget_s:
                    trainer.should_stop = True

        return _Timer()


def make_trainer(s: Settings, steps: int, callbacks: list):
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    return L.Trainer(accelerator="gpu" if s.device == "cuda" else "cpu", devices=1, strategy=ModelParallelStrategy(),
                     precision="32-true", max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=callbacks)


def loader(s: Settings):
    """An endless loader yielding the same fixed batch (loss curves show learning, not data noise)."""
    import torch

    batch = fixed_batch(s)

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield batch

    return torch.utils.data.DataLoader(Repeat(), batch_size=None)


def mode_stats(s: Settings, seconds: list[float], peaks: list, resident: list, losses: list[float]
               ) -> dict[str, Any]:
    """Statistics of one LM-head variant's steps, its first ``s.warmup`` steps excluded from time and memory."""
    timed, timed_peaks = seconds[s.warmup:], [p for p in peaks[s.warmup:] if p is not None]
    med = statistics.median(timed) if timed else None
    tokens = s.batch * s.seq_len
    return {"steps": len(seconds), "timed_steps": len(timed), "step_s_median": med,
            "step_s_all": [round(x, 4) for x in seconds],
            "tokens_per_s": tokens / med if med else None,
            "peak_mem_gib": max(timed_peaks) if timed_peaks else None,
            "resident_mem_gib": resident[-1] if resident else None,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


# ----------------------------------------------------------------------------------------------------------------
# phases
# ----------------------------------------------------------------------------------------------------------------

def phase_train(s: Settings) -> dict[str, Any]:
    import torch

    model = build_model(s, torch.float32)
    counts = param_counts(model)
    model.gradient_checkpointing_enable()
    modes = ("chunked", "unchunked")
    module = make_module(model, s, modes, s.lr)
    timer = StepTimer(s, s.step_budget_s)
    make_trainer(s, len(modes) * (s.warmup + s.steps), [timer]).fit(module, train_dataloaders=loader(s))
    out: dict[str, Any] = {**counts, "strategy": "ModelParallelStrategy (FSDP2, 1 device)",
                           "precision": "bf16 compute, fp32 master weights and gradient reduction",
                           "gradient_checkpointing": True, "batch": s.batch, "seq_len": s.seq_len,
                           "response_len": s.seq_len - s.prompt_len, "vocab_size": s.arch["vocab_size"],
                           "chunk_size": s.chunk_size, "logprob_max_abs_diff": module.logprob_diff,
                           "memory": "torch.cuda.max_memory_allocated per step" if s.device == "cuda" else None}
    for i, mode in enumerate(modes):
        k = len(modes)
        out[mode] = mode_stats(s, timer.seconds[i::k], timer.peaks[i::k], timer.resident[i::k], module.losses[mode])
        tps = out[mode]["tokens_per_s"]
        out[mode]["tflops_6N"] = 6 * counts["params"] * tps / 1e12 if tps else None
    c, u = out["chunked"], out["unchunked"]
    out["speed_ratio_chunked_vs_unchunked"] = (c["tokens_per_s"] / u["tokens_per_s"]
                                               if c["tokens_per_s"] and u["tokens_per_s"] else None)
    out["peak_mem_ratio_chunked_vs_unchunked"] = (c["peak_mem_gib"] / u["peak_mem_gib"]
                                                  if c["peak_mem_gib"] and u["peak_mem_gib"] else None)
    return out


def phase_lora(s: Settings) -> dict[str, Any]:
    import lightning as L
    import torch

    from rlad_pl.models.lora import apply_lora

    model = build_model(s, torch.bfloat16)
    apply_lora(model, {"r": s.lora_r, "alpha": s.lora_alpha, "target_modules": LORA_TARGETS})
    model.gradient_checkpointing_enable()
    module = make_module(model, s, ("chunked",), s.lora_lr)
    n_layers = s.arch["num_hidden_layers"]
    probes = {"first": ".layers.0.", "last": f".layers.{n_layers - 1}."}
    seen: dict[str, Any] = {}

    def dtypes(kind: str) -> list[str]:
        return sorted({local_dtype(p) for n, p in model.named_parameters() if ("lora_" in n) == (kind == "adapter")})

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["adapter_dtypes_before"], seen["base_dtypes_before"] = dtypes("adapter"), dtypes("base")
            opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            named = dict(model.named_parameters())
            seen["optimizer_params_all_adapters"] = all("lora_" in n for n, p in named.items() if id(p) in opt_params)
            seen["optimizer_param_count"] = len(opt_params)
            seen["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if "adapter_grad_norm" in seen:
                return
            norms = {}
            for where, key in probes.items():  # lora_B: lora_A's gradient is 0 at step 0 (B starts at 0)
                grads = [p.grad for n, p in model.named_parameters() if key in n and "lora_B" in n]
                norms[where] = float(sum(float(g.float().norm()) ** 2 for g in grads if g is not None) ** 0.5)
            seen["adapter_grad_norm"] = norms

    timer = StepTimer(s, s.step_budget_s)
    make_trainer(s, s.lora_steps, [timer, Probe()]).fit(module, train_dataloaders=loader(s))
    stats = mode_stats(s, timer.seconds, timer.peaks, timer.resident, module.losses["chunked"])
    ad, base = dtypes("adapter"), dtypes("base")
    losses = module.losses["chunked"]
    return {"r": s.lora_r, "alpha": s.lora_alpha, "target_modules": LORA_TARGETS, **seen,
            "adapter_dtypes_after": ad, "base_dtypes_after": base,
            "adapters_fp32": seen["adapter_dtypes_before"] == ad == ["float32"],
            "base_bf16": seen["base_dtypes_before"] == base == ["bfloat16"],
            "losses": [round(x, 5) for x in losses], "loss_decreased": len(losses) > 1 and losses[-1] < losses[0],
            **stats}


def save_model_with_tokenizer(s: Settings, out: Path):
    """The phase's model in bf16 plus a word-level tokenizer with exactly ``vocab_size`` ids: the char-level
    tokenizer's ids, then filler tokens ``<x{i}>`` (never produced by encoding, decodable), so every logit column is
    a token and a random model's samples decode."""
    import torch

    from rlad_pl.testing.builders import DEFAULT_CHARS, build_char_tokenizer

    model = build_model(s, torch.bfloat16)  # random init on the GPU: seconds, not a minute of CPU
    n_fill = s.arch["vocab_size"] - 3 - len(DEFAULT_CHARS)
    tok = build_char_tokenizer(DEFAULT_CHARS + [f"<x{i}>" for i in range(n_fill)])
    assert len(tok) == s.arch["vocab_size"], (len(tok), s.arch["vocab_size"])
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    counts = param_counts(model)
    del model
    if s.device == "cuda":
        torch.cuda.empty_cache()
    return counts


def fit_args(s: Settings, model_dir: Path, root: Path) -> list[str]:
    """Arguments of ``python -m rlad_pl``: ``fit`` on ``configs/trrd_tiny.yaml`` with the overrides of this check."""
    o = {
        "trainer.accelerator": "gpu" if s.device == "cuda" else "cpu", "trainer.devices": "1",
        "trainer.strategy.class_path": "ModelParallelStrategy", "trainer.precision": "32-true",
        "trainer.max_epochs": "2", "trainer.check_val_every_n_epoch": "2", "trainer.default_root_dir": str(root),
        "trainer.enable_progress_bar": "false",
        "model.student": str(model_dir), "model.teacher": str(model_dir), "model.tokenizer": str(model_dir),
        "model.dtype": "bfloat16", "model.teacher_dtype": "bfloat16", "model.fsdp_mixed_precision": "bf16",
        "model.gradient_checkpointing": "true", "model.logprob_chunk_size": "128",
        "data.prompts_per_rollout": str(s.fit_prompts), "data.group_size": "8", "data.micro_batch_size": "16",
        "data.sampling.max_new_tokens": str(s.fit_new_tokens), "data.val_prompts": "8", "data.val_k": "2",
    }
    argv = ["fit", "--config", str(REPO / "configs" / "trrd_tiny.yaml")]
    for k, v in o.items():
        argv += [f"--{k}", v]
    return argv


class _StderrTail:
    """A stderr that passes everything through and keeps the last non-empty line (the CLI's one-line error)."""

    def __init__(self):
        self.stream, self.last = sys.stderr, ""

    def write(self, text: str) -> int:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if lines:
            self.last = lines[-1][:400]
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def phase_fit(s: Settings) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from rlad_pl.cli import main as cli_main

    work = Path(s.workdir)
    model_dir, root = work / "fit_model", work / "fit_runs"
    t0 = time.perf_counter()
    counts = save_model_with_tokenizer(s, model_dir)
    build_s = time.perf_counter() - t0
    argv = fit_args(s, model_dir, root)
    t0 = time.perf_counter()
    rc, errors = 0, _StderrTail()
    try:  # the entry point of ``python -m rlad_pl`` in this process (saves a second torch / transformers import)
        with contextlib.redirect_stderr(errors):
            cli_main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    fit_s = time.perf_counter() - t0
    out: dict[str, Any] = {"config": "configs/trrd_tiny.yaml", "command": "python -m rlad_pl " + " ".join(argv),
                           "returncode": rc, "model_build_s": build_s, "fit_s": fit_s, **counts}
    if rc != 0:
        raise RuntimeError(f"python -m rlad_pl fit exited {rc}: {errors.last or '(no error line)'}")
    exports = sorted(root.glob("lightning_logs/version_*/hf_export"))
    if not exports:
        raise RuntimeError(f"fit finished but wrote no hf_export under {root}/lightning_logs/version_*/")
    export = exports[-1]
    reloaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16)
    out.update({"hf_export": str(export), "hf_export_files": sorted(p.name for p in export.iterdir()),
                "hf_export_params": sum(p.numel() for p in reloaded.parameters())})
    out["hf_export_loads"] = out["hf_export_params"] == counts["params"]
    out["rewards"] = tb_scalars(export.parent, "rollout/reward_mean")
    return out


def tb_scalars(log_dir: Path, tag: str) -> Optional[list[float]]:
    """Values of ``tag`` in the TensorBoard event files under ``log_dir`` (None when unreadable)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    values = []
    for f in sorted(log_dir.glob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0})
        ea.Reload()
        if tag in ea.Tags()["scalars"]:
            values += [(e.step, e.value) for e in ea.Scalars(tag)]
    return [round(v, 6) for _, v in sorted(values)]


def run_phase(name: str, s: Settings) -> dict[str, Any]:
    """Run one phase in this (sub)process; returns its result fields."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    if name == "train":
        return phase_train(s)
    if name == "lora":
        return phase_lora(s)
    return phase_fit(s)


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------

#: per-phase timeout (seconds); the total is also capped by --budget
PHASE_TIMEOUT = {"train": 200, "lora": 140, "fit": 220}


def environment(s: Settings) -> dict[str, Any]:
    """Versions (from package metadata: the CPU smoke mode does not import torch here) and the GPU."""
    import importlib.metadata as md

    env: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(), "cuda": None}
    for dist in ("torch", "lightning", "transformers", "peft", "jsonargparse", "omegaconf"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = None
    if s.device == "cuda":
        import torch

        p = torch.cuda.get_device_properties(0)
        env["cuda"] = torch.version.cuda
        env.update(device_name=p.name, device_memory_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}")
    env["wheels_installed"] = [w for w in os.environ.get("GPU_CHECK_INSTALLED", "").split(",") if w]
    return env


def default_out() -> Path:
    base = os.environ.get("OUT")
    return Path(base) / "gpu_check.json" if base else REPO / "runs" / "gpu_check" / "gpu_check.json"


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def derive(report: dict) -> None:
    """Cross-phase numbers: LoRA peak memory against full fine-tuning (same batch, chunked head)."""
    train, lora = report["phases"].get("train", {}), report["phases"].get("lora", {})
    full, lo = (train.get("chunked") or {}).get("peak_mem_gib"), lora.get("peak_mem_gib")
    lora["peak_mem_vs_full"] = lo / full if full and lo else None


def summary_lines(report: dict) -> list[str]:
    P = report["phases"]
    lines = [f"gpu_check ({report['mode']}, {report['wall_s']:.0f} s): " +
             ", ".join(f"{k} {v['status']}" for k, v in P.items())]

    def f(x, spec):
        return "n/a" if x is None else format(x, spec)
    t = P.get("train", {})
    for mode in ("chunked", "unchunked") if t.get("status") == "ok" else ():
        m = t.get(mode) or {}
        lines.append(f"  train {mode:9s}: {f(m.get('tokens_per_s'), ',.0f')} tokens/s, peak "
                     f"{f(m.get('peak_mem_gib'), '.2f')} GiB, loss {f(m.get('loss_first'), '.3f')} -> "
                     f"{f(m.get('loss_last'), '.3f')}")
    lo = P.get("lora", {})
    if lo.get("status") == "ok":
        lines.append(f"  lora: adapters fp32 {lo['adapters_fp32']}, base bf16 {lo['base_bf16']}, loss "
                     f"{f(lo['loss_first'], '.3f')} -> {f(lo['loss_last'], '.3f')}, peak "
                     f"{f(lo['peak_mem_gib'], '.2f')} GiB ({f(lo.get('peak_mem_vs_full'), '.2f')}x full)")
    fi = P.get("fit", {})
    if fi.get("status") == "ok":
        lines.append(f"  fit: {fi['fit_s']:.0f} s, hf_export loads {fi['hf_export_loads']}")
    return lines


def drive(args) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    s = settings_for(args.cpu, args.tiny, str(workdir))
    if s.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: error: no CUDA device (torch.cuda.is_available() is False); --cpu --tiny runs the "
                  "CPU smoke mode", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else default_out()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    start = time.perf_counter()
    report: dict[str, Any] = {"schema": 1, "mode": f"{s.device}{'-tiny' if args.tiny else ''}",
                              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "settings": dataclasses.asdict(s), "model_shape": s.arch, "env": environment(s),
                              "phases": {}, "wall_s": 0.0}
    for name in args.phases:
        left = args.budget - (time.perf_counter() - start)
        timeout = min(PHASE_TIMEOUT[name], left)
        t0 = time.perf_counter()
        result: dict[str, Any] = {"status": "skipped", "reason": f"no time left in the --budget of {args.budget} s"}
        if timeout > 5:
            result = run_child(name, s, timeout, log)
        result["wall_s"] = time.perf_counter() - t0
        report["phases"][name] = result
        report["wall_s"] = time.perf_counter() - start
        derive(report)
        write_json(out, report)
    if not args.workdir:  # a fresh temp folder of ours: GBs of models, runs and exports on the full shape
        shutil.rmtree(workdir, ignore_errors=True)
        report["workdir_removed"] = True
        write_json(out, report)
    for line in summary_lines(report):
        print(line)
    print(f"gpu_check: wrote {out}")
    return 0 if all(p["status"] == "ok" for p in report["phases"].values()) else 1


def run_child(name: str, s: Settings, timeout: float, log: Path) -> dict[str, Any]:
    """Run phase ``name`` in a subprocess under ``timeout``; its output is appended to ``log``."""
    result_file = Path(s.workdir) / f"{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--settings",
           json.dumps(dataclasses.asdict(s)), "--result", str(result_file)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("a") as fh:
        fh.write(f"===== phase {name} (timeout {timeout:.0f} s)\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # the phase and anything it started (the fit's CLI process)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"status": "timeout", "reason": f"phase {name} ran past {timeout:.0f} s (see {log.name})"}
    if result_file.exists():
        return json.loads(result_file.read_text())
    return {"status": "failed", "reason": f"phase {name} exited {rc} without a result (see {log.name})"}


def child(args) -> int:
    s = Settings(**json.loads(args.settings))
    try:
        result = {"status": "ok", **run_phase(args.phase, s)}
        rc = 0
    except Exception as e:  # noqa: BLE001 -- any failure is this phase's result, the other phases still run
        import traceback

        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:400]
        result, rc = {"status": "failed", "reason": f"{type(e).__name__}: {first}"}, 1
    write_json(Path(args.result), json.loads(json.dumps(result, default=str, allow_nan=True)))
    return rc


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU (with --tiny: the smoke mode)")
    ap.add_argument("--tiny", action="store_true", help="tiny model shape and batch (smoke mode)")
    ap.add_argument("--out", help="JSON result path (default $OUT/gpu_check.json, else runs/gpu_check/)")
    ap.add_argument("--workdir", help="scratch folder for models and runs, kept (default: a fresh temp folder, "
                                      "removed at the end)")
    ap.add_argument("--phases", type=lambda x: x.split(","), default=list(PHASES),
                    help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all phases together (default 540)")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = [p for p in args.phases if p not in PHASES]
    if bad:
        ap.error(f"--phases: unknown phase(s) {', '.join(bad)} (expected a subset of {','.join(PHASES)})")
    if args.phase:
        return child(args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
