"""Prompt encoding (``rlad_pl.data.prompts``): chat templates with system prompts, template kwargs, overrides, raw.

The tokenizer is real: a char-level ``PreTrainedTokenizerFast`` saved with a ChatML chat template that injects a
default system prompt when none is given (as SmolLM2's and Qwen2.5's do) and honours ``enable_thinking`` (as
Qwen3's does), reloaded from its files with ``load_tokenizer``. Ids are checked exactly against the vocabulary.
The tokenizer sits in its own folder: next to a Qwen2 ``config.json``, transformers 5 loads it as
``Qwen2Tokenizer``, whose byte-level pre-tokenizer drops the char vocabulary's spaces and newlines.
"""

from __future__ import annotations

import pytest

from rlad_pl.core.errors import ConfigError
from rlad_pl.data.prompts import PromptFormat, encode_prompt, render_prompt

#: ChatML with a default system prompt and Qwen3's enable_thinking switch (no spaces: the char tokenizer drops them)
TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = 'be_brief.' %}{% set turns = messages %}{% endif %}"
    "<|im_start|>system\n{{ system }}<|im_end|>\n"
    "{% for m in turns %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>"]


def save_chat_model(out, template: str | None = TEMPLATE, **arch):
    """A tiny char-level Qwen2 (``out/model``) and its tokenizer (``out/tokenizer``) with ``SPECIALS`` as special
    tokens and ``template`` as chat template."""
    from rlad_pl.testing.builders import DEFAULT_CHARS, build_char_tokenizer, build_tiny_qwen2

    tok = build_char_tokenizer(DEFAULT_CHARS + ["\n", "|", "_"] + SPECIALS)
    tok.add_tokens(SPECIALS, special_tokens=True)  # already in the vocabulary: matched whole, ids unchanged
    if template is not None:
        tok.chat_template = template
    model = build_tiny_qwen2(len(tok), **{"hidden_size": 32, "num_layers": 2, "num_heads": 1,
                                          "intermediate_size": 64, **arch})
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "tokenizer")
    return out


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from rlad_pl.models.loading import load_tokenizer

    return load_tokenizer(save_chat_model(tmp_path_factory.mktemp("chat")) / "tokenizer")


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    from rlad_pl.models.loading import load_tokenizer

    return load_tokenizer(save_chat_model(tmp_path_factory.mktemp("plain"), template=None) / "tokenizer")


def ids_of(tok, *pieces: str) -> list[int]:
    """Expected ids from the vocabulary: special tokens whole, everything else one id per character."""
    vocab = tok.get_vocab()
    return [vocab[p] for piece in pieces for p in ([piece] if piece in SPECIALS else list(piece))]


def test_tokenizer_files_carry_the_template(chat_tok, plain_tok):
    assert chat_tok.chat_template == TEMPLATE and not getattr(plain_tok, "chat_template", None)
    assert chat_tok.get_vocab()["<|im_start|>"] == 58 and len(chat_tok) == 60


def test_default_system_prompt_of_the_template_applies_when_none_is_set(chat_tok):
    text = render_prompt(chat_tok, "1+2=")
    assert text == "<|im_start|>system\nbe_brief.<|im_end|>\n<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_prompt(chat_tok, "1+2=")
    assert ids == ids_of(chat_tok, "<|im_start|>", "system\nbe_brief.", "<|im_end|>", "\n", "<|im_start|>",
                         "user\n1+2=", "<|im_end|>", "\n", "<|im_start|>", "assistant\n")
    assert ids[:3] == [58, chat_tok.get_vocab()["s"], chat_tok.get_vocab()["y"]] and 1 not in ids  # no BOS added
    assert chat_tok.decode(ids, skip_special_tokens=False) == text


def test_system_prompt_replaces_the_default_and_empty_gives_an_empty_turn(chat_tok):
    own = encode_prompt(chat_tok, "1+2=", PromptFormat(system_prompt="add."))
    assert own == ids_of(chat_tok, "<|im_start|>", "system\nadd.", "<|im_end|>", "\n", "<|im_start|>",
                         "user\n1+2=", "<|im_end|>", "\n", "<|im_start|>", "assistant\n")
    empty = render_prompt(chat_tok, "x", PromptFormat(system_prompt=""))
    assert empty.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nx") and "be_brief" not in empty


def test_chat_template_kwargs_reach_the_template(chat_tok):
    off = render_prompt(chat_tok, "1+2=", PromptFormat(chat_template_kwargs={"enable_thinking": False}))
    on = render_prompt(chat_tok, "1+2=", PromptFormat(chat_template_kwargs={"enable_thinking": True}))
    assert off == on + "<think>\n\n</think>\n\n"
    assert on == render_prompt(chat_tok, "1+2=")
    think = ids_of(chat_tok, "<think>\n\n</think>\n\n")
    assert len(think) == 19
    assert encode_prompt(chat_tok, "1+2=", PromptFormat(chat_template_kwargs={"enable_thinking": False})) \
        == encode_prompt(chat_tok, "1+2=") + think


def test_template_override_by_string_and_by_file(chat_tok, plain_tok, tmp_path):
    simple = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }};{% endfor %}"
              "{% if add_generation_prompt %}:{% endif %}")
    fmt = PromptFormat(chat_template=simple, system_prompt="s")
    assert render_prompt(chat_tok, "1+2", fmt) == "<system>s;<user>1+2;:"  # replaces the tokenizer's template
    assert render_prompt(plain_tok, "1+2", fmt) == "<system>s;<user>1+2;:"  # gives one to a tokenizer without
    f = tmp_path / "t.jinja"
    f.write_text(simple)
    from_file = PromptFormat(chat_template=str(f))
    assert from_file.chat_template == simple
    assert encode_prompt(plain_tok, "1+2", from_file) == ids_of(plain_tok, "<user>1+2;:")


def test_raw_mode_and_the_unchanged_default_without_a_template(chat_tok, plain_tok):
    # no template -> BOS + text: the shipped tiny models keep their encoding (<bos>=1, '1'=4, '+'=13, '2'=5, '='=17)
    assert encode_prompt(plain_tok, "1+2=") == [1, 4, 13, 5, 17]
    assert encode_prompt(chat_tok, "1+2=", PromptFormat(mode="raw")) == [1, 4, 13, 5, 17]
    assert render_prompt(chat_tok, "1+2=", PromptFormat(mode="raw")) is None


def test_bad_settings_are_one_line_errors(chat_tok, plain_tok, tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.system_prompt: needs a chat template, but mode "
                                          r"is 'raw'"):
        PromptFormat(mode="raw", system_prompt="x")
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.mode: 'chat' needs a chat template, but the "
                                          r"tokenizer has none"):
        encode_prompt(plain_tok, "1", PromptFormat(mode="chat"))
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.system_prompt: needs a chat template, but the "
                                          r"tokenizer has none"):
        encode_prompt(plain_tok, "1", PromptFormat(system_prompt="x"))
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.chat_template_kwargs: needs a chat template"):
        encode_prompt(plain_tok, "1", PromptFormat(chat_template_kwargs={"enable_thinking": False}))
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.chat_template: no such file '.*nope\.jinja'"):
        PromptFormat(chat_template=str(tmp_path / "nope.jinja"))
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.mode: expected auto, chat or raw, got 'text'"):
        PromptFormat(mode="text")
    broken = PromptFormat(chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(ConfigError, match=r"^data\.prompt_format\.chat_template: the chat template failed to "
                                          r"render \(only user turns\)"):
        encode_prompt(chat_tok, "1", broken)


# ----------------------------------------------------------------------------------------------- end to end
SYSTEM_FMT = {"system_prompt": "add.", "chat_template_kwargs": {"enable_thinking": False}}


def chat_text(system: str, user: str) -> str:
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
            "<think>\n\n</think>\n\n")


@pytest.mark.slow
def test_opsd_student_and_privileged_teacher_prompts_use_the_prompt_format(tmp_path):
    """OPSD through the CLI on a chat-template model with DatasetTask: the student's prompt and the teacher's
    privileged prompt are both the chat template with the configured system prompt and template kwargs, exactly."""
    import json

    from conftest import CONFIGS, run_cli

    out = save_chat_model(tmp_path / "chat")
    rows = [{"q": f"{i}+{i + 1}=", "a": str(2 * i + 1), "sol": f"{i}+{i + 1}={2 * i + 1}"} for i in range(8)]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"class_path": "rlad_pl.data.DatasetTask",
            "init_args": {"path": str(data), "prompt_field": "q", "answer_field": "a", "val_fraction": 0.25,
                          "privileged_template": "{q} reference: {sol}", "cache_dir": str(tmp_path / "cache")}}
    cli = run_cli("fit", "--config", str(CONFIGS / "opsd_tiny.yaml"), "--trainer.max_epochs", "1",
                  "--trainer.default_root_dir", str(tmp_path / "run"), "--export.enabled", "false",
                  "--model.student", str(out / "model"), "--model.teacher", str(out / "model"),
                  "--model.tokenizer", str(out / "tokenizer"), "--model.teacher_tokenizer", str(out / "tokenizer"),
                  "--data.task", json.dumps(task),
                  "--data.prompt_format", json.dumps(SYSTEM_FMT), "--data.prompts_per_rollout", "4")
    dm = cli.datamodule
    tok = dm.pipeline.tokenizer
    assert dm.settings.prompt_format == PromptFormat(**SYSTEM_FMT)
    assert dm.samples and dm.samples[0][0].startswith("<|im_start|>system\nadd.<|im_end|>\n<|im_start|>user\n")
    problems = dm.task.problems("train", 2)
    rollout = dm.pipeline.rollout(problems, seed=1, step=cli.trainer.global_step).batch
    P, TP = rollout.prompt_len, rollout.teacher_prompt_len
    for i in range(rollout.num_sequences):
        p = problems[i // dm.group_size]
        student = rollout.input_ids[i, :P][rollout.attention_mask[i, :P].bool()].tolist()
        teacher = rollout.teacher_input_ids[i, :TP][rollout.teacher_attention_mask[i, :TP].bool()].tolist()
        assert tok.decode(student, skip_special_tokens=False) == chat_text("add.", p.prompt)
        assert student == encode_prompt(tok, p.prompt, PromptFormat(**SYSTEM_FMT))
        assert tok.decode(teacher, skip_special_tokens=False) == chat_text("add.", f"{p.prompt} reference: "
                                                                           f"{p.metadata['row']['sol']}")
        assert student[:4] == [58] + ids_of(tok, "sys") and teacher[:4] == student[:4]


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_and_hf_generate_receive_the_same_prompt_ids(tmp_path):
    """The ids the data module encodes (chat template + system prompt + kwargs) are what vLLM's engine processes
    (its ``RequestOutput.prompt_token_ids``) and what the HF sampler's decode loop gets (unpadded); greedy outputs
    match."""
    import importlib.util
    import os

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from rlad_pl.models.loading import load_causal_lm, load_tokenizer
    from rlad_pl.rollout import HFSampler, SamplingParams
    from rlad_pl.rollout.vllm import VLLMSampler

    out = save_chat_model(tmp_path / "chat")
    tok, student = load_tokenizer(out / "tokenizer"), load_causal_lm(out / "model", "model.student")
    fmt = PromptFormat(**SYSTEM_FMT)
    texts = ["1+2=", "12+7=", "abc", "9*9="]
    prompt_ids = [encode_prompt(tok, t, fmt) for t in texts]
    assert [tok.decode(ids, skip_special_tokens=False) for ids in prompt_ids] == [chat_text("add.", t) for t in texts]
    params = SamplingParams(temperature=0.0, max_new_tokens=8, n=1, seed=0)

    import rlad_pl.rollout.hf as hf_module

    hf, hf_inputs = HFSampler(), []
    hf.setup(student, tok)
    real_decode = hf_module.decode

    def hf_spy(model, input_ids, attention_mask, **kw):  # the HF sampler's decode loop gets the unpadded ids
        hf_inputs.extend(row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask))
        return real_decode(model, input_ids, attention_mask, **kw)

    hf_module.decode = hf_spy
    try:
        hf_gen = hf.generate(prompt_ids, params)
    finally:
        hf_module.decode = real_decode

    engine = VLLMSampler(dtype="float32", max_model_len=256, seed=0,
                         engine_kwargs={"kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 8,
                                        "max_num_batched_tokens": 512})
    engine.setup(student, tok)
    try:
        engine.sync_weights(student)
        seen, real_llm_generate = [], engine.llm.generate

        def vllm_spy(prompts, *a, **kw):
            outputs = real_llm_generate(prompts, *a, **kw)
            seen.extend(list(o.prompt_token_ids) for o in outputs)
            return outputs

        engine.llm.generate = vllm_spy
        vllm_gen = engine.generate(prompt_ids, params)
    finally:
        engine.close()
    assert seen == prompt_ids == hf_inputs
    assert vllm_gen.completion_ids == hf_gen.completion_ids


def test_cli_refuses_a_system_prompt_without_a_template(capsys):
    """The shipped tiny student has no chat template: a system prompt is a one-line error before any rollout."""
    from conftest import CONFIGS, run_cli

    with pytest.raises(SystemExit) as exc:
        run_cli("fit", "--config", str(CONFIGS / "grpo_tiny.yaml"), "--trainer.max_epochs", "1",
                "--data.prompt_format.system_prompt", "be brief", "--export.enabled", "false",
                "--trainer.logger", "false", "--trainer.enable_checkpointing", "false")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("rlad_pl: error: data.prompt_format.system_prompt: needs a chat template, but the tokenizer "
                       "has none (set data.prompt_format.chat_template, or drop the setting)")


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_template_injects_its_default_system_prompt():
    """A real chat template (SmolLM2-135M-Instruct, tools/build_real_model.py): without a system prompt the template
    inserts its own, ``system_prompt: ""`` empties it, a set one replaces it; the ids are the text's tokens."""
    from rlad_pl.models.loading import load_tokenizer
    from rlad_pl.testing.real_model import RealModelUnavailable, build_real_model

    try:
        tok = load_tokenizer(build_real_model(log=None))
    except RealModelUnavailable as e:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be built: {e}")
    user = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    default = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert render_prompt(tok, "What is 2+3?") == default + user
    assert render_prompt(tok, "What is 2+3?", PromptFormat(system_prompt="")) == \
        "<|im_start|>system\n<|im_end|>\n" + user
    ids = encode_prompt(tok, "What is 2+3?", PromptFormat(system_prompt="Be brief."))
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>system\nBe brief.<|im_end|>\n" + user
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 3
