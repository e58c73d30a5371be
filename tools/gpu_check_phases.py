"""The GPU check's phases (``tools/gpu_check.py`` runs each in its own subprocess; its docstring describes them):
the model, the LightningModule and the step timer they share, and ``phase_train``, ``phase_lora``, ``phase_fit``.
Imports torch and the rest inside the functions: the driver imports this module for ``Settings`` alone."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the repository itself, not an installed rlad_pl (the device machine has none)
    sys.path.insert(0, str(REPO))
from rlad_pl.testing import runs  # noqa: E402

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

    from rlad_pl.core.logprobs import _head_chunk, chunked_token_logprobs, response_hidden
    from rlad_pl.models.distributed import fsdp_mesh, mixed_precision_policy, root_call, shard_model

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
    return runs.fit_argv(REPO / "configs" / "trrd_tiny.yaml", {
        "trainer.accelerator": "gpu" if s.device == "cuda" else "cpu", "trainer.devices": 1,
        "trainer.strategy.class_path": "ModelParallelStrategy", "trainer.precision": "32-true",
        "trainer.max_epochs": 2, "trainer.check_val_every_n_epoch": 2, "trainer.default_root_dir": root,
        "trainer.enable_progress_bar": False,
        "model.student": model_dir, "model.teacher": model_dir, "model.tokenizer": model_dir,
        "model.dtype": "bfloat16", "model.teacher_dtype": "bfloat16", "model.fsdp_mixed_precision": "bf16",
        "model.gradient_checkpointing": True, "model.logprob_chunk_size": 128,
        "data.prompts_per_rollout": s.fit_prompts, "data.group_size": 8, "data.micro_batch_size": 16,
        "data.sampling.max_new_tokens": s.fit_new_tokens, "data.val_prompts": 8, "data.val_k": 2,
    })


def phase_fit(s: Settings) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    work = Path(s.workdir)
    model_dir, root = work / "fit_model", work / "fit_runs"
    t0 = time.perf_counter()
    counts = save_model_with_tokenizer(s, model_dir)
    build_s = time.perf_counter() - t0
    argv = fit_args(s, model_dir, root)
    t0 = time.perf_counter()
    rc, error = runs.cli_in_process(argv)  # saves a second torch / transformers import
    fit_s = time.perf_counter() - t0
    out: dict[str, Any] = {"config": "configs/trrd_tiny.yaml", "command": "python -m rlad_pl " + " ".join(argv),
                           "returncode": rc, "model_build_s": build_s, "fit_s": fit_s, **counts}
    if rc != 0:
        raise RuntimeError(f"python -m rlad_pl fit exited {rc}: {error or '(no error line)'}")
    versions = runs.version_dirs(root)
    if not versions or not (versions[-1] / "hf_export").is_dir():
        raise RuntimeError(f"fit finished but wrote no hf_export under {root}/lightning_logs/version_*/")
    export = versions[-1] / "hf_export"
    reloaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16)
    out.update({"hf_export": str(export), "hf_export_files": sorted(p.name for p in export.iterdir()),
                "hf_export_params": sum(p.numel() for p in reloaded.parameters())})
    out["hf_export_loads"] = out["hf_export_params"] == counts["params"]
    out["rewards"] = [round(v, 6) for v in runs.values(runs.read_scalars(export.parent), "rollout/reward_mean")]
    return out


def run_phase(name: str, s: Settings) -> dict[str, Any]:
    """Run one phase in this (sub)process; returns its result fields."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    if name == "train":
        return phase_train(s)
    if name == "lora":
        return phase_lora(s)
    return phase_fit(s)
