"""Build the demo models shipped in ``rlad_pl/assets`` (``demo-teacher``, ``demo-student``, ``demo-teacher-bpe``).

    python tools/build_demo_models.py                     # all three (CPU times: see the model cards)
    python tools/build_demo_models.py --only student      # rebuild one of them
    python tools/build_demo_models.py --only teacher-bpe  # the cross-tokenizer demo's teacher

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
  so that it is clearly weaker than the teacher and RL has reward variance to work with);
* teacher-bpe: the teacher's architecture and recipe with **another tokenizer** (a teacher for the cross-tokenizer
  demo, issue 24): a BPE (``tokenizers``, ``BPE_VOCAB`` ids: ``<pad> <bos> <eos>``, the 15 characters, then merges)
  trained on chain_sum reference traces of the demo's levels (2-5 terms of 1 digit), with a pre-tokenizer that cuts
  the text into operator+number pieces (``[^0-9]+[0-9]*``), so that frequent pieces such as ``+7``, ``=12``,
  ``;#-1`` are one token (``4+5=9;9+3=12;#12`` -> ``4 +5 =9 ;9 +3 =12 ;#1 2``); ``decoders.Fuse`` (no spaces
  inserted), no chat template, left padding. Trained on the demo's levels only, ``BPE_TEACHER_STEPS`` steps, and
  evaluated on them (test split, 64 problems per level, 256 in all; the demo student is evaluated on the same
  problems for comparison).

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
BPE_TEACHER_STEPS = 1200
BPE_VOCAB = 96
#: pre-tokenizer pattern of the BPE teacher: pieces of non-digits followed by digits (``;#-13``, ``=1``, ``+7``)
BPE_PIECES = "[^0-9]+[0-9]*|[0-9]+"
STEPS_PER_EPOCH = 16
BATCH = 64

SPECS = {
    "teacher": dict(name="demo-teacher", arch=dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
                    lr=2e-3, steps=TEACHER_STEPS, seed=0),
    "student": dict(name="demo-student", arch=dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256),
                    lr=3e-3, steps=STUDENT_STEPS, seed=1),
    "teacher-bpe": dict(name="demo-teacher-bpe", arch=dict(hidden_size=128, num_layers=4, num_heads=4,
                                                            intermediate_size=512),
                        lr=2e-3, steps=BPE_TEACHER_STEPS, seed=0, tokenizer="bpe", max_digits=1),
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
    init_args: {{min_terms: 2, max_terms: 5, min_digits: 1, max_digits: {max_digits}}}
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


def build_bpe_tokenizer(vocab_size: int = BPE_VOCAB, max_digits: int = 1, count: int = 20000):
    """A BPE ``PreTrainedTokenizerFast`` trained on ``count`` chain_sum reference traces (prompts and solutions of
    the train split, 2-5 terms of 1-``max_digits`` digits): ``<pad>=0, <bos>=1, <eos>=2``, the 15 characters, then
    merges within operator+number pieces; no chat template, left padding, ``decode(encode(t)) == t``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlad_pl.data.chain_sum import CHAIN_SUM_CHARS, ChainSumTask

    problems = ChainSumTask(min_terms=2, max_terms=5, min_digits=1, max_digits=max_digits).problems("train", count)
    texts = [p.prompt for p in problems] + [p.solution for p in problems]
    tok = Tokenizer(models.BPE(unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(BPE_PIECES), "isolated")
    tok.decoder = decoders.Fuse()  # pieces are concatenated as they are (the default decoder joins with spaces)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"], initial_alphabet=CHAIN_SUM_CHARS,
        limit_alphabet=len(CHAIN_SUM_CHARS), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<pad>", padding_side="left")
    assert [fast.convert_tokens_to_ids(t) for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]
    assert len(fast) == vocab_size, f"BPE trained {len(fast)} ids, asked for {vocab_size}"
    for t in texts:
        ids = fast(t, add_special_tokens=False)["input_ids"]
        assert fast.decode(ids) == t, (t, fast.convert_ids_to_tokens(ids))
    assert not getattr(fast, "chat_template", None)
    return fast


def save_bpe_model(out_dir: Path, seed: int, max_digits: int, **arch) -> Path:
    """``save_pretrained`` a randomly initialised Qwen2 with the BPE tokenizer into ``out_dir``."""
    from rlad_pl.testing.builders import build_tiny_qwen2

    tok = build_bpe_tokenizer(BPE_VOCAB, max_digits)
    model = build_tiny_qwen2(len(tok), seed=seed, **arch)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def check_tokenizer(path: Path, max_digits: int) -> list[tuple[str, list[str]]]:
    """The tokenizer as rlad_pl loads it must encode like the saved ``tokenizer.json`` and round-trip the traces;
    returns example tokenizations for the model card."""
    from tokenizers import Tokenizer

    from rlad_pl.data.chain_sum import ChainSumTask
    from rlad_pl.models.loading import load_tokenizer

    tok, raw = load_tokenizer(path), Tokenizer.from_file(str(path / "tokenizer.json"))
    assert not getattr(tok, "chat_template", None), "the BPE teacher must have no chat template"
    assert tok.padding_side == "left"
    examples = []
    for p in ChainSumTask(max_digits=max_digits).problems("test", 256):
        for t in (p.prompt, p.solution):
            ids = tok(t, add_special_tokens=False)["input_ids"]
            assert ids == raw.encode(t, add_special_tokens=False).ids and tok.decode(ids) == t, t
            if len(examples) < 4 and t is p.solution and p.difficulty in ("2t1d", "5t1d"):
                examples.append((t, tok.convert_ids_to_tokens(ids)))
    return examples


def tokenizer_facts(path: Path, max_digits: int) -> dict:
    """Vocabulary size, example tokenizations and mean lengths (checked by ``check_tokenizer``)."""
    from rlad_pl.data.chain_sum import ChainSumTask
    from rlad_pl.models.loading import load_tokenizer

    examples = check_tokenizer(path, max_digits)
    tok = load_tokenizer(path)
    sols = [p.solution for p in ChainSumTask(max_digits=max_digits).problems("test", 256)]
    return {"vocab_size": len(tok), "examples": examples,
            "mean_tokens": sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in sols) / len(sols),
            "mean_chars": sum(map(len, sols)) / len(sols)}


def train(kind: str, work: Path, out_dir: Path) -> dict:
    """Initialise, fine-tune through ``python -m rlad_pl fit`` and export one model; returns build facts."""
    from rlad_pl.cli import main
    from rlad_pl.data.chain_sum import CHAIN_SUM_CHARS
    from rlad_pl.testing.builders import save_tiny_model

    spec = SPECS[kind]
    if spec.get("tokenizer") == "bpe":
        init = save_bpe_model(work / f"{spec['name']}-init", seed=spec["seed"], max_digits=spec["max_digits"],
                              max_positions=160, **spec["arch"])
    else:
        init = save_tiny_model(work / f"{spec['name']}-init", seed=spec["seed"], chars=CHAIN_SUM_CHARS,
                               max_positions=160, **spec["arch"])
    export = work / f"{spec['name']}-trained"
    shutil.rmtree(export, ignore_errors=True)
    cfg = work / f"{spec['name']}.yaml"
    cfg.write_text(CONFIG.format(seed=spec["seed"], epochs=spec["steps"] // STEPS_PER_EPOCH, root=work,
                                 name=spec["name"], init=init, lr=spec["lr"], steps=spec["steps"],
                                 pct=round(30 / spec["steps"], 4), ppr=BATCH * STEPS_PER_EPOCH, batch=BATCH,
                                 spe=STEPS_PER_EPOCH, export=export, max_digits=spec.get("max_digits", 2)))
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


def evaluate(path: Path, max_digits: int = 2) -> dict:
    """Greedy accuracy and Mean@8 / Pass@8 (T=1) per difficulty on the held-out test problems (64 per level: 512
    for 1-2 digits, 256 for 1 digit)."""
    from rlad_pl.data.chain_sum import ChainSumTask
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.pipeline.evaluate import evaluate_policy

    task = ChainSumTask(max_digits=max_digits)
    count = 64 * len(task.levels)
    model, tok = load_causal_lm(path, "model"), load_tokenizer(path)
    greedy = evaluate_policy(model, tok, task, "test", count, k=1, temperature=0.0)
    sampled = evaluate_policy(model, tok, task, "test", count, k=8, temperature=1.0, pass_k=[1, 8], seed=0)
    return {"params": count_params(model), "greedy": greedy, "sampled_t1": sampled}


def model_card(kind: str, facts: dict, ev: dict, threads: int) -> str:
    from rlad_pl.pipeline.evaluate import accuracy_table

    spec = SPECS[kind]
    if spec.get("tokenizer") == "bpe":
        return bpe_model_card(kind, facts, ev, threads)
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


def bpe_model_card(kind: str, facts: dict, ev: dict, threads: int) -> str:
    from rlad_pl.pipeline.evaluate import accuracy_table

    spec = SPECS[kind]
    a, tk = spec["arch"], ev["tokenizer"]
    rows = {"greedy (accuracy)": ("greedy", "mean@1"), "T=1.0 Mean@8": ("sampled_t1", "mean@8"),
            "T=1.0 Pass@8": ("sampled_t1", "pass@8")}
    table = ""
    for label, (key, metric) in rows.items():
        t = accuracy_table({label: ev[key], f"demo-student, {label}": ev["student"][key]}, metric)
        table += t if not table else t.split("\n", 2)[2]
    examples = "\n".join(f"  `{text}` -> `{' '.join(pieces)}`" for text, pieces in tk["examples"])
    return f"""# {spec['name']}

BPE-tokenized Qwen2 causal LM: the teacher of the **cross-tokenizer demo** (`configs/cross_tokenizer_demo.yaml`,
issue 24). Same task, architecture and training recipe as `demo-teacher`, but a tokenizer that differs from the
demo student's char-level one, so distilling into `demo-student` needs the cross-tokenizer alignment
(`rlad_pl/teacher/cross_tokenizer.py`: the student's response text re-tokenized for the teacher, aligned by character
offsets).

* architecture: `Qwen2ForCausalLM`, hidden {a['hidden_size']}, {a['num_layers']} layers, {a['num_heads']} heads,
  MLP {a['intermediate_size']}, tied embeddings, 160 positions; **{ev['params']:,} parameters**
* tokenizer: BPE (`tokenizers`), **{tk['vocab_size']} ids**: `<pad>=0 <bos>=1 <eos>=2`, the 15 characters
  `0-9 + - = ; #`, then {tk['vocab_size'] - 18} merges learned on 20,000 chain_sum reference traces (prompts and
  solutions, 2-5 terms of 1 digit); pre-tokenizer `Split({BPE_PIECES!r}, isolated)` (merges stay inside one
  operator+number piece), decoder `Fuse` (`decode(encode(t)) == t`, no spaces inserted), no chat template, left
  padding; mean {tk['mean_tokens']:.1f} tokens per reference solution vs {tk['mean_chars']:.1f} characters (ids) for
  the char tokenizer. Examples:

{examples}

* task: `rlad_pl.data.ChainSumTask` with **2-5 terms of 1 digit** (the levels of `configs/demo.yaml`), prompt
  `<bos>` + `4+5+3=`, reward 1 for an exact answer after the last `#`, else 0
* training: `python -m rlad_pl fit` with `rlad_pl.objectives.SFT` (`prefix_source: dataset`), {facts['steps']}
  optimizer steps x 64 fresh problems ({facts['examples']:,} examples), AdamW lr {facts['lr']} (one-cycle cosine),
  config in `build_config.yaml`; {facts['train_seconds']:.0f} s wall / {facts['train_cpu_seconds']:.0f} CPU-s with
  {threads} torch thread(s)
* build: `python tools/build_demo_models.py --only {kind}` (deterministic)

## Accuracy on the held-out test split (%, 64 problems per level, 256 in all; std. error up to 6 pp per level)

Levels `NtMd`: N terms of M digits. The `demo-student` rows: the shipped demo student (char tokenizer) on the same
problems. Mean response length (greedy): {ev['greedy']['response_length_mean']:.1f} tokens (student:
{ev['student']['greedy']['response_length_mean']:.1f}).

{table}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=list(SPECS), default=None)
    ap.add_argument("--out", type=Path, default=ASSETS)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "build_demo")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2 on the reference machine)")
    ap.add_argument("--eval-only", action="store_true", help="re-evaluate the shipped models, rewrite the cards")
    args = ap.parse_args()
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    for kind in ([args.only] if args.only else list(SPECS)):
        spec = SPECS[kind]
        out_dir = args.out / spec["name"]
        if args.eval_only:
            facts = json.loads((out_dir / "eval.json").read_text())["build"]
        else:
            facts = train(kind, args.work, out_dir)
        t0 = time.perf_counter()
        ev = evaluate(out_dir, spec.get("max_digits", 2))
        ev["eval_seconds"] = round(time.perf_counter() - t0, 1)
        if spec.get("tokenizer") == "bpe":
            ev["tokenizer"] = tokenizer_facts(out_dir, spec["max_digits"])
            ev["student"] = evaluate(args.out / SPECS["student"]["name"], spec["max_digits"])
        (out_dir / "eval.json").write_text(json.dumps({"build": facts, **ev}, indent=1) + "\n")
        (out_dir / "README.md").write_text(model_card(kind, facts, ev, args.threads))
        size = sum(p.stat().st_size for p in out_dir.iterdir())
        print(f"{out_dir}: {size / 1e6:.2f} MB, {ev['params']:,} params, greedy "
              f"{100 * ev['greedy']['all/mean@1']:.1f}%, Mean@8(T=1) {100 * ev['sampled_t1']['all/mean@8']:.1f}%, "
              f"train {facts['train_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
