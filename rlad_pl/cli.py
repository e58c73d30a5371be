"""``python -m rlad_pl {fit,validate,test} --config configs/X.yaml``: a ``LightningCLI`` over
``DistillationModule`` and ``RolloutDataModule``.

Configs are parsed in jsonargparse's ``omegaconf`` mode, so a YAML file can interpolate its own values, e.g.
``teacher_tokenizer: ${model.tokenizer}``. Defaults that on-policy training needs are set here: dataloaders reload
every epoch (one epoch = one rollout batch), no sanity validation, TensorBoard logs under ``runs/``, and the
``HFExport`` callback (``--export.*``) that writes a Hugging Face checkpoint of the student at the end of ``fit``.
Bad input ends in one line on stderr that names the field (exit code 2).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional

from rlad_pl.errors import ConfigError


def _cli_class():
    from lightning.pytorch.cli import LightningCLI

    from rlad_pl.callbacks import HFExport

    class RLADCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(HFExport, "export")
            parser.set_defaults({
                "trainer.reload_dataloaders_every_n_epochs": 1,
                "trainer.num_sanity_val_steps": 0,
                "trainer.log_every_n_steps": 1,
                "trainer.default_root_dir": "runs",
                "trainer.accelerator": "auto",
                "trainer.devices": 1,
            })

    return RLADCLI


#: what a class_path under each key must name, for error messages
_EXPECTED_CLASS = {"model.objectives": "an rlad_pl.objectives.Objective subclass, e.g. rlad_pl.objectives.GRPO",
                   "data.task": "an rlad_pl.data.Task subclass, e.g. rlad_pl.data.ReasoningGymTask",
                   "data.sampler": "an rlad_pl.rollout.Sampler subclass, e.g. rlad_pl.rollout.HFSampler",
                   "data.reward": "a callable (completion, problem) -> float"}


def _one_line(err: BaseException) -> str:
    """Condense a jsonargparse error to one line: ``<field>: <what is wrong> (<what was expected>)``."""
    text = str(err).strip()
    key = re.search(r'Parser key "([^"]+)"', text)
    field = key.group(1) if key else None
    bad_class = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", text)
    if field and bad_class:
        expected = _EXPECTED_CLASS.get(field, "an importable class")
        return f"{field}: cannot use class_path '{bad_class.group(1)}' ({bad_class.group(2).strip()}); expected {expected}"
    lines = [ln.strip().lstrip("- ") for ln in text.splitlines() if ln.strip()]
    details = [ln for ln in lines[1:] if not ln.startswith("Expected a path but")]
    if field and details:
        return f"{field}: {details[0]}"[:500]
    return (lines[0] if lines else type(err).__name__)[:500]


def main(args: Optional[list[str]] = None, run: bool = True):
    """Entry point. ``args`` replaces ``sys.argv[1:]`` (tests call it in-process)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from jsonargparse import ArgumentError

    from rlad_pl.data.datamodule import RolloutDataModule
    from rlad_pl.module import DistillationModule

    try:
        return _cli_class()(DistillationModule, RolloutDataModule, args=args, run=run,
                            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
                            save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    except ConfigError as e:
        print(f"rlad_pl: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except ArgumentError as e:
        cause = e.__cause__ or e.__context__
        while cause is not None and not isinstance(cause, ConfigError) and (cause.__cause__ or cause.__context__):
            cause = cause.__cause__ or cause.__context__
        msg = str(cause) if isinstance(cause, ConfigError) else _one_line(e)
        print(f"rlad_pl: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
