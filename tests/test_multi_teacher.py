"""Named teachers (``model.teachers``): each row is scored by the teacher its problem routes to; one teacher in the
map gives today's losses exactly; routing mistakes are one line before compute."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFIGS, run_cli, scalars
from rlad_pl.core.batch import RolloutBatch, build_sequences
from rlad_pl.core.errors import ConfigError
from rlad_pl.core.logprobs import response_logprobs
from rlad_pl.models.loading import load_causal_lm, load_tokenizer
from rlad_pl.objectives import GRPO, OPDSampled, ReverseKL
from rlad_pl.pipeline import Annotator
from rlad_pl.teacher import LocalTeacher
from rlad_pl.teacher.routes import TeacherRoute
from rlad_pl.training.models import routed_teachers

STUDENT, TEACHER = "assets/tiny-student", "assets/tiny-teacher"


def _route(name, path, tok):
    backend = LocalTeacher()
    backend.model = load_causal_lm(path, "model.teacher", trainable=False)
    return TeacherRoute(name, backend, tok, model=backend.model)


def test_routed_logprobs_equal_each_teachers_own():
    tok = load_tokenizer(STUDENT)
    routes = {"a": _route("a", TEACHER, tok), "b": _route("b", STUDENT, tok)}
    g = torch.Generator().manual_seed(0)
    prompts = [[tok.bos_token_id] + torch.randint(3, 12, (2 + i % 3,), generator=g).tolist() for i in range(6)]
    responses = [torch.randint(3, 12, (1 + (2 * i) % 5,), generator=g).tolist() for i in range(6)]
    ids, mask, P, rmask = build_sequences(prompts, responses, tok.pad_token_id)
    batch = RolloutBatch(ids, mask, P, rmask, torch.zeros(6), torch.zeros(6), torch.arange(6),
                         teacher_ids=torch.tensor([0, 1, 1, 0, 1, 0]))
    ann = Annotator(routes["a"].model, frozenset({"teacher_logprobs"}), routes=routes, vocab_size=len(tok),
                    batch_size=4)
    stats = ann.annotate(batch, need_old=False)
    m = rmask.bool()
    for k, name in enumerate(routes):
        rows = batch.teacher_ids == k
        with torch.no_grad():
            want, _ = response_logprobs(routes[name].model, ids[rows], mask[rows], P)
        torch.testing.assert_close(batch.teacher_logprobs[rows][m[rows]], want[m[rows]], atol=1e-5, rtol=1e-5)
        assert stats[f"teacher/{name}/sequences"] == 3.0
    # the two teachers differ, so a wrong routing could not pass
    with torch.no_grad():
        a, _ = response_logprobs(routes["a"].model, ids, mask, P)
        b, _ = response_logprobs(routes["b"].model, ids, mask, P)
    assert (a - b)[m].abs().max() > 0.1


def test_routing_checks():
    routes = {"math": None, "code": None}
    assert routed_teachers(routes, {"math", "code"}, None, "data.task") == ["math", "code"]
    assert routed_teachers(routes, None, None, "data.task") == ["math", "code"]  # unknown up front: all
    assert routed_teachers({"math": None}, set(), None, "data.task") == ["math"]  # no routing: the only one
    with pytest.raises(ConfigError, match=r"^data\.task: problems route to teacher 'chem', which model\.teachers"):
        routed_teachers(routes, {"math", "chem"}, None, "data.task")
    with pytest.raises(ConfigError, match=r"^model\.teachers\.code: no problem routes to it"):
        routed_teachers(routes, {"math"}, None, "data.task")
    with pytest.raises(ConfigError, match=r"^model\.default_teacher: the task routes no problem"):
        routed_teachers(routes, set(), None, "data.task")
    with pytest.raises(ConfigError, match=r"^model\.default_teacher: 'bio' is not in model\.teachers"):
        routed_teachers(routes, {"math"}, "bio", "data.task")


def _module(**kw):
    from rlad_pl.training.module import DistillationModule

    return DistillationModule(student=STUDENT, **kw)


def test_one_line_errors_before_any_model_loads():
    two = {"a": {"model": TEACHER}, "b": {"model": STUDENT}}
    with pytest.raises(ConfigError, match=r"^model\.teachers: .*not both"):
        _module(objectives=[OPDSampled()], teacher=TEACHER, teachers=two)
    with pytest.raises(ConfigError, match=r"^model\.teachers: ReverseKL with several teachers: routed teachers "
                                          r"serve sampled-token objectives"):
        _module(objectives=[ReverseKL()], teachers=two)
    with pytest.raises(ConfigError, match=r"^model\.teachers: GRPO use no teacher"):
        _module(objectives=[GRPO()], teachers=two)
    with pytest.raises(ConfigError, match=r"^model\.teachers\.b: expected model, tokenizer"):
        _module(objectives=[OPDSampled()], teachers={"a": {"model": TEACHER}, "b": {"path": STUDENT}})
    with pytest.raises(ConfigError, match=r"^model\.teachers\.b\.model: "):
        _module(objectives=[OPDSampled()], teachers={"a": {"model": TEACHER}, "b": {"model": "no/such-model"}})
    from rlad_pl.teacher import VLLMTeacher

    pytest.importorskip("vllm")
    with pytest.raises(ConfigError, match=r"^model\.teachers\.a\.backend: ReverseKL needs \['teacher_hidden'\]"):
        _module(objectives=[ReverseKL()], teachers={"a": {"model": TEACHER, "backend": VLLMTeacher()}})


def _fit(tmp_path, name, *args):
    cli = run_cli("fit", "--config", str(CONFIGS / "trrd_tiny.yaml"), "--trainer.max_epochs", "2",
                  "--trainer.default_root_dir", str(tmp_path / name), "--export.enabled", "false",
                  "--trainer.check_val_every_n_epoch", "100", *args)
    return cli


def test_one_teacher_map_gives_todays_losses_exactly(tmp_path):
    one = _fit(tmp_path, "one")
    named = _fit(tmp_path, "named", "--model.teacher", "null", "--model.teachers",
                 json.dumps({"only": {"model": "assets/tiny-teacher"}}))
    assert list(named.model.routes) == ["only"] and len(named.model.teachers) == 1
    for tag in ("train/loss", "trrd/loss", "rollout/reward_mean", "train/grad_norm"):
        assert scalars(one.trainer.log_dir, tag) == scalars(named.trainer.log_dir, tag), tag


def test_multi_teacher_config_routes_by_its_column(tmp_path):
    """``configs/multi_teacher_tiny.yaml``: rows go to ``even`` / ``odd`` by their ``teacher`` column; both teachers
    score, the per-teacher metrics add up to the batch."""
    import math

    from rlad_pl.testing.runs import read_scalars

    cli = run_cli("fit", "--config", str(CONFIGS / "multi_teacher_tiny.yaml"), "--trainer.max_epochs", "2",
                  "--trainer.default_root_dir", str(tmp_path), "--export.enabled", "false",
                  "--trainer.check_val_every_n_epoch", "100")
    assert cli.model._routed == ["even", "odd"] and len(cli.model.teachers) == 2
    s = read_scalars(cli.trainer.log_dir)
    for step in range(2):
        n = sum(s[f"teacher/{t}/sequences"][step][1] for t in ("even", "odd"))
        assert n == 64  # 8 prompts x 8 samples, every row scored by its own teacher
    assert all(math.isfinite(v) for _, v in s["train/loss"])
    problems = cli.datamodule.task.problems("train", 8)
    assert {p.teacher for p in problems} == {"even", "odd"}
    assert all(p.teacher == ("even" if int(p.answer.split("####")[-1]) % 2 == 0 else "odd") for p in problems)
