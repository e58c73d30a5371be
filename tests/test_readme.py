"""The documentation's commands run as written: every shell and YAML block of ``README.md`` and of every
``docs/**/*.md`` page is extracted and run briefly.

* ``python -m rlad_pl <subcommand> ...`` lines run in-process through the real CLI with the page's own arguments,
  followed by overrides that make them short (one rollout batch, a few prompts, a temporary output folder); lines
  that need a GPU, a launcher (``torchrun``, ``srun``) or the real model built by ``tools/build_real_model.py`` are
  checked with ``--print_config`` instead.
* ``python -m rlad_pl serve ...`` lines (also in a script, ``srun ... &``) build the server command they would run
  (``--print-only``); ``tests/test_serve_launcher.py`` runs one. Shell variable assignments are skipped.
* ``python tools/X.py ...`` lines: the tool exists and its ``--help`` parses.
* ``mkdocs build ...`` lines build the site strictly into a temporary folder.
* YAML blocks: each parses. A block whose first line is ``# configs/X.yaml (excerpt)`` must agree with that file
  (every key it shows, with the same value). Any other block is a fragment, layered on the config its first comment
  line names (``# layered on configs/X.yaml``) or, failing that, on the base that ``FRAGMENT_BASES`` gives, and
  trained one rollout batch, or checked with ``--print_config`` when that config needs a GPU or a server (a Python
  block of the same page section is written next to it as the module it names).
* Anything else (``pip``, ``tensorboard``, ``docker``...) must be listed in ``NOT_RUN`` with a reason, so a new kind of
  command cannot slip in untested.

A command that appears on several pages runs once, where it first appears (the README, then ``docs/`` in order).
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
DOC_FILES = [README, *sorted((REPO / "docs").rglob("*.md"))]

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
    "curl": "asks a running server (tests/test_serve_launcher.py starts one and asks it)",
    "until": "shell loop waiting for a server",
    "ruff": "linter: CI (.ci/run) runs it on the whole tree",
    "bash": "tools/gpu_check.sh needs a GPU (tests/test_gpu_check.py runs its --cpu --tiny mode); "
            "tools/fetch_gpu_wheels.sh downloads from PyPI",
}
#: a YAML fragment without a ``# layered on configs/X.yaml`` line (recognised by a substring) -> its base config
FRAGMENT_BASES = {
    "my_objectives.SampledReverseKL": "configs/opd_tiny.yaml",
    "rlad_pl.rollout.vllm.VLLMSampler": "configs/grpo_tiny.yaml",
    "rlad_pl.teacher.VLLMTeacher": "configs/trrd_tiny.yaml",
    "lora:": "configs/opsd_tiny.yaml",
}
#: makes any fit short; appended after the page's own arguments (the last value wins); one optimizer step per
#: rollout batch, since 2 prompts may not split into a config's own number of steps
SHORT = ["--trainer.max_epochs", "1", "--data.prompts_per_rollout", "2", "--data.steps_per_rollout", "1",
         "--data.val_prompts", "4", "--data.val_k", "2", "--data.pass_k", "[1, 2]", "--data.val_batch_prompts", "4"]
#: commands checked with --print_config only: a GPU, the real model (tools/build_real_model.py builds it once;
#: tests/test_real_model.py trains it), or a running rollout server (tests/test_server_sampler.py fits through one)
CHECK_ONLY = re.compile(r"accelerator gpu|devices [2-9]|ModelParallelStrategy|gpu_qwen3|own_model_trrd|smollm2|"
                        r"server_demo|_server\.yaml")
LAYERED_ON = re.compile(r"^#\s*layered on\s+(configs/[\w.-]+\.yaml)")
EXCERPT_OF = re.compile(r"^#\s*(configs/[\w.-]+\.yaml)\s+\(excerpt\)")


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def blocks(path: Path, lang: str) -> list[tuple[int, str, str]]:
    """``(line number, section heading, text)`` of each fenced block of ``lang`` in the page ``path``."""
    out, section, cur, start, fence = [], "", None, 0, None
    for i, line in enumerate(path.read_text().splitlines(), 1):
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


def shell_commands(path: Path) -> list[tuple[int, str]]:
    """Logical shell lines of the page's bash blocks (continuations joined, comments dropped)."""
    cmds = []
    for start, _, text in blocks(path, "bash"):
        joined = re.sub(r"\\\n\s*", " ", text)
        for j, line in enumerate(joined.splitlines()):
            line = line.split("  #")[0].strip() if not line.startswith("#SBATCH") else line.strip()
            if line and not (line.startswith("#") and not line.startswith("#SBATCH")):
                cmds.append((start + j + 1, line))
    return cmds


def write_named_blocks(path: Path, folder: Path) -> dict[str, Path]:
    """Write every YAML / Python block of the page whose first line is ``# <file name>`` into ``folder``."""
    files = {}
    for lang, suffix in (("yaml", ".yaml"), ("python", ".py")):
        for _, _, text in blocks(path, lang):
            m = re.match(r"#\s*([\w.-]+" + re.escape(suffix) + r")\b", text)
            if m:
                files[m.group(1)] = folder / m.group(1)
                files[m.group(1)].write_text(text)
    return files


def _all_commands() -> list[tuple[str, int, str]]:
    seen, out = set(), []
    for path in DOC_FILES:
        for lineno, command in shell_commands(path):
            if command not in seen:
                seen.add(command)
                out.append((rel(path), lineno, command))
    return out


def _cli_args(words: list[str]) -> list[str]:
    i = words.index("rlad_pl")
    return words[i + 1:]


def _run_brief(args: list[str], tmp_path: Path, check_only: bool) -> None:
    sub = args[0]
    if sub == "serve":  # would start a server: the command it prints is built (tests/test_serve_launcher.py runs it)
        assert run_cli(*[a for a in args if a != "--print-only"], "--print-only") == 0
        return
    if check_only:
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


def _mkdocs_build(words: list[str], where: str, tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="pip install mkdocs mkdocs-material")
    args, skip = [], False
    for w in words[2:]:  # drop the page's own output folder: the site goes to tmp_path
        if skip:
            skip = False
        elif w in ("-d", "--site-dir"):
            skip = True
        elif not w.startswith(("--site-dir=", "-d=")):
            args.append(w)
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", *args, "-d", str(tmp_path / "site")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, f"{where}: `{' '.join(words)}` failed:\n{out.stderr[-3000:]}"


COMMANDS = _all_commands()


def test_readme_has_commands():
    readme = [c for f, _, c in COMMANDS if f == "README.md"]
    assert len(readme) >= 10, readme
    assert any(c.startswith("python -m rlad_pl fit") for c in readme)
    assert any(c.startswith("mkdocs build") for _, _, c in COMMANDS), "no page shows how to build the docs"


def _nav_files(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [f for v in nav.values() for f in _nav_files(v)]
    return [f for item in nav or [] for f in _nav_files(item)]


def test_every_docs_page_is_in_the_mkdocs_nav():
    cfg = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = set(_nav_files(cfg["nav"]))
    pages = {p.relative_to(REPO / cfg.get("docs_dir", "docs")).as_posix() for p in DOC_FILES[1:]}
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


@pytest.mark.slow
@pytest.mark.parametrize("page,lineno,command", COMMANDS, ids=[f"{f}:L{n}" for f, n, _ in COMMANDS])
def test_readme_shell_command(page, lineno, command, tmp_path, monkeypatch):
    where = f"{page} line {lineno}"
    words = shlex.split(command)
    if words[-1] == "&":  # started in the background in a script
        words = words[:-1]
    if re.match(r"^[A-Za-z_]\w*=", words[0]):
        pytest.skip(f"{where}: shell variable")
    if words[0] in NOT_RUN:
        pytest.skip(f"{where}: {NOT_RUN[words[0]]}")
    if words[:2] == ["python", "-c"] and "load_dataset" in command:
        pytest.skip(f"{where}: downloads a dataset from the hub (tests/test_own_model_config.py runs the config's "
                    "data section on files in the same layout)")
    if words[0] == "mkdocs":
        if words[1:2] != ["build"]:
            pytest.skip(f"{where}: `mkdocs {' '.join(words[1:2])}` starts a server (`mkdocs build` is run)")
        _mkdocs_build(words, where, tmp_path)
        return
    if "rlad_pl" in words and ("-m" in words or words[0] == "rlad_pl"):
        monkeypatch.chdir(REPO)
        files = write_named_blocks(REPO / page, tmp_path)  # `# my_objective.yaml` / `# my_objectives.py` blocks
        monkeypatch.syspath_prepend(str(tmp_path))
        words = [str(files[w]) if w in files else w for w in words]
        launcher = words[0] in ("torchrun", "srun")
        _run_brief(_cli_args(words), tmp_path, check_only=launcher or bool(CHECK_ONLY.search(command)))
        return
    if words[0] == "python" and words[1].startswith("tools/"):
        tool = REPO / words[1]
        assert tool.is_file(), f"{where}: {words[1]} does not exist"
        out = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, cwd=REPO,
                             timeout=300)
        assert out.returncode == 0, f"{where}: {words[1]} --help failed:\n{out.stderr[-2000:]}"
        return
    if words[0] == "python" and words[1] == "-m" and words[2] == "pytest":
        return  # the command running this very test
    pytest.fail(f"{where}: `{command}` is neither run by this test nor listed in NOT_RUN")


YAML_BLOCKS = [(rel(path), n, section, text) for path in DOC_FILES for n, section, text in blocks(path, "yaml")]


def _agrees(shown, actual, key: str) -> list[str]:
    """Differences between an excerpt's value and the file's (dicts: every key shown; lists: item by item)."""
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return [f"{key}: the file has {actual!r}"]
        return [d for k, v in shown.items()
                for d in ([f"{key}.{k}: not in the file"] if k not in actual else _agrees(v, actual[k], f"{key}.{k}"))]
    if isinstance(shown, list):
        if not isinstance(actual, list) or len(actual) != len(shown):
            return [f"{key}: the file has {actual!r}"]
        return [d for i, (s, a) in enumerate(zip(shown, actual)) for d in _agrees(s, a, f"{key}[{i}]")]
    return [] if shown == actual else [f"{key}: shown {shown!r}, the file has {actual!r}"]


@pytest.mark.slow
@pytest.mark.parametrize("page,lineno,section,text", YAML_BLOCKS, ids=[f"{f}:L{n}" for f, n, _, _ in YAML_BLOCKS])
def test_readme_yaml_block(page, lineno, section, text, tmp_path, monkeypatch):
    where = f"{page} line {lineno}"
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict), f"{where}: a YAML block must be a mapping"
    first = text.lstrip().splitlines()[0]
    excerpt = EXCERPT_OF.match(first)
    if excerpt:
        config = REPO / excerpt.group(1)
        assert config.is_file(), f"{where}: {excerpt.group(1)} does not exist"
        diffs = _agrees(doc, yaml.safe_load(config.read_text()), excerpt.group(1))
        assert not diffs, f"{where}: the excerpt disagrees with the file:\n" + "\n".join(diffs)
        return
    layered = LAYERED_ON.match(first)
    base = layered.group(1) if layered else next((b for key, b in FRAGMENT_BASES.items() if key in text), None)
    if base is None:
        pytest.fail(f"{where}: YAML block in '{section}' names no base config (first line "
                    "`# layered on configs/X.yaml`, or `# configs/X.yaml (excerpt)`)")
    assert (REPO / base).is_file(), f"{where}: {base} does not exist"
    if "VLLMSampler" in text or "VLLMTeacher" in text:
        pytest.importorskip("vllm")
    frag = tmp_path / "fragment.yaml"
    frag.write_text(text)
    for _, sec, code in blocks(REPO / page, "python"):
        m = re.match(r"#\s*(\w+)\.py", code)
        if sec == section and m:
            (tmp_path / f"{m.group(1)}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(REPO)
    if CHECK_ONLY.search(base):  # a GPU or a running server: the layered config parses
        with pytest.raises(SystemExit) as exc:
            run_cli("fit", "--config", base, "--config", str(frag), "--print_config")
        assert exc.value.code in (0, None)
        return
    run_cli("fit", "--config", base, "--config", str(frag), *SHORT, "--trainer.default_root_dir",
            str(tmp_path / "runs"), "--export.dirpath", str(tmp_path / "export"))
