"""Shared test helpers: run the CLI in-process and read TensorBoard event files (``rlad_pl.testing.runs``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rlad_pl.testing import runs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

torch.set_num_threads(min(2, os.cpu_count() or 1))

#: Markers of the tests that the plain ``python -m pytest -q`` leaves out (``--full`` runs them): vLLM engines, long
#: CLI fits, multi-process runs and the real SmolLM2 model. The plain command is the fast tier: unit tests, short runs.
FULL_ONLY = ("slow", "vllm", "real_model", "distributed")


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help=f"run every test; without it the tests marked {', '.join(FULL_ONLY)} are deselected "
                          "(also run when named by node id or chosen with -m)")


def pytest_collection_modifyitems(config, items):
    """Without ``--full``, deselect the tests marked with one of ``FULL_ONLY`` (not skip: they are not counted as
    skipped). A ``-m`` expression, or a test named by its node id (``file.py::test``), overrides the tier."""
    if config.getoption("--full") or config.option.markexpr:
        return
    named = []
    for arg in config.args:
        if "::" in arg:
            path, rest = arg.split("::", 1)
            try:
                path = Path(path).resolve().relative_to(config.rootpath).as_posix()
            except ValueError:
                pass
            named.append(f"{path}::{rest}")
    keep, left = [], []
    for item in items:
        full_only = any(item.get_closest_marker(m) for m in FULL_ONLY)
        (left if full_only and not any(item.nodeid.startswith(n) for n in named) else keep).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = keep
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"fast tier: {len(keep)} tests; {len(left)} marked {'/'.join(FULL_ONLY)} left for --full")


def make_batch(mask, advantages=None, rewards=None, **fields):
    """A ``RolloutBatch`` around a response mask (2 dummy prompt tokens; rewards / advantages default to 0)."""
    from rlad_pl.core.batch import RolloutBatch

    mask = torch.as_tensor(mask, dtype=torch.float32)
    n, r = mask.shape
    as_float = lambda x: torch.zeros(n) if x is None else torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
    return RolloutBatch(input_ids=torch.zeros(n, 2 + r, dtype=torch.long),
                        attention_mask=torch.ones(n, 2 + r, dtype=torch.long), prompt_len=2, response_mask=mask,
                        rewards=as_float(rewards), advantages=as_float(advantages), group_ids=torch.arange(n),
                        **fields)


def run_cli(*args: str):
    """``python -m rlad_pl ARGS`` in this process; returns the LightningCLI object."""
    import sys

    from rlad_pl.cli import main

    argv, sys.argv = sys.argv, ["rlad_pl"]
    try:
        return main(list(args))
    finally:
        sys.argv = argv


def event_accumulators(log_dir: str | Path) -> list:
    """One loaded ``EventAccumulator`` (all scalars and tensors kept) per TensorBoard event file under ``log_dir``."""
    accs = runs.event_accumulators(log_dir, tensors=True)
    assert accs, f"no TensorBoard event file under {log_dir}"
    return accs


def scalars(log_dir: str | Path, tag: str) -> list[float]:
    """Values of one scalar tag from the TensorBoard event files under ``log_dir`` (step order)."""
    assert runs.event_files(log_dir), f"no TensorBoard event file under {log_dir}"
    return runs.values(runs.read_scalars(log_dir), tag)


def assert_same_scalars(want: str | Path, got: str | Path, tags, n: int | None = None, rtol: float = 1e-4,
                        atol: float = 1e-6) -> None:
    """Every tag logged the same values (within ``rtol`` / ``atol``) in both runs, ``n`` of them when given."""
    for tag in tags:
        a, b = scalars(want, tag), scalars(got, tag)
        assert len(a) == len(b) and (n is None or len(a) == n), (tag, len(a), len(b))
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=rtol, atol=atol, msg=tag)


def text_tags(log_dir: str | Path) -> list[str]:
    return [t for ea in runs.event_accumulators(log_dir) for t in ea.Tags().get("tensors", [])]


@pytest.fixture
def tiny_dir(tmp_path):
    """A fresh tiny char-level student directory (random weights)."""
    from rlad_pl.testing.builders import save_tiny_model

    return save_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def server():
    """One vLLM OpenAI server on the tiny student for the module, with the gloo weight transfer and log-probs after
    temperature (``tests/test_server_sampler.py`` starts it; ~25 s)."""
    from test_server_sampler import ASSETS, RL_ARGS, free_port, start_server, stop_server, wait_ready

    port = free_port()
    proc = start_server(ASSETS / "tiny-student", port, *RL_ARGS)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        stop_server(proc)
