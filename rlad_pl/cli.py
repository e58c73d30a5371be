"""``python -m rlad_pl {fit,validate,test} --config configs/X.yaml``: a ``LightningCLI`` over
``DistillationModule`` and ``RolloutDataModule``. ``python -m rlad_pl serve --config configs/X.yaml`` is dispatched
before it (no Lightning import): a vLLM server for the config's student (``rlad_pl.rollout.launch``).

Configs are parsed in jsonargparse's ``omegaconf`` mode, so a YAML file can interpolate its own values, e.g.
``teacher_tokenizer: ${model.tokenizer}``. Defaults that on-policy training needs are set here: dataloaders reload
every epoch (one epoch = one rollout batch), no sanity validation, TensorBoard logs under ``runs/``, and the
``HFExport`` callback (``--export.*``) that writes a Hugging Face checkpoint of the student at the end of ``fit``.
Bad input ends in one line on stderr that names the field (exit code 2).

The first screen carries what a user can act on: third-party lines that they cannot (Lightning's advertising tips,
deprecations inside Lightning, Lightning warnings that do not apply to on-policy training, vLLM's notes on settings
rlad_pl makes on purpose) are silenced at their source, each by its exact message
(``rlad_pl.core.errors.quiet_startup``). vLLM logs warnings and errors only (``VLLM_LOGGING_LEVEL=WARNING`` unless set;
set it to ``INFO`` for vLLM's engine details).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

from rlad_pl.core.errors import ConfigError, quiet_startup
from rlad_pl.models.compiled import check_compile


def _cli_class(state: dict):
    """The ``LightningCLI`` subclass; ``state["stage"]`` records how far startup got (for error messages) and
    ``state["started"]`` turns True when the subcommand (training itself) begins."""
    from lightning.pytorch.cli import LightningCLI

    from rlad_pl.training.checkpointing import RolloutCheckpoint
    from rlad_pl.training.export import HFExport
    from rlad_pl.training.tb_layout import TensorBoardOverview

    class RLADCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(HFExport, "export")
            parser.add_lightning_class_args(RolloutCheckpoint, "checkpoint")
            parser.add_lightning_class_args(TensorBoardOverview, "tensorboard")
            parser.set_defaults({
                "trainer.reload_dataloaders_every_n_epochs": 1,
                "trainer.num_sanity_val_steps": 0,
                "trainer.log_every_n_steps": 1,
                "trainer.default_root_dir": "runs",
                "trainer.accelerator": "auto",
                "trainer.devices": 1,
            })

        def _parse_ckpt_path(self) -> None:
            """``--ckpt_path`` resumes the run's state but never replaces the user's settings (LightningCLI's own
            version parses the checkpoint's hyperparameters over the YAML / command line): a checkpoint whose model
            settings differ from the given ones is refused with the list of differences."""
            state["stage"] = "ckpt_path"
            sub = self.config.get("subcommand")
            if sub:
                check_resume(self.config[sub].get("ckpt_path"), self.config[sub].get("model"))

        def before_instantiate_classes(self) -> None:
            sub = self.config.get("subcommand")
            cfg = self.config[sub] if sub else self.config
            check_output_dirs(cfg)
            check_sampling(cfg)
            state["stage"] = "instantiate"

        def instantiate_trainer(self, **kwargs):
            state["stage"] = "trainer"
            return super().instantiate_trainer(**kwargs)

        def _instantiate_trainer(self, config, callbacks):
            """The default ``RolloutCheckpoint`` (``--checkpoint.*``) steps aside when checkpointing is off or the
            user's ``trainer.callbacks`` hold a ``ModelCheckpoint`` of their own."""
            from lightning.pytorch.callbacks import ModelCheckpoint

            own = [c for c in (config.get("callbacks") or []) if isinstance(c, ModelCheckpoint)]
            if own or config.get("enable_checkpointing") is False:
                callbacks = [c for c in callbacks if not isinstance(c, RolloutCheckpoint)]
            return super()._instantiate_trainer(config, callbacks)

        def _run_subcommand(self, subcommand: str) -> None:
            cfg = self.config[subcommand]
            if cfg.get("ckpt_path") == "last":  # the file the trainer will pick: the newest last.ckpt it finds
                found = set()
                for cb in self.trainer.checkpoint_callbacks:
                    if hasattr(cb, "_find_last_checkpoints"):
                        found |= set(cb._find_last_checkpoints(self.trainer))
                if found:
                    check_resume(max(found, key=os.path.getmtime), cfg.get("model"))
                else:  # instead of Lightning's hint to set ModelCheckpoint(save_last=True): rlad_pl already does
                    if self.trainer.is_global_zero:
                        print(f"rlad_pl: warning: ckpt_path: {_nothing_to_resume(self.trainer)}", file=sys.stderr)
                    self.config_init[subcommand]["ckpt_path"] = None
            if getattr(self.model, "compiled", False):  # before the logger writes anything
                check_compile(self.trainer.strategy.root_device, type(self.trainer.strategy).__name__)
            state["started"] = True
            super()._run_subcommand(subcommand)

    return RLADCLI


def _nothing_to_resume(trainer) -> str:
    """The line for ``--ckpt_path last`` when no ``last.ckpt`` exists: where the checkpoint callbacks looked."""
    places = []
    for cb in trainer.checkpoint_callbacks:
        pattern = cb.last_checkpoint_pattern(trainer) if hasattr(cb, "last_checkpoint_pattern") else None
        places += [pattern] if pattern else [os.path.join(str(cb.dirpath or "<log_dir>/checkpoints"), "last.ckpt")]
    if not places:
        return ("'last', but checkpointing is off (trainer.enable_checkpointing: false), so there is no last.ckpt "
                "to resume; starting a fresh run")
    return f"'last', but no last.ckpt found (looked for {', '.join(dict.fromkeys(places))}); starting a fresh run"


def check_resume(ckpt_path: Optional[str], model_cfg) -> None:
    """Fail with one line when ``ckpt_path`` does not exist, cannot be read, or holds model hyperparameters that
    differ from the given ones (``model_cfg``: the parsed ``model`` namespace). Lightning's special values
    (``last``, ``best``, ``hpc``, ``registry...``) and sharded checkpoint folders are left to the trainer."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc") or str(ckpt_path).startswith("registry"):
        return
    path = Path(ckpt_path)
    if not path.exists():
        raise ConfigError("ckpt_path", f"no checkpoint at '{ckpt_path}'")
    if path.is_dir():
        return
    import torch

    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001  (pickled extras in a checkpoint we wrote ourselves)
            if "weights_only" not in str(e) and "Weights only" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError("ckpt_path", f"cannot read checkpoint '{ckpt_path}' ({_first_line(e)}); the file is "
                          "truncated or not a Lightning checkpoint") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError("ckpt_path", f"'{ckpt_path}' is not a Lightning checkpoint (no state_dict)")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if model_cfg is None:
        return
    diffs = [f"model.{k}: checkpoint {hparams[k]!r}, given {model_cfg[k]!r}" for k in sorted(hparams)
             if k in model_cfg and not k.startswith("_") and hparams[k] != model_cfg[k]]
    if diffs:
        raise ConfigError("ckpt_path", f"'{ckpt_path}' was trained with other model settings ({'; '.join(diffs)});"
                          " a resume continues the same run: give the checkpoint's values, or start a new run "
                          "from its exported weights")


def check_sampling(cfg) -> None:
    """Validate ``data.sampling`` / ``data.val_sampling`` under their full names (``SamplingParams`` itself only
    knows it is ``sampling``)."""
    from rlad_pl.rollout.sampler import SamplingParams

    for key in ("sampling", "val_sampling"):
        ns = (cfg.get("data") or {}).get(key)
        if ns is None or not hasattr(ns, "as_dict"):
            continue
        try:
            SamplingParams(**ns.as_dict())
        except ConfigError as e:
            raise ConfigError(f"data.{key}{e.field[len('sampling'):]}", e.message) from None
        except TypeError:
            pass  # an unexpected key: the parser reports it


def check_output_dirs(cfg) -> None:
    """``trainer.default_root_dir`` and ``export.dirpath`` must be writable before any compute is spent."""
    for field, value in (("trainer.default_root_dir", cfg.get("trainer", {}).get("default_root_dir")),
                         ("export.dirpath", (cfg.get("export") or {}).get("dirpath"))):
        if not value or "://" in str(value):
            continue
        path = Path(value)
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            raise ConfigError(field, f"'{value}' is not a folder ('{probe}' is a file)")
        try:
            fd, tmp = tempfile.mkstemp(dir=probe, prefix=".rlad_pl_write_test")
            os.close(fd)
            os.remove(tmp)
        except OSError as e:
            raise ConfigError(field, f"cannot write to '{value}' ('{probe}': {e.strerror})") from None


#: what a class_path under each key must name, for error messages
_EXPECTED_CLASS = {"model.objectives": "an rlad_pl.objectives.Objective subclass, e.g. rlad_pl.objectives.GRPO",
                   "data.task": "an rlad_pl.data.Task subclass, e.g. rlad_pl.data.ReasoningGymTask",
                   "data.sampler": "an rlad_pl.rollout.Sampler subclass, e.g. rlad_pl.rollout.HFSampler",
                   "data.reward": "a callable (completion, problem) -> float"}


#: the class a null (default) field stands for, named when an override sets one of its init_args
_DEFAULT_CLASS = {"data.sampler": "rlad_pl.rollout.HFSampler", "data.teacher_sampler": "rlad_pl.rollout.HFSampler",
                  "model.teacher_backend": "rlad_pl.teacher.LocalTeacher"}


def _one_line(err: BaseException) -> str:
    """Condense a jsonargparse error to one line: ``<field>: <what is wrong> (<what was expected>)``."""
    chain = list(_chain(err))
    text = str(err).strip()
    field = _field_of(chain)
    bad_class = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", text)
    if bad_class and not bad_class.group(2).startswith(("Parser key", "Option ")):  # the class itself is unusable
        expected = _EXPECTED_CLASS.get(field, "an importable class")
        return (f"{field}: cannot use class_path '{bad_class.group(1)}' ({bad_class.group(2).strip()}); "
                f"expected {expected}")
    where = f" (in {bad_class.group(1)})" if bad_class and not _is_dataclass_path(bad_class.group(1)) else ""
    choice = _literal_choice(chain)
    if choice is not None:  # a typo in an enumerated option
        return f"{field}: {choice}{where}"[:600] if field else choice[:600]
    for e in chain:  # a union type: name the alternatives and the value given
        sub = re.search(r"Subtypes: \[(.*)\]\s*\n", str(e))
        given = re.search(r"Given value: (.*)", str(e))
        if "Does not validate against any of the Union subtypes" in str(e) and sub and given:
            kinds = re.sub(r"<class '([^']+)'>", r"\1", sub.group(1)).replace("NoneType", "null")
            value = given.group(1).split(". Got value:")[0].strip()
            nested = re.match(r"NestedArg\(key='([^']+)', val='(.*)'\)$", value)
            if nested and field.endswith("." + nested.group(1)):
                break  # the nested value itself was parsed (a dataclass field) and is wrong: see below
            if nested:  # ``--data.sampler.init_args.batch_size 0`` where the config leaves data.sampler null
                key, val = nested.groups()
                default = f" (the default is {_DEFAULT_CLASS[field]})" if field in _DEFAULT_CLASS else ""
                return (f"{field}.init_args.{key}: {field} is not set in the config, so {key} has no class to go "
                        f"to; name one first{default}: --{field}.class_path CLASS --{field}.init_args.{key} "
                        f"{val}")[:600]
            return f"{field}: expected one of [{kinds}], got {value}{where}"[:600]
    lines = [ln.strip().lstrip("- ") for ln in str(chain[-1]).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Expected a path but", "Parser key"))] or [
        ln.strip().lstrip("- ") for ln in text.splitlines() if ln.strip() and not ln.startswith("Parser key")]
    detail = lines[0] if lines else type(err).__name__
    if bad_class and bad_class.group(2).startswith("Option "):
        detail = bad_class.group(2).strip()
    return (f"{field}: {detail}{where}" if field else detail)[:600]


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _is_dataclass_path(path: str) -> bool:
    """Whether ``path`` (a class path in a parser message) names an imported dataclass, such as ``PromptFormat`` or
    ``SamplingParams``: the user set its fields, not a class, so the message need not name it."""
    import dataclasses

    module, _, name = path.rpartition(".")
    return dataclasses.is_dataclass(getattr(sys.modules.get(module), name, None))


def _literal_values(text: str) -> Optional[list]:
    """``typing.Literal['a', 'b']`` -> ``['a', 'b']``; None when it does not parse."""
    import ast

    inner = re.fullmatch(r"\s*typing\.Literal\[(.*)\]\s*", text, re.S)
    if inner is None:
        return None
    try:
        return list(ast.literal_eval(f"[{inner.group(1)}]"))
    except (ValueError, SyntaxError):
        return None


def _literal_choice(chain: list[BaseException]) -> Optional[str]:
    """``expected one of a, b, c, got 'x'`` (and the closest allowed value) when the parser refused a value of a
    ``Literal`` option, or of a union of ``Literal``s and None (``trainer.precision``); else None."""
    import difflib

    values = given = None
    for e in chain:  # a union of Literals (its members' own errors are further in)
        text = str(e)
        sub = re.search(r"Subtypes: \[(.*)\]\s*\n", text)
        value = re.search(r"Given value: ([^\n]*)", text)
        if "Does not validate against any of the Union subtypes" in text and sub and value:
            parts = re.findall(r"typing\.Literal\[[^\[\]]*\]", sub.group(1))
            rest = re.sub(r"typing\.Literal\[[^\[\]]*\]|<class 'NoneType'>|NoneType|[,\s]", "", sub.group(1))
            parsed = [_literal_values(p) for p in parts]
            if parts and not rest and all(p is not None for p in parsed):
                values = [v for p in parsed for v in p] + ([None] if "NoneType" in sub.group(1) else [])
                given = value.group(1).split(". Got value:")[0].strip()
                break
    for e in reversed(chain if values is None else []):  # one Literal: the innermost error names it
        single = re.search(r"Expected a (typing\.Literal\[[^\n]*\])\. Got value: ([^\n]*)", str(e))
        if single and _literal_values(single.group(1)) is not None:
            values, given = _literal_values(single.group(1)), single.group(2).strip()
            break
    if values is None or given.startswith("NestedArg("):
        return None
    names = list(dict.fromkeys("null" if v is None else str(v) for v in values))
    shown = given if re.fullmatch(r"-?\d+(\.\d*)?", given) else repr(given.strip("'\""))
    close = difflib.get_close_matches(given.strip("'\""), names, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"expected one of {', '.join(names)}, got {shown}{hint}"


def _chain(err: BaseException):
    """``err`` and its causes / contexts, outermost first."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


#: Trainer arguments named in Lightning's error messages, most specific first
_TRAINER_FIELDS = ("strategy", "accelerator", "devices", "num_nodes", "precision", "plugins", "callbacks", "logger",
                   "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "val_check_interval",
                   "check_val_every_n_epoch", "limit_train_batches", "limit_val_batches", "accumulate_grad_batches",
                   "gradient_clip_val", "default_root_dir", "profiler", "deterministic")


def _config_files(argv: list[str]) -> list[str]:
    return [v.split("=", 1)[1] if "=" in v else (argv[i + 1] if i + 1 < len(argv) else "")
            for i, v in enumerate(argv) if v in ("--config", "-c") or v.startswith("--config=")]


def _strip_subcommand(key: str) -> str:
    return re.sub(r"^(fit|validate|test|predict)\.", "", key)


def _is_parser_message(err: BaseException) -> bool:
    """True for the parser's own wrapping errors (as opposed to an error raised by user or library code)."""
    from jsonargparse import ArgumentError

    text = str(err)
    return isinstance(err, ArgumentError) or (type(err) in (ValueError, TypeError) and any(
        m in text for m in ("Parser key", "Does not validate against", "Expected a", "Problem with given class_path",
                            "Not a valid subclass", "Expected a path")))


#: base classes in the parser's "Subtypes: [...]" lists -> the config field they belong to
_FIELD_OF_BASE = {"Callback": "trainer.callbacks", "Logger": "trainer.logger", "Objective": "model.objectives",
                  "Task": "data.task", "Sampler": "data.sampler", "SamplingParams": "data.sampling",
                  "Strategy": "trainer.strategy", "Optimizer": "model.optimizer", "LRScheduler": "model.lr_scheduler"}


def _field_of(chain: list[BaseException]) -> str:
    """The dotted config field an error chain refers to: its ``Parser key "..."`` names joined, or the field of
    the base class named in a ``Subtypes`` list."""
    keys: list[str] = []
    for e in chain:
        for k in re.findall(r'Parser key "([^"]+)"', str(e)):
            if k not in keys and not any(x.endswith("." + k) for x in keys):
                keys.append(k)
    if keys:
        return ".".join(keys)
    for e in chain:
        sub = re.search(r"Subtypes: \[([^\n]*)", str(e))
        if sub:
            for base, field in _FIELD_OF_BASE.items():
                if re.search(rf"\b{base}\b", sub.group(1)):
                    return field
    return ""


def _yaml_error_file(files: list[str], mark):
    """The config file (and its error mark) that fails to parse as YAML; ``("config", mark)`` if none does."""
    import yaml

    for f in files:
        try:
            yaml.safe_load(Path(f).read_text())
        except yaml.MarkedYAMLError as e:
            return f, e.problem_mark or mark
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
    return "config", mark


def describe_error(err: BaseException, stage: str, argv: list[str]) -> str:
    """One line ``<field or file>: <what is wrong>`` for an error raised while the CLI starts up."""
    from jsonargparse import ArgumentError

    chain = list(_chain(err))
    for e in chain:
        if isinstance(e, ConfigError):
            return str(e).splitlines()[0]
    for e in chain:  # YAML syntax: file, line and column
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where, mark = _yaml_error_file(_config_files(argv), mark)
            return (f"{where}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: "
                    f"{getattr(e, 'problem', None) or _first_line(e)}"
                    + (f" ({e.context})" if getattr(e, "context", None) else ""))
    for e in chain:
        if type(e).__module__.startswith("omegaconf"):
            key = _strip_subcommand(str(getattr(e, "full_key", None) or "config"))
            msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
            resolved = re.search(r"resolved to '([^']+)'", msg)
            if resolved and "not found" in msg:
                msg = f"interpolation key '{_strip_subcommand(resolved.group(1))}' not found"
            files = _config_files(argv)
            return f"{key}: {msg}" + (f" (in {', '.join(files)})" if files else "")
    if "expected one argument" in str(err):  # ``--key -1e-3``: argparse reads the value as an option
        for key, value in zip(argv, argv[1:]):
            if key.startswith("--") and "=" not in key and re.match(r"^-[\d.]", value):
                return (f"{key[2:]}: the value {value} starts with '-' and is read as an option; write "
                        f"{key}={value}")
    if isinstance(err, ArgumentError):
        return _one_line(err)
    text = " ".join(str(err).split())
    inner = chain[-1]
    if not _is_parser_message(inner) and stage != "trainer":  # a class's constructor rejected its init args
        return f"{_field_of(chain) or 'config'}: {_first_line(inner)}"
    if stage == "trainer":
        hits = [(m.start(), f) for f in _TRAINER_FIELDS for m in [re.search(rf"\b{f}\b", text)] if m]
        if not hits and re.search(r"strategy", text, re.I):
            hits = [(0, "strategy")]
        if not hits and re.search(r"gpu|cuda|mps|tpu|xla|backend", text, re.I):
            hits = [(0, "accelerator")]
        field = min(hits)[1] if hits else "init"
        return f"trainer.{field}: {text}"[:600]
    where = {"ckpt_path": "ckpt_path", "instantiate": "model/data"}.get(stage, "startup")
    return f"{where}: {type(err).__name__}: {text}"[:600]


def serve(argv: list[str]) -> int:
    """``python -m rlad_pl serve``: bad input ends in one line ``rlad_pl: error: <field>: <message>`` (exit code 2,
    like the training subcommands; ``--debug`` or ``RLAD_PL_DEBUG=1``: the traceback)."""
    from rlad_pl.rollout.launch import serve_main

    debug = "--debug" in argv or os.environ.get("RLAD_PL_DEBUG", "").lower() not in ("", "0", "false", "no")
    cut = argv.index("--") if "--" in argv else len(argv)
    argv = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    try:
        return serve_main(argv)
    except ConfigError as e:
        if debug:
            raise
        print(f"rlad_pl: error: {str(e).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None


def main(args: Optional[list[str]] = None, run: bool = True):
    """Entry point. ``args`` replaces ``sys.argv[1:]`` (tests call it in-process).

    Bad input ends in ONE line ``rlad_pl: error: <field>: <message>`` on stderr and exit code 2: every error while
    the CLI starts up (parsing, YAML, interpolation, instantiating model / data / trainer, checks), and any
    ``ConfigError`` raised later during training. Other errors during training keep their traceback. ``--debug``
    (or ``RLAD_PL_DEBUG=1``) re-raises with the full traceback instead.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    import jsonargparse

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_startup()
    debug = "--debug" in argv or os.environ.get("RLAD_PL_DEBUG", "").lower() not in ("", "0", "false", "no")
    stripped = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    # ``${model.student}`` in a YAML file is resolved after all files and command-line overrides are merged
    jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    state = {"stage": "parse", "started": False}
    try:
        from rlad_pl.training.datamodule import RolloutDataModule
        from rlad_pl.training.module import DistillationModule

        prog = "python -m rlad_pl" if sys.argv and sys.argv[0].endswith("__main__.py") else "rlad_pl"
        return _cli_class(state)(DistillationModule, RolloutDataModule,
                                 args=argv if args is not None or stripped else None, run=run,
                                 parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False, "prog": prog},
                                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001  (one line for bad input, see the docstring)
        if debug or (state["started"] and not any(isinstance(c, ConfigError) for c in _chain(e))):
            raise
        print(f"rlad_pl: error: {describe_error(e, state['stage'], argv)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
