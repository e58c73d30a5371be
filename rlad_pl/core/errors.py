"""What reaches the user's screen: one exception type for bad user input (rendered by the CLI as a single line),
one-line warnings, and the third-party start-up lines a user cannot act on, silenced at their source."""

import os
import re


class ConfigError(ValueError):
    """Bad configuration or input. The message names the field and what was expected, on one line."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


_warned: set[str] = set()


def warn_once(field: str, message: str) -> None:
    """One line ``rlad_pl: warning: <field>: <message>`` on stderr (rank 0 only, once per field and process), for a
    setting that is legal but likely not what was meant."""
    import os
    import sys

    if field in _warned or os.environ.get("RANK", "0") not in ("0", ""):
        return
    _warned.add(field)
    print(f"rlad_pl: warning: {field}: {message}", file=sys.stderr)


#: Third-party warnings a user of rlad_pl cannot act on: ``(category, message regex[, module regex])`` for
#: ``warnings.filterwarnings`` (the message regex matches at its start, ignoring case; the module is the one the
#: warning is attributed to).
QUIET_WARNINGS = (
    # torch >= 2.10 deprecates ``LeafSpec``, which Lightning's own ``utilities/_pytree.py`` still builds
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # LightningCLI's own calls of jsonargparse APIs deprecated in jsonargparse 4.49 (shown where deprecations are
    # on, e.g. under pytest): scoped to warnings raised at a line of ``lightning/pytorch/cli.py``
    (DeprecationWarning, r"", r"lightning\.pytorch\.cli$"),
    # the frozen teacher / reference model (and a LoRA student's base) stay in eval mode by design
    (Warning, r"Found \d+ module\(s\) in eval mode at the start of training"),
    # rollouts are sampled in the training process; the dataloader only hands out the prepared micro-batches
    (Warning, r"The '\w+' does not have many workers which may be a bottleneck"),
    # one epoch is one rollout batch: ``log_every_n_steps`` counts optimizer steps across epochs, so logs appear
    (Warning, r"The number of training batches \(\d+\) is smaller than the logging interval"),
    # ``main(args)`` hands LightningCLI the command line itself (``--debug`` removed, or from Python / tests)
    (Warning, r"LightningCLI's args parameter is intended to run from within Python"),
    # vLLM's Triton dispatcher touches torch's deprecated ``reduce_op`` alias when it is imported
    (FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated"),
)

#: Third-party log records a user of rlad_pl cannot act on: logger name -> message regexes (``re.search``).
_TIP = r"^\W*Tip: .*(litlogger|litmodels|Lightning)"  # Lightning's advertising for its cloud services
QUIET_RECORDS = {
    "lightning.pytorch.utilities.rank_zero": (_TIP,),
    "lightning.fabric.utilities.rank_zero": (_TIP,),
    "pytorch_lightning.utilities.rank_zero": (_TIP,),
    "lightning_fabric.utilities.rank_zero": (_TIP,),
    # rlad_pl runs the engine in-process (its seeds are per request) and turns chunked prefill off on CPU
    "vllm.engine.arg_utils": (r"^The global random seed is set to",
                              r"does not officially support disabling chunked prefill"),
    # consequences of ``enforce_eager: true`` (asked for) and of a CPU build without Triton
    "vllm.config.vllm": (r"^Enforce eager set, disabling", r"^Inductor compilation was disabled by user settings",
                         r"^Model Runner V2 requires Triton"),
    "vllm.platforms.cpu": (r"^Reset SSM cache type",),
    # the sampler restores torch's thread count for training after the CPU worker binds its threads
    "vllm.v1.worker.cpu_worker": (r"doesn't allow to use `torch\.set_num_threads`",),
    # an in-place weight sync sends no rotary cache and no tied LM head (the sampler refreshes it); a real
    # mismatch shows in the mismatch/* metrics
    "vllm.model_executor.model_loader.reload.layerwise": (r"^(RotaryEmbedding|ParallelLMHead): Failed to load "
                                                          r"weights",),
    "vllm.triton_utils.importing": (r"^Triton is installed, but doesn't include CPU backend",),
}


class _DropRecords:
    """A ``logging`` filter that drops the records whose message matches one of ``patterns``."""

    def __init__(self, patterns):
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a malformed record is for logging to report)
            return True
        return not any(p.search(message) for p in self.patterns)


def quiet_startup() -> None:
    """Silence ``QUIET_WARNINGS`` and ``QUIET_RECORDS`` (idempotent), and vLLM's INFO lines unless
    ``VLLM_LOGGING_LEVEL`` is set. Every other warning and log line is left as it is."""
    import logging
    import warnings

    for category, message, *module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module[0] if module else "")
    for name, patterns in QUIET_RECORDS.items():
        logger = logging.getLogger(name)  # the logger vLLM / Lightning will use (filters survive dictConfig)
        for f in [f for f in logger.filters if isinstance(f, _DropRecords)]:
            logger.removeFilter(f)
        logger.addFilter(_DropRecords(patterns))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
