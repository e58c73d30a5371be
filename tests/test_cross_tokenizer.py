"""Cross-tokenizer alignment (rlad_pl/teacher/cross_tokenizer.py): re-tokenization, character-offset chunks and the
teacher log-prob mapping ``m_t = T_k / n_k``, on tiny tokenizers built here (no model)."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlad_pl.teacher.cross_tokenizer import (
    CrossTokenAlignment,
    align_cross_tokenizer,
    aligned_chunks,
    teacher_prompt_ids,
    token_boundaries,
)
from rlad_pl.testing.builders import DEFAULT_CHARS, build_char_tokenizer

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 .,:!?<>/\n")
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def regex_tokenizer(pieces=(), specials=("<unk>", "<s>", "</s>"), chat_template=None):
    """Word-level tokenizer whose tokens are ``pieces`` (longest first) or single characters; specials first."""
    vocab: dict[str, int] = {}
    for t in [*specials, *pieces, *CHARS]:
        vocab.setdefault(t, len(vocab))
    alts = [re.escape(p) for p in sorted(pieces, key=len, reverse=True)] + [r"[\s\S]"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(alts)), "isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=specials[0], bos_token=specials[1],
                                  eos_token=specials[2])
    if chat_template:
        out.chat_template = chat_template
    return out


def byte_bpe(merges=()):
    """Byte-level BPE with the 256 byte symbols and the given merges (byte-level characters, e.g. 'é' = 'Ã' '©')."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def ids(tok, text):
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def check_chunks(al: CrossTokenAlignment, student, teacher, student_ids):
    """Each chunk's student tokens and teacher tokens spell exactly the chunk's characters."""
    text, resp = al.response_text, al.teacher_response_ids
    for k, (p, q) in enumerate(al.chunk_spans):
        s = [i for i, c in zip(student_ids, al.student_chunk) if c == k]
        u = [i for i, c in zip(resp, al.teacher_chunk) if c == k]
        assert s and u, k
        if p < q:
            assert student.decode(s) == text[p:q] == teacher.decode(u), (k, s, u)


# ---------------------------------------------------------------- identical tokenizers


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_identical_tokenizers_give_the_teacher_values_exactly(kind):
    tok = build_char_tokenizer() if kind == "char" else byte_bpe([("Ã", "©"), ("h", "i")])
    text = "hi 12+3=15" if kind == "char" else "hi é, hi"
    s_ids = ids(tok, text) + [tok.eos_token_id]
    al = align_cross_tokenizer(s_ids, tok, tok, "q?")
    assert al.teacher_response_ids == s_ids
    assert al.student_chunk == list(range(len(s_ids))) == al.teacher_chunk
    assert al.student_mask == [True] * len(s_ids) == al.chunk_end_mask
    lp = -torch.rand(len(s_ids), dtype=torch.float32) * 7 - 1e-3
    assert torch.equal(al.map_teacher_logprobs(lp), lp)  # bit for bit
    two = torch.stack([lp, lp * 0.5])
    assert torch.equal(al.map_teacher_logprobs(two), two)


# ---------------------------------------------------------------- many-to-one, one-to-many, non-nesting


def test_one_teacher_token_covers_several_student_tokens():
    student, teacher = build_char_tokenizer(), regex_tokenizer(["hello", "world"])
    s_ids = ids(student, "hello world")
    al = align_cross_tokenizer(s_ids, student, teacher, "p")
    assert teacher.convert_ids_to_tokens(al.teacher_response_ids) == ["hello", " ", "world"]
    assert al.student_chunk == [0] * 5 + [1] + [2] * 5
    assert al.teacher_chunk == [0, 1, 2]
    assert al.chunk_spans == [(0, 5), (5, 6), (6, 11)]
    assert al.chunk_end_mask == [False] * 4 + [True, True] + [False] * 4 + [True]
    out = al.map_teacher_logprobs(torch.tensor([-2.5, -0.75, -1.25]))
    assert out.tolist() == [-0.5] * 5 + [-0.75] + [-0.25] * 5
    assert al.chunk_logprobs([-2.5, -0.75, -1.25]).tolist() == [-2.5, -0.75, -1.25]


def test_several_teacher_tokens_cover_one_student_token():
    student, teacher = regex_tokenizer(["hello", "world"]), build_char_tokenizer()
    s_ids = ids(student, "hello world")
    al = align_cross_tokenizer(s_ids, student, teacher, "p")
    assert al.teacher_response_ids == [*ids(teacher, "hello world")]
    assert al.student_chunk == [0, 1, 2]
    assert al.teacher_chunk == [0] * 5 + [1] + [2] * 5
    lp = torch.tensor([-0.5, -0.25, -0.125, -1.0, -2.0, -0.75, -1.0, -1.0, -0.5, -0.5, -0.25])
    assert al.map_teacher_logprobs(lp).tolist() == [-3.875, -0.75, -3.25]


def test_boundaries_that_do_not_nest_merge_into_one_chunk():
    student, teacher = regex_tokenizer(["ab", "cde"]), regex_tokenizer(["abc", "de"])
    s_ids = ids(student, "abcdef")
    assert student.convert_ids_to_tokens(s_ids) == ["ab", "cde", "f"]
    al = align_cross_tokenizer(s_ids, student, teacher, "p")
    assert teacher.convert_ids_to_tokens(al.teacher_response_ids) == ["abc", "de", "f"]
    assert al.student_chunk == [0, 0, 1] and al.teacher_chunk == [0, 0, 1]
    assert al.chunk_spans == [(0, 5), (5, 6)]
    assert al.map_teacher_logprobs([-1.5, -0.5, -0.25]).tolist() == [-1.0, -1.0, -0.25]
    assert al.chunk_end_mask == [False, True, True]
    check_chunks(al, student, teacher, s_ids)


def test_aligned_chunks_on_boundaries():
    # student cuts 0 2 5 6, teacher 0 3 5 6 (and a None inside a character): common 0 5 6
    assert aligned_chunks([0, 2, 5, 6], [0, 3, None, 5, 6]) == [(0, 2, 0, 3, 0, 5), (2, 3, 3, 4, 5, 6)]
    # zero-width tokens at an inner cut join the chunk that starts there, at the end the last chunk
    assert aligned_chunks([0, 1, 1, 2, 2], [0, 1, 2]) == [(0, 1, 0, 1, 0, 1), (1, 4, 1, 2, 1, 2)]


def test_non_canonical_student_ids_use_incremental_decoding():
    student, teacher = regex_tokenizer(["hel", "lo", "hello"]), regex_tokenizer(["he", "llo"])
    s_ids = student.convert_tokens_to_ids(["hel", "lo", "!"])  # sampled; the canonical encoding is "hello" "!"
    al = align_cross_tokenizer(s_ids, student, teacher, "p")
    assert al.student_boundary_source == "decode"
    assert al.student_chunk == [0, 0, 1] and al.teacher_chunk == [0, 0, 1]
    bounds, how = token_boundaries(s_ids, student, "hello!")
    assert (bounds, how) == ([0, 3, 5, 6], "decode")
    canonical = ids(student, "hello!")
    assert token_boundaries(canonical, student, "hello!") == ([0, 5, 6], "offsets")


# ---------------------------------------------------------------- special tokens, eos, prompts, chat template


def test_eos_maps_to_the_teachers_eos_and_specials_never_leak():
    student = build_char_tokenizer()  # <pad>=0 <bos>=1 <eos>=2
    teacher = regex_tokenizer(["ab"], specials=("<unk>", "<eos>", "<bos>", "<s>"))  # other ids for the same names
    teacher.eos_token = "<eos>"
    # a stray <bos> inside the response, the text "<eos>" written out as characters, then the real eos
    s_ids = ids(student, "ab") + [student.bos_token_id] + ids(student, "<eos>c") + [student.eos_token_id]
    al = align_cross_tokenizer(s_ids, student, teacher, "p")
    assert al.response_text == "ab<eos>c"
    resp = al.teacher_response_ids
    assert resp[-1] == teacher.convert_tokens_to_ids("<eos>") == 1
    assert teacher.convert_ids_to_tokens(resp[:-1]) == ["ab", "<", "e", "o", "s", ">", "c"]
    assert not set(resp[:-1]) & set(teacher.all_special_ids)
    stray = 2
    assert al.student_chunk[stray] == -1 and al.student_mask[stray] is False
    assert al.student_chunk[-1] == al.teacher_chunk[-1] == al.num_chunks - 1
    assert al.chunk_spans[-1] == (8, 8)
    lp = torch.tensor([-1.0, -0.5, -0.5, -0.5, -0.5, -0.5, -2.0, -3.0])
    out = al.map_teacher_logprobs(lp)
    assert out.tolist() == [-0.5, -0.5, 0.0, -0.5, -0.5, -0.5, -0.5, -0.5, -2.0, -3.0]
    assert out.sum().item() == lp.sum().item()


def test_eos_without_a_teacher_eos_stays_unaligned_and_custom_eos_ids():
    student, teacher = build_char_tokenizer(), regex_tokenizer()
    teacher.eos_token = None
    s_ids = ids(student, "ab") + [student.eos_token_id]
    al = align_cross_tokenizer(s_ids, student, teacher, "p")
    assert al.teacher_response_ids == ids(teacher, "ab")
    assert al.student_chunk == [0, 1, -1]
    assert al.map_teacher_logprobs([-1.0, -2.0]).tolist() == [-1.0, -2.0, 0.0]
    # the student ends its turn with another id ("." here): it is not text, it maps to the given teacher eos
    dot = student.convert_tokens_to_ids(".")
    al = align_cross_tokenizer(ids(student, "ab") + [dot], student, teacher, "p", student_eos_ids=[dot],
                               teacher_eos_id=2)
    assert al.response_text == "ab" and al.teacher_response_ids == ids(teacher, "ab") + [2]
    assert al.student_chunk == [0, 1, 2]


def test_empty_response_and_eos_only():
    student, teacher = build_char_tokenizer(), regex_tokenizer()
    al = align_cross_tokenizer([], student, teacher, "p")
    assert al.teacher_response_ids == [] and al.num_chunks == 0
    assert al.map_teacher_logprobs(torch.zeros(0)).shape == (0,)
    al = align_cross_tokenizer([student.eos_token_id], student, teacher, "p")
    assert al.teacher_response_ids == [teacher.eos_token_id] and al.student_chunk == [0]
    assert al.map_teacher_logprobs([-4.0]).tolist() == [-4.0]


def test_plain_prompt_is_the_teachers_bos_and_text():
    teacher = regex_tokenizer(["ab"])
    assert teacher_prompt_ids(teacher, "ab c") == [teacher.bos_token_id, *ids(teacher, "ab c")]
    assert teacher_prompt_ids(teacher, "ab c", chat=True) == [teacher.bos_token_id, *ids(teacher, "ab c")]
    byte = byte_bpe()
    byte.bos_token = None
    assert teacher_prompt_ids(byte, "q") == ids(byte, "q")


def test_chat_template_stays_in_the_prompt():
    student = build_char_tokenizer(DEFAULT_CHARS + ["\n"])
    teacher = regex_tokenizer(["assistant", "user"], chat_template=TEMPLATE)
    response = "ok <s>assistant: no\n"
    s_ids = ids(student, response) + [student.eos_token_id]
    al = align_cross_tokenizer(s_ids, student, teacher, "what is 2+2?".replace("+", " plus "), chat=True)
    prompt = al.teacher_input_ids[:al.teacher_prompt_len]
    assert teacher.decode(prompt) == "<s>user: what is 2 plus 2?\n<s>assistant: "
    s_tok = teacher.convert_tokens_to_ids("<s>")
    assert prompt.count(s_tok) == 2
    resp = al.teacher_response_ids
    assert resp[-1] == teacher.eos_token_id
    assert s_tok not in resp and not set(resp[:-1]) & set(teacher.all_special_ids)
    assert teacher.decode(resp[:-1]) == response == al.response_text
    assert al.text_roundtrip
    # identical character tokens on both sides of the text: one chunk per student token but "assistant"
    assert al.num_chunks == len(s_ids) - len("assistant") + 1
    check_chunks(al, student, teacher, s_ids)


# ---------------------------------------------------------------- multi-byte characters


A = [("Ã", "©"), ("â", "Ĥ")]  # é = [Ã©], € = [âĤ][¬]
B = [("Ĥ", "¬")]  # é = [Ã][©], € = [â][Ĥ¬]


def test_multibyte_characters_split_differently():
    student, teacher = byte_bpe(A), byte_bpe(B)
    s_ids = ids(student, "aé€b")
    assert student.convert_ids_to_tokens(s_ids) == ["a", "Ã©", "âĤ", "¬", "b"]
    al = align_cross_tokenizer(s_ids, student, teacher, "q")
    assert teacher.convert_ids_to_tokens(al.teacher_response_ids) == ["a", "Ã", "©", "â", "Ĥ¬", "b"]
    assert al.student_chunk == [0, 1, 2, 2, 3]
    assert al.teacher_chunk == [0, 1, 1, 2, 2, 3]
    assert al.chunk_spans == [(0, 1), (1, 2), (2, 3), (3, 4)]
    out = al.map_teacher_logprobs(torch.tensor([-0.5, -1.0, -0.5, -2.0, -1.0, -0.25]))
    assert out.tolist() == [-0.5, -1.5, -1.5, -1.5, -0.25]
    check_chunks(al, student, teacher, s_ids)


def test_partial_utf8_pieces_by_offsets_and_by_decoding_agree():
    tok = byte_bpe(A)
    canonical = ids(tok, "aé€b")
    sampled = tok.convert_tokens_to_ids(["a", "Ã", "©", "âĤ", "¬", "b"])  # é as two byte pieces: not canonical
    assert token_boundaries(canonical, tok, "aé€b") == ([0, 1, 2, None, 3, 4], "offsets")
    # "a\ufffd" (a partial é) is no prefix of the text: no boundary inside the character
    assert token_boundaries(sampled, tok, "aé€b") == ([0, 1, None, 2, None, 3, 4], "decode")
    assert token_boundaries(ids(byte_bpe(B), "aé€b"), byte_bpe(B), "aé€b")[0] == [0, 1, None, 2, None, 3, 4]
    al = align_cross_tokenizer(sampled, tok, tok, "q")
    assert al.student_boundary_source == "decode"
    assert al.student_chunk == [0, 1, 1, 2, 2, 3] and al.teacher_chunk == [0, 1, 2, 2, 3]
    assert al.map_teacher_logprobs([-1.0, -3.0, -0.5, -0.5, -2.0]).tolist() == [-1.0, -1.5, -1.5, -0.5, -0.5, -2.0]


def test_a_piece_straddling_two_characters_merges_them():
    straddle, whole = byte_bpe([("©", "Ã")]), byte_bpe([("Ã", "©")])
    s_ids = ids(straddle, "éé")
    assert straddle.convert_ids_to_tokens(s_ids) == ["Ã", "©Ã", "©"]  # offsets (0,1) (0,2) (1,2)
    assert token_boundaries(s_ids, straddle, "éé")[0] == [0, None, None, 2]
    al = align_cross_tokenizer(s_ids, straddle, whole, "q")
    assert whole.convert_ids_to_tokens(al.teacher_response_ids) == ["Ã©", "Ã©"]
    assert al.student_chunk == [0, 0, 0] and al.teacher_chunk == [0, 0]
    assert al.map_teacher_logprobs([-1.0, -2.0]).tolist() == [-1.0, -1.0, -1.0]


# ---------------------------------------------------------------- chunk sums, trained tokenizers


def trained_bpe(texts, vocab_size=300):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


CORPUS = ["the cat sat on the mat", "the answer is 42", "café costs 3€ and crème 4€", "then the theme"] * 3


@pytest.mark.parametrize("pair", ["char-bpe", "bpe-char", "bpe-bpe"])
def test_chunk_sums_are_preserved(pair):
    big, small = trained_bpe(CORPUS, 320), trained_bpe(CORPUS[2:3] + CORPUS[:1], 270)
    char = regex_tokenizer()
    student, teacher = {"char-bpe": (char, big), "bpe-char": (big, char), "bpe-bpe": (small, big)}[pair]
    text = "the cat: café 3€, the theme" if pair == "bpe-bpe" else "the cat: cafe 3, the theme"
    s_ids = ids(student, text) + [student.eos_token_id]
    al = align_cross_tokenizer(s_ids, student, teacher, "q")
    assert al.response_text == text and al.text_roundtrip and all(al.student_mask)
    assert al.num_chunks < max(len(s_ids), len(al.teacher_response_ids))  # several tokens per chunk on one side
    check_chunks(al, student, teacher, s_ids)
    r_t = len(al.teacher_response_ids)
    lp = -(torch.arange(r_t, dtype=torch.float64) % 7 + 1) / 8
    out = al.map_teacher_logprobs(lp)
    assert out.dtype == torch.float64 and out.shape == (len(s_ids),)
    s_chunk, u_chunk = torch.tensor(al.student_chunk), torch.tensor(al.teacher_chunk)
    for k in range(al.num_chunks):
        assert torch.isclose(out[s_chunk == k].sum(), lp[u_chunk == k].sum(), rtol=0, atol=1e-12)
        assert torch.all(out[s_chunk == k] == out[s_chunk == k][0])  # equal shares
    assert torch.isclose(out.sum(), lp.sum(), rtol=0, atol=1e-12)


def test_wrong_teacher_length_is_refused():
    tok = build_char_tokenizer()
    al = align_cross_tokenizer(ids(tok, "ab"), tok, tok, "p")
    with pytest.raises(ValueError, match="expected last dimension 2"):
        al.map_teacher_logprobs([-1.0, -2.0, -3.0])


# ------------------------------------------------------------------------------------------------ through a teacher
def _teacher_route(tok, cross, seed=0):
    from rlad_pl.teacher import LocalTeacher
    from rlad_pl.teacher.routes import TeacherRoute
    from rlad_pl.testing.builders import build_tiny_qwen2

    backend = LocalTeacher()
    backend.model = build_tiny_qwen2(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                     seed=seed).eval()
    return TeacherRoute("t", backend, tok, model=backend.model, cross=cross, student_tokenizer=build_char_tokenizer())


def _student_batch(stok, prompts, responses):
    from rlad_pl.core.batch import RolloutBatch, build_sequences
    from rlad_pl.data.prompts import encode_prompt

    p_ids = [encode_prompt(stok, p) for p in prompts]
    r_ids = [ids(stok, r) + [stok.eos_token_id] for r in responses]
    x, m, P, rm = build_sequences(p_ids, r_ids, stok.pad_token_id)
    n = len(prompts)
    return RolloutBatch(x, m, P, rm, torch.zeros(n), torch.zeros(n), torch.arange(n), prompt_texts=list(prompts))


def test_cross_route_with_identical_tokenizers_is_todays_teacher():
    """The limiting case through the whole route: re-tokenizing for a teacher with the student's own tokenizer
    gives exactly the log-probs of scoring the student's ids."""
    stok = build_char_tokenizer()
    batch = _student_batch(stok, ["1+2=", "30+4="], ["1+2=3;#3", "34;#34"])
    kw = dict(temperature=1.0, chunk_size=4, vocab_size=len(stok))
    with torch.no_grad():
        same = _teacher_route(stok, cross=False).token_logprobs(batch, **kw)
        cross = _teacher_route(stok, cross=True).token_logprobs(batch, **kw)
    m = batch.response_mask.bool()
    torch.testing.assert_close(cross[m], same[m], rtol=0, atol=1e-6)


def test_cross_route_keeps_the_teachers_probability_of_the_text():
    """A teacher with a BPE tokenizer: the mapped student values add up to the teacher's own log-probability of the
    whole response text after its own prompt (the chain rule), row by row, and differ from the student's ids."""
    from rlad_pl.core.logprobs import response_logprobs
    from rlad_pl.data.prompts import encode_prompt

    stok = build_char_tokenizer()
    ttok = byte_bpe([("1", "2"), ("=", "3"), ("3", "4"), (";", "#")])
    ttok.chat_template = ("{% for m in messages %}<s>{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}:{% endif %}")
    prompts, responses = ["1+2=", "30+4="], ["12+1=3;#34", "34;#34"]
    batch = _student_batch(stok, prompts, responses)
    route = _teacher_route(ttok, cross=True, seed=1)
    with torch.no_grad():
        got = route.token_logprobs(batch, temperature=1.0, chunk_size=4, vocab_size=len(stok))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        t_prompt = encode_prompt(ttok, p)
        assert ttok.decode(t_prompt) == f"<s>{p}:"  # the teacher's own chat template, not the student's format
        t_resp = ids(ttok, r) + [ttok.eos_token_id]
        assert len(t_resp) < len(r) + 1  # merges: fewer teacher tokens than characters
        seq = torch.tensor([t_prompt + t_resp])
        with torch.no_grad():
            want, _ = response_logprobs(route.model, seq, torch.ones_like(seq), len(t_prompt))
        n = int(batch.response_mask[i].sum())
        assert torch.isclose(got[i, :n].sum(), want.sum(), atol=1e-4), (got[i, :n].sum(), want.sum())
        assert (got[i, n:] == 0).all()


def _bpe_teacher_dir(tmp_path):
    from rlad_pl.testing.builders import build_tiny_qwen2

    ttok = byte_bpe([("1", "2"), ("=", "3"), (";", "#")])
    model = build_tiny_qwen2(len(ttok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 0, 1, 2
    model.save_pretrained(tmp_path / "bpe-teacher")
    ttok.save_pretrained(tmp_path / "bpe-teacher")
    return str(tmp_path / "bpe-teacher")


def test_a_teacher_with_another_tokenizer_trains_sampled_token_objectives_and_refuses_full_vocab(tmp_path):
    from rlad_pl.core.errors import ConfigError
    from rlad_pl.data import CharFrequencyTask
    from rlad_pl.objectives import OPDSampled, ReverseKL
    from rlad_pl.pipeline import RolloutPipeline, RolloutSettings
    from rlad_pl.rollout.sampler import SamplingParams
    from rlad_pl.training.module import DistillationModule

    teacher = _bpe_teacher_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"^model\.teacher: teacher and student vocabularies differ .*ReverseKL "
                                          r"need \['teacher_hidden'\].*sampled-token objective \(OPDSampled"):
        DistillationModule(student="assets/tiny-student", teacher=teacher, objectives=[ReverseKL()])
    module = DistillationModule(student="assets/tiny-student", teacher=teacher, objectives=[OPDSampled()])
    assert module.routes["teacher"].cross and module.model_tags["teacher_tokenizer"]
    pipe = RolloutPipeline(CharFrequencyTask(target="a", alphabet="123=;#"),
                           RolloutSettings(prompts_per_rollout=2, group_size=2, micro_batch_size=4,
                                           sampling=SamplingParams(max_new_tokens=6)), info=lambda s: None)
    pipe.connect(module.policy())
    (step,) = pipe.steps(epoch=0)
    mb = step.micro_batches[0]
    m = mb.response_mask.bool()
    assert mb.prompt_texts is not None and torch.isfinite(mb.teacher_logprobs).all()
    special = mb.response_ids <= 2  # <pad> <bos> <eos> of the char tokenizer; eos is aligned to the teacher's eos
    text = m & (mb.response_ids > 2)
    assert (mb.teacher_logprobs[text] < 0).all() and (mb.teacher_logprobs[text] > -20).all()
    stray = m & special & (mb.response_ids != 2)  # a <bos> / <pad> sampled inside a response: no text
    assert (mb.teacher_logprobs[stray] == -20.0).all() and (mb.teacher_logprobs[~m] == 0).all()


@pytest.mark.slow  # a short fit of the cross-tokenizer demo: ~40 s on 2 busy cores
def test_cross_tokenizer_demo_config_fits(tmp_path):
    """``configs/cross_tokenizer_demo.yaml``: the char-level demo student and the BPE demo teacher have different
    tokenizers; the fit runs through the cross-tokenizer route and logs finite OPD losses."""
    import math

    from conftest import CONFIGS, run_cli
    from rlad_pl.testing.runs import read_scalars

    cli = run_cli("fit", "--config", str(CONFIGS / "cross_tokenizer_demo.yaml"), "--trainer.max_epochs", "1",
                  "--trainer.default_root_dir", str(tmp_path), "--data.prompts_per_rollout", "8",
                  "--data.micro_batch_size", "64", "--data.val_prompts", "8", "--trainer.callbacks", "[]")
    assert cli.model.routes["teacher"].cross
    assert len(cli.model.tokenizer) != cli.model.routes["teacher"].vocab_size
    s = read_scalars(cli.trainer.log_dir)
    assert all(math.isfinite(v) for _, v in s["opdsampled/loss"]) and s["timing/teacher_logprobs"]
