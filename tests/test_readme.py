"""The README's commands run as written: every shell and YAML block is extracted and run briefly.

* ``python -m rlad_pl <subcommand> ...`` lines run in-process through the real CLI with the README's own arguments,
  followed by overrides that make them short (one rollout batch, a few prompts, a temporary output folder); lines
  that need a GPU or a launcher (``torchrun``, ``srun``) are checked with ``--print_config`` instead.
* ``python tools/X.py ...`` lines: the tool exists and its ``--help`` parses.
* YAML blocks: each parses; a fragment is layered on the base config named in ``FRAGMENT_BASES`` and trained one
  rollout batch (a Python block in the same section is written next to it as the module it names).
* Anything else (``pip``, ``tensorboard``, ``docker``...) must be listed in ``NOT_RUN`` with a reason, so a new kind of
  command cannot slip in untested.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli

README = REPO / "README.md"

#: first words of shell lines that are not run here, and why
NOT_RUN = {
    "pip": "installs packages (CI installs them)",
    "tensorboard": "starts a server (tools/render_tensorboard.py checks the page)",
    "docker": "no Docker engine on CI (the Dockerfile is linted)",
    "#SBATCH": "SLURM directive",
    "export": "environment setting",
    "cd": "directory change",
    "git": "clone",
    "huggingface-cli": "hub login / download (no hub here)",
    "hf": "hub login / download (no hub here)",
    "vllm": "starts a server",
    "bash": "tools/gpu_check.sh needs a GPU (tests/test_gpu_check.py runs its --cpu --tiny mode); "
            "tools/fetch_gpu_wheels.sh downloads from PyPI",
}
#: a YAML fragment (recognised by a substring) -> the config it is layered on (as the README says)
FRAGMENT_BASES = {
    "my_objectives.SampledReverseKL": "configs/opd_tiny.yaml",
    "rlad_pl.rollout.vllm.VLLMSampler": "configs/grpo_tiny.yaml",
    "rlad_pl.teacher.VLLMTeacher": "configs/trrd_tiny.yaml",
    "lora:": "configs/opsd_tiny.yaml",
}
#: makes any fit short; appended after the README's own arguments (the last value wins)
SHORT = ["--trainer.max_epochs", "1", "--data.prompts_per_rollout", "2", "--data.val_prompts", "4",
         "--data.val_k", "2", "--data.pass_k", "[1, 2]", "--data.val_batch_prompts", "4"]
NEEDS_GPU = re.compile(r"accelerator gpu|devices [2-9]|ModelParallelStrategy|gpu_qwen3|own_model_trrd")


def blocks(lang: str) -> list[tuple[int, str, str]]:
    """``(line number, section heading, text)`` of each fenced block of ``lang`` in the README."""
    out, section, cur, start, fence = [], "", None, 0, None
    for i, line in enumerate(README.read_text().splitlines(), 1):
        if cur is None and line.startswith("#"):
            section = line.lstrip("# ").strip()
        m = re.match(r"^```(\w*)\s*$", line)
        if m and cur is None:
            cur, start, fence = [], i, m.group(1)
        elif line.startswith("```") and cur is not None:
            if fence == lang:
                out.append((start, section, "\n".join(cur)))
            cur = None
        elif cur is not None:
            cur.append(line)
    return out


def shell_commands() -> list[tuple[int, str]]:
    """Logical shell lines of the README's bash blocks (continuations joined, comments dropped)."""
    cmds = []
    for start, _, text in blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", text)
        for j, line in enumerate(joined.splitlines()):
            line = line.split("  #")[0].strip() if not line.startswith("#SBATCH") else line.strip()
            if line and not (line.startswith("#") and not line.startswith("#SBATCH")):
                cmds.append((start + j + 1, line))
    return cmds


def write_named_blocks(folder: Path) -> dict[str, Path]:
    """Write every YAML / Python block whose first line is ``# <file name>`` into ``folder``; name -> path."""
    files = {}
    for lang, suffix in (("yaml", ".yaml"), ("python", ".py")):
        for _, _, text in blocks(lang):
            m = re.match(r"#\s*([\w.-]+" + re.escape(suffix) + r")\b", text)
            if m:
                files[m.group(1)] = folder / m.group(1)
                files[m.group(1)].write_text(text)
    return files


def _cli_args(words: list[str]) -> list[str]:
    i = words.index("rlad_pl")
    return words[i + 1:]


def _run_brief(args: list[str], tmp_path: Path, gpu: bool) -> None:
    sub = args[0]
    if gpu:
        args = [a for a in args if a not in ("--print_config",)]
        with pytest.raises(SystemExit) as exc:
            run_cli(*args, "--print_config")
        assert exc.value.code in (0, None)
        return
    if "--print_config" in args:
        with pytest.raises(SystemExit) as exc:
            run_cli(*args)
        assert exc.value.code in (0, None)
        return
    extra = SHORT if sub == "fit" else ["--data.val_prompts", "4", "--data.val_k", "2", "--data.pass_k", "[1, 2]"]
    run_cli(*args, *extra, "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--export.dirpath", str(tmp_path / "export"))


COMMANDS = shell_commands()


def test_readme_has_commands():
    assert len(COMMANDS) >= 10, COMMANDS
    assert any(c.startswith("python -m rlad_pl fit") for _, c in COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("lineno,command", COMMANDS, ids=[f"L{n}" for n, _ in COMMANDS])
def test_readme_shell_command(lineno, command, tmp_path, monkeypatch):
    words = shlex.split(command)
    if words[0] in NOT_RUN:
        pytest.skip(f"README line {lineno}: {NOT_RUN[words[0]]}")
    if words[:2] == ["python", "-c"] and "load_dataset" in command:
        pytest.skip(f"README line {lineno}: downloads a dataset from the hub (tests/test_own_model_config.py "
                    "runs the config's data section on files in the same layout)")
    if "rlad_pl" in words and ("-m" in words or words[0] == "rlad_pl"):
        monkeypatch.chdir(REPO)
        files = write_named_blocks(tmp_path)  # `# my_objective.yaml` / `# my_objectives.py` blocks, as files
        monkeypatch.syspath_prepend(str(tmp_path))
        words = [str(files[w]) if w in files else w for w in words]
        launcher = words[0] in ("torchrun", "srun")
        _run_brief(_cli_args(words), tmp_path, gpu=launcher or bool(NEEDS_GPU.search(command)))
        return
    if words[0] == "python" and words[1].startswith("tools/"):
        tool = REPO / words[1]
        assert tool.is_file(), f"README line {lineno}: {words[1]} does not exist"
        out = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, cwd=REPO,
                             timeout=300)
        assert out.returncode == 0, f"README line {lineno}: {words[1]} --help failed:\n{out.stderr[-2000:]}"
        return
    if words[0] == "python" and words[1] == "-m" and words[2] == "pytest":
        return  # the command running this very test
    pytest.fail(f"README line {lineno}: `{command}` is neither run by this test nor listed in NOT_RUN")


YAML_BLOCKS = blocks("yaml")


@pytest.mark.slow
@pytest.mark.parametrize("lineno,section,text", YAML_BLOCKS, ids=[f"L{n}" for n, _, _ in YAML_BLOCKS])
def test_readme_yaml_block(lineno, section, text, tmp_path, monkeypatch):
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict), f"README line {lineno}: a YAML block must be a mapping"
    base = next((b for key, b in FRAGMENT_BASES.items() if key in text), None)
    if base is None:
        pytest.fail(f"README line {lineno}: YAML block in '{section}' has no base config in FRAGMENT_BASES")
    if "VLLMSampler" in text or "VLLMTeacher" in text:
        pytest.importorskip("vllm")
    frag = tmp_path / "fragment.yaml"
    frag.write_text(text)
    for _, sec, code in blocks("python"):
        m = re.match(r"#\s*(\w+)\.py", code)
        if sec == section and m:
            (tmp_path / f"{m.group(1)}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(REPO)
    run_cli("fit", "--config", base, "--config", str(frag), *SHORT, "--trainer.default_root_dir",
            str(tmp_path / "runs"), "--export.dirpath", str(tmp_path / "export"))
