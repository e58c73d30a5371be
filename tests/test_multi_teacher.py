"""Named teachers (``model.teachers``): each row is scored by the teacher its problem routes to (sampled-token
log-probs, and the top-k of the full-vocabulary objectives with ``teacher_top_k``); one teacher in the map gives
today's losses exactly; routing mistakes and what several teachers cannot serve are one line before compute."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFIGS, run_cli, scalars
from rlad_pl.core.batch import RolloutBatch, build_sequences
from rlad_pl.core.errors import ConfigError
from rlad_pl.core.logprobs import response_logprobs
from rlad_pl.models.loading import load_causal_lm, load_tokenizer
from rlad_pl.objectives import GRPO, ForwardKL, OPDSampled, ReverseKL
from rlad_pl.pipeline import Annotator
from rlad_pl.teacher import LocalTeacher
from rlad_pl.teacher.routes import RoutedTeachers, TeacherRoute
from rlad_pl.training.models import routed_teachers

STUDENT, TEACHER = "assets/tiny-student", "assets/tiny-teacher"


def _route(name, path, tok):
    backend = LocalTeacher()
    backend.model = load_causal_lm(path, "model.teacher", trainable=False)
    return TeacherRoute(name, backend, tok, model=backend.model)


def _routed_batch(tok, teacher_ids=(0, 1, 1, 0, 1, 0)):
    """Six rows of random prompts / responses of different lengths, routed by ``teacher_ids``."""
    g = torch.Generator().manual_seed(0)
    prompts = [[tok.bos_token_id] + torch.randint(3, 12, (2 + i % 3,), generator=g).tolist() for i in range(6)]
    responses = [torch.randint(3, 12, (1 + (2 * i) % 5,), generator=g).tolist() for i in range(6)]
    ids, mask, P, rmask = build_sequences(prompts, responses, tok.pad_token_id)
    return RolloutBatch(ids, mask, P, rmask, torch.zeros(6), torch.zeros(6), torch.arange(6),
                        teacher_ids=None if teacher_ids is None else torch.tensor(teacher_ids))


def test_routed_logprobs_equal_each_teachers_own():
    tok = load_tokenizer(STUDENT)
    routes = {"a": _route("a", TEACHER, tok), "b": _route("b", STUDENT, tok)}
    batch = _routed_batch(tok)
    ids, mask, P, rmask = batch.input_ids, batch.attention_mask, batch.prompt_len, batch.response_mask
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


def test_routed_top_k_equals_each_teachers_own_top_k():
    """``RoutedTeachers.topk``: each row's top-k (ids, log-probs, tail) is its own teacher's on its rows; positions
    past a teacher's longest response hold a finite empty distribution; a batch of one teacher is its own result."""
    tok = load_tokenizer(STUDENT)
    routes = [_route("a", TEACHER, tok), _route("b", STUDENT, tok)]
    routed, V, k = RoutedTeachers(routes), len(tok), 4
    kw = dict(k=k, temperature=0.7, chunk_size=3, vocab_size=V)
    batch = _routed_batch(tok)
    got = routed.topk(batch, **kw)
    assert got.ids.shape == (6, batch.response_len, k) and got.tail.shape == (6, batch.response_len)
    m = batch.response_mask.bool()
    for j, route in enumerate(routes):
        rows = batch.teacher_ids == j
        want = route.scorer.topk(batch.select(rows.nonzero().flatten()), **kw)
        mr = m[rows]
        assert torch.equal(got.ids[rows][mr], want.ids[mr]), route.name
        torch.testing.assert_close(got.logprobs[rows][mr], want.logprobs[mr], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.tail[rows][mr], want.tail[mr], atol=1e-5, rtol=1e-5)
    for t in (got.logprobs, got.tail, got.buckets()):
        assert torch.isfinite(t).all()
    # the two teachers differ, so a wrong routing could not pass
    a, b = (r.scorer.topk(batch, **kw) for r in routes)
    assert (a.logprobs - b.logprobs)[m].abs().max() > 0.1
    # one teacher for every row (or no teacher_ids and one route): that teacher's own result, exactly
    for one, ids in ((routed, (1,) * 6), (RoutedTeachers(routes[:1]), None)):
        whole = one.topk(_routed_batch(tok, ids), **kw)
        own = (b if ids else a)
        assert all(torch.equal(x, y) for x, y in zip((whole.ids, whole.logprobs, whole.tail),
                                                     (own.ids, own.logprobs, own.tail)))
    with pytest.raises(ValueError, match="without teacher_ids"):
        routed.topk(_routed_batch(tok, None), **kw)
    with pytest.raises(NotImplementedError, match="teacher_top_k"):
        routed.hidden(batch)


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
    with pytest.raises(ConfigError, match=r"^model\.teachers: ReverseKL with several teachers need "
                                          r"\['teacher_hidden'\].*set the objective's teacher_top_k: k") as e:
        _module(objectives=[ReverseKL()], teachers=two)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^model\.teachers: ForwardKL with several teachers: .*teacher "
                                          r"responses need one teacher \(model\.teacher\)"):
        _module(objectives=[ForwardKL(prefix_source="teacher", teacher_top_k=4)], teachers=two)
    # a teacher with another tokenizer: its top-k is over another vocabulary, which cannot be compared
    with pytest.raises(ConfigError, match=r"^model\.teachers\.b: teacher and student vocabularies differ.*"
                                          r"ForwardKL need \['teacher_topk'\]: distributions over one shared "
                                          r"vocabulary") as e:
        _module(objectives=[ForwardKL(teacher_top_k=4)],
                teachers={"a": {"model": TEACHER}, "b": {"model": "assets/demo-teacher-bpe"}})
    assert "\n" not in str(e.value)
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


TOPK_FKL = "[{class_path: rlad_pl.objectives.ForwardKL, init_args: {teacher_top_k: 4}}]"


def test_one_teacher_map_with_a_top_k_objective_gives_todays_losses_exactly(tmp_path):
    one = _fit(tmp_path, "one", "--model.objectives", TOPK_FKL)
    named = _fit(tmp_path, "named", "--model.objectives", TOPK_FKL, "--model.teacher", "null", "--model.teachers",
                 json.dumps({"only": {"model": "assets/tiny-teacher"}}))
    assert isinstance(named.model.loss_teacher, RoutedTeachers) and "teacher_topk" in named.model.plan.inputs
    for tag in ("train/loss", "forwardkl/loss", "forwardkl/tail_mass", "rollout/reward_mean", "train/grad_norm"):
        assert scalars(one.trainer.log_dir, tag) == scalars(named.trainer.log_dir, tag), tag


def test_two_teachers_serve_a_top_k_objective(tmp_path):
    """``configs/multi_teacher_tiny.yaml`` with ForwardKL over the top-4: the fit logs finite losses, and the loss's
    teacher top-k of a mixed micro-batch is each row's own teacher's."""
    import math

    from rlad_pl.testing.runs import read_scalars

    cli = run_cli("fit", "--config", str(CONFIGS / "multi_teacher_tiny.yaml"), "--trainer.max_epochs", "2",
                  "--trainer.default_root_dir", str(tmp_path), "--export.enabled", "false",
                  "--trainer.check_val_every_n_epoch", "100", "--model.objectives", TOPK_FKL)
    model = cli.model
    assert model._routed == ["even", "odd"] and len(model.teachers) == 2
    assert [r.name for r in model.loss_teacher.routes] == model._routed
    s = read_scalars(cli.trainer.log_dir)
    for tag in ("train/loss", "forwardkl/loss", "forwardkl/divergence", "forwardkl/tail_mass"):
        assert len(s[tag]) == 2 and all(math.isfinite(v) for _, v in s[tag]), tag
    assert all(len(s[f"rollout/teacher/{t}/reward_mean"]) == 2 for t in model._routed)
    batch = _routed_batch(model.tokenizer)
    with torch.no_grad():
        got = model.student_outputs(batch).teacher_topk
    m = batch.response_mask.bool()
    for j, name in enumerate(model._routed):
        rows = batch.teacher_ids == j
        want = model.routes[name].scorer.topk(batch.select(rows.nonzero().flatten()), k=4,
                                              temperature=model.temperature, chunk_size=model.chunk_size,
                                              vocab_size=model.vocab_size)
        assert torch.equal(got.ids[rows][m[rows]], want.ids[m[rows]]), name
        torch.testing.assert_close(got.logprobs[rows][m[rows]], want.logprobs[m[rows]], atol=1e-5, rtol=1e-5)


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
