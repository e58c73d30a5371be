"""Tasks: reasoning-gym wrapper, JSONL + math-verify, reward callables, bad input."""

from __future__ import annotations

import json

import pytest

from rlad_pl.core.errors import ConfigError
from rlad_pl.data import ExactMatchReward, FormatAnswerReward, JSONLTask, Problem, ReasoningGymTask
from rlad_pl.data.tasks import extract_answer


def test_reasoning_gym_splits_difficulty_and_verifier():
    task = ReasoningGymTask("chain_sum", config={"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
                            answer_pattern=r"#\s*(\S+)\s*$", exact_match=True)
    train, val = task.problems("train", 20), task.problems("val", 20)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in val}) or len(train) == 20
    assert train[0].prompt != val[0].prompt
    p = val[0]
    assert p.difficulty.startswith("num_terms=") and ",num_digits=" in p.difficulty
    assert task.verify(f"some work #{p.answer}", p) == 1.0
    assert task.verify(f"some work #{p.answer}9", p) == 0.0
    assert task.verify("no answer", p) == 0.0
    # the dataset's own score_answer when exact_match is off
    loose = ReasoningGymTask("chain_sum", config={"min_terms": 2, "max_terms": 2}, answer_pattern=r"#(\S+)")
    q = loose.problems("val", 1)[0]
    assert loose.verify(f"#{q.answer}", q) == 1.0
    # offsets cycle deterministically
    assert task.problems("train", 2, offset=5)[0].prompt == task.problems("train", 6)[5].prompt


def test_reasoning_gym_bad_config():
    with pytest.raises(ConfigError, match=r"^data\.task\.dataset: unknown reasoning-gym dataset 'chain_sums'"):
        ReasoningGymTask("chain_sums")
    with pytest.raises(ConfigError, match=r"^data\.task\.config: invalid config for 'chain_sum'"):
        ReasoningGymTask("chain_sum", config={"no_such_option": 3})


def test_jsonl_task_math_verify(tmp_path):
    f = tmp_path / "train.jsonl"
    rows = [{"q": "What is 1/2 + 1/4?", "a": "3/4", "level": "easy"}, {"q": "Solve x+1=3.", "a": "2"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = JSONLTask(str(f), prompt_field="q", answer_field="a", difficulty_field="level",
                     prompt_template="{q} Put the answer in \\boxed{{}}.", shuffle_seed=None)
    p0, p1 = task.problems("train", 2)
    assert p0.prompt == "What is 1/2 + 1/4? Put the answer in \\boxed{}." and p0.difficulty == "easy"
    assert p1.difficulty is None
    assert task.verify("so the answer is \\boxed{0.75}", p0) == 1.0  # math-verify: 3/4 == 0.75
    assert task.verify("\\boxed{\\frac{3}{4}}", p0) == 1.0
    assert task.verify("\\boxed{2/3}", p0) == 0.0
    assert task.verify("\\boxed{2}", p1) == 1.0


def test_jsonl_malformed_line_names_line_number(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": \n')
    with pytest.raises(ConfigError, match=r"^data\.task\.train_path: .*bad\.jsonl:3: malformed JSON"):
        JSONLTask(str(f))
    g = tmp_path / "missing_field.jsonl"
    g.write_text('{"question": "a", "answer": "1"}\n')
    with pytest.raises(ConfigError, match=r"missing_field\.jsonl:1: expected an object with fields 'prompt'"):
        JSONLTask(str(g))
    with pytest.raises(ConfigError, match=r"^data\.task\.train_path: no such file"):
        JSONLTask(str(tmp_path / "nope.jsonl"))


def test_extract_answer_and_rewards():
    assert extract_answer("a #1 then #-44", r"#\s*(\S+)") == "-44"
    assert extract_answer("  x ", None) == "x"
    assert extract_answer("none", r"#(\d+)") == ""
    prob = Problem(prompt="1+1=", answer="2")
    assert ExactMatchReward()("1+1=2;#2", prob) == 1.0
    assert ExactMatchReward()("#3", prob) == 0.0
    shaped = FormatAnswerReward()
    assert shaped("#2", prob) == 3.0 and shaped("#3", prob) == -0.5 and shaped("nothing", prob) == -3.0


def test_encode_prompt_chat_template_and_bos():
    from rlad_pl.data.prompts import encode_prompt
    from rlad_pl.testing.builders import build_char_tokenizer

    tok = build_char_tokenizer()
    ids = encode_prompt(tok, "12+3=")
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]).replace(" ", "") == "12+3="
    tok.chat_template = ("{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
                         "{% if add_generation_prompt %}:{% endif %}")
    ids = encode_prompt(tok, "1+2")
    assert tok.decode(ids).replace(" ", "") == "<1+2>:"
