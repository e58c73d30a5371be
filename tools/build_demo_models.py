"""Build the demo teacher and student shipped in ``rlad_pl/assets`` (``demo-teacher``, ``demo-student``).

    python tools/build_demo_models.py                     # both models (about 15 CPU-minutes, see below)
    python tools/build_demo_models.py --only student      # rebuild one of them

Task: ``rlad_pl.data.ChainSumTask`` (reasoning-gym ``chain_sum``, 2-5 terms, 1-2 digits, chain-of-thought format
``77+46-46=`` -> ``77+46=123;123-46=77;#77``). Tokenizer: char-level, 18 ids (``<pad> <bos> <eos> 0-9 + - = ; #``).

Both models are trained with the project's own code: ``python -m rlad_pl fit`` (run in-process) with the
supervised ``rlad_pl.objectives.SFT`` objective on dataset prefixes (``prefix_source: dataset``: the task's
reference solutions), token-mean NLL, AdamW (betas 0.9/0.98, weight decay 0.01), one-cycle cosine learning-rate
schedule (warm-up from 0.1x, cosine down to 0.1x), gradient clipping 1.0, 64 sequences per optimizer step, 16 steps
per "rollout" (1024 fresh problems per epoch, never repeated), micro-batches of 16 grouped by length
(``data.group_by_length``):

* teacher: Qwen2 128/4/4/512 (hidden / layers / heads / MLP), 1.05M parameters, lr 2e-3, ``TEACHER_STEPS`` steps;
* student: Qwen2 64/2/2/256, 0.13M parameters, lr 3e-3, only ``STUDENT_STEPS`` steps (a short supervised warm-up,
  so that it is clearly weaker than the teacher and RL has reward variance to work with).

Then both are evaluated with ``rlad_pl.training.validate.evaluate_policy`` on the held-out test split (64 problems per
difficulty level, 512 in all): greedy accuracy, and Mean@8 / Pass@8 at temperature 1.0. The numbers go into each
model's ``README.md`` (model card) and ``eval.json``.

Deterministic: fixed seeds for initialisation, data order and sampling (bit-exact results also need the same torch
build and thread count; ``--threads``). Runtime on 2 uncontended CPU cores: see the model cards (``build_seconds``).
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "rlad_pl" / "assets"

TEACHER_STEPS = 4000
STUDENT_STEPS = 960
STEPS_PER_EPOCH = 16
BATCH = 64

SPECS = {
    "teacher": dict(name="demo-teacher", arch=dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
                    lr=2e-3, steps=TEACHER_STEPS, seed=0),
    "student": dict(name="demo-student", arch=dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256),
                    lr=3e-3, steps=STUDENT_STEPS, seed=1),
}

CONFIG = """\
# written by tools/build_demo_models.py: supervised training on the chain_sum reference solutions
seed_everything: {seed}
trainer:
  max_epochs: {epochs}
  limit_val_batches: 0
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {root}
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {root}, name: {name}}}
model:
  student: {init}
  loss_agg: token_mean
  log_entropy: false
  objectives:
    - class_path: rlad_pl.objectives.SFT
      init_args: {{prefix_source: dataset}}
  optimizer:
    class_path: torch.optim.AdamW
    init_args: {{lr: {lr}, betas: [0.9, 0.98], weight_decay: 0.01}}
  lr_scheduler:
    class_path: torch.optim.lr_scheduler.OneCycleLR
    init_args: {{max_lr: {lr}, total_steps: {steps}, pct_start: {pct}, anneal_strategy: cos, div_factor: 10.0,
                final_div_factor: 1.0, cycle_momentum: false}}
  grad_clip: 1.0
data:
  task:
    class_path: rlad_pl.data.ChainSumTask
    init_args: {{min_terms: 2, max_terms: 5, min_digits: 1, max_digits: 2}}
  prompts_per_rollout: {ppr}
  group_size: 1
  micro_batch_size: 16
  group_by_length: true
  steps_per_rollout: {spe}
  sampling: {{max_new_tokens: 64}}
  log_samples: 0
  seed: {seed}
export:
  dirpath: {export}
"""


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train(kind: str, work: Path, out_dir: Path) -> dict:
    """Initialise, fine-tune through ``python -m rlad_pl fit`` and export one model; returns build facts."""
    from rlad_pl.cli import main
    from rlad_pl.data.chain_sum import CHAIN_SUM_CHARS
    from rlad_pl.testing.builders import save_tiny_model

    spec = SPECS[kind]
    init = save_tiny_model(work / f"{spec['name']}-init", seed=spec["seed"], chars=CHAIN_SUM_CHARS,
                           max_positions=160, **spec["arch"])
    export = work / f"{spec['name']}-trained"
    shutil.rmtree(export, ignore_errors=True)
    cfg = work / f"{spec['name']}.yaml"
    cfg.write_text(CONFIG.format(seed=spec["seed"], epochs=spec["steps"] // STEPS_PER_EPOCH, root=work,
                                 name=spec["name"], init=init, lr=spec["lr"], steps=spec["steps"],
                                 pct=round(30 / spec["steps"], 4), ppr=BATCH * STEPS_PER_EPOCH, batch=BATCH,
                                 spe=STEPS_PER_EPOCH, export=export))
    t0, c0 = time.perf_counter(), time.process_time()
    argv, sys.argv = sys.argv, ["rlad_pl"]
    try:
        main(["fit", "--config", str(cfg)])
    finally:
        sys.argv = argv
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if (export / f).exists():
            shutil.copy(export / f, out_dir / f)
    shutil.copy(cfg, out_dir / "build_config.yaml")
    return {"train_seconds": round(wall, 1), "train_cpu_seconds": round(cpu, 1), "steps": spec["steps"],
            "examples": spec["steps"] * BATCH, "lr": spec["lr"], "arch": spec["arch"]}


def evaluate(path: Path) -> dict:
    """Greedy accuracy and Mean@8 / Pass@8 (T=1) per difficulty on the 512 held-out test problems."""
    from rlad_pl.data.chain_sum import ChainSumTask
    from rlad_pl.pipeline.evaluate import evaluate_policy
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer

    task = ChainSumTask()
    model, tok = load_causal_lm(path, "model"), load_tokenizer(path)
    greedy = evaluate_policy(model, tok, task, "test", 512, k=1, temperature=0.0)
    sampled = evaluate_policy(model, tok, task, "test", 512, k=8, temperature=1.0, pass_k=[1, 8], seed=0)
    return {"params": count_params(model), "greedy": greedy, "sampled_t1": sampled}


def model_card(kind: str, facts: dict, ev: dict, threads: int) -> str:
    from rlad_pl.pipeline.evaluate import accuracy_table

    spec = SPECS[kind]
    a = spec["arch"]
    role = ("the **teacher** of the demo (`configs/demo.yaml`)" if kind == "teacher" else
            "the **student** of the demo (`configs/demo.yaml`): a short supervised warm-up only, so it is clearly "
            "weaker than `demo-teacher` and its rollouts have reward variance for RL")
    table = accuracy_table({"greedy (accuracy)": ev["greedy"]}, "mean@1")
    table += accuracy_table({"T=1.0 Mean@8": ev["sampled_t1"]}, "mean@8").split("\n", 2)[2]
    table += accuracy_table({"T=1.0 Pass@8": ev["sampled_t1"]}, "pass@8").split("\n", 2)[2]
    return f"""# {spec['name']}

Char-level Qwen2 causal LM, {role}.

* architecture: `Qwen2ForCausalLM`, hidden {a['hidden_size']}, {a['num_layers']} layers, {a['num_heads']} heads,
  MLP {a['intermediate_size']}, tied embeddings, 160 positions; **{ev['params']:,} parameters**
* tokenizer: 18 ids, `<pad> <bos> <eos> 0 1 2 3 4 5 6 7 8 9 + - = ; #` (one id per character)
* task: `rlad_pl.data.ChainSumTask` (reasoning-gym `chain_sum`, 2-5 terms of 1-2 digits, random + / -), prompt
  `<bos>77+46-46-73=`, response `77+46=123;123-46=77;77-73=4;#4<eos>`; reward 1 for an exact answer after the
  last `#`, else 0
* training: `python -m rlad_pl fit` with `rlad_pl.objectives.SFT` (`prefix_source: dataset`), {facts['steps']}
  optimizer steps x 64 fresh problems ({facts['examples']:,} examples), AdamW lr {facts['lr']} (one-cycle cosine),
  config in `build_config.yaml`; {facts['train_seconds']:.0f} s wall / {facts['train_cpu_seconds']:.0f} CPU-s with
  {threads} torch thread(s)
* build: `python tools/build_demo_models.py --only {kind}` (deterministic; all of it: `python
  tools/build_demo_models.py`)

## Accuracy on the held-out test split (%, 64 problems per level, 512 in all; std. error about 6 pp per level)

Levels `NtMd`: N terms of M digits. Mean response length (greedy): {ev['greedy']['response_length_mean']:.1f}
tokens.

{table}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["teacher", "student"], default=None)
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "build_demo")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2 on the reference machine)")
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate the shipped models, rewrite the cards")
    args = ap.parse_args()
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    for kind in ([args.only] if args.only else ["teacher", "student"]):
        out_dir = args.out / SPECS[kind]["name"]
        if args.eval_only:
            facts = json.loads((out_dir / "eval.json").read_text())["build"]
        else:
            facts = train(kind, args.work, out_dir)
        t0 = time.perf_counter()
        ev = evaluate(out_dir)
        ev["eval_seconds"] = round(time.perf_counter() - t0, 1)
        (out_dir / "eval.json").write_text(json.dumps({"build": facts, **ev}, indent=1) + "\n")
        (out_dir / "README.md").write_text(model_card(kind, facts, ev, args.threads))
        size = sum(p.stat().st_size for p in out_dir.iterdir())
        print(f"{out_dir}: {size / 1e6:.2f} MB, {ev['params']:,} params, greedy "
              f"{100 * ev['greedy']['all/mean@1']:.1f}%, Mean@8(T=1) {100 * ev['sampled_t1']['all/mean@8']:.1f}%, "
              f"train {facts['train_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
