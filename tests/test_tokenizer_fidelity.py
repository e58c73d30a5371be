"""Tokenizers encode exactly as their saved ``tokenizer.json`` does, and a folder without tokenizer files is a
one-line error (not an empty tokenizer that fails later as a vocabulary mismatch)."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer

from rlad_pl.core.errors import ConfigError
from rlad_pl.models.loading import PACKAGE_DIR, PROBE_TEXT, load_tokenizer

TINY = PACKAGE_DIR / "assets" / "tiny-student"


def _saved_ids(folder, text):
    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("asset", ["tiny-student", "tiny-teacher", "demo-student", "demo-teacher"])
def test_shipped_tokenizers_encode_like_their_file(asset, capsys):
    folder = PACKAGE_DIR / "assets" / asset
    tok = load_tokenizer(f"assets/{asset}")
    for text in (PROBE_TEXT, "a b", "3+7-4=", "12 + 30 = 42\n#### 42"):
        assert tok(text, add_special_tokens=False)["input_ids"] == _saved_ids(folder, text)
    assert "warning" not in capsys.readouterr().err  # shipped assets: no noise


def test_spaces_survive_on_the_char_tokenizer():
    tok = load_tokenizer("assets/tiny-student")
    ids = tok("a b", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and tok.decode(ids) == "a b"  # transformers' Qwen2Tokenizer would give "ab"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.padding_side) == (0, 1, 2, "left")


def test_user_folder_fallback_warns_once(tmp_path, capsys):
    folder = shutil.copytree(TINY, tmp_path / "student")
    tok = load_tokenizer(folder, "model.student")
    assert tok("a b", add_special_tokens=False)["input_ids"] == _saved_ids(folder, "a b")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rlad_pl: warning:")]
    assert len(lines) == 1 and "model.student" in lines[0] and "tokenizer.json" in lines[0]


def test_folder_without_tokenizer_files(tmp_path):
    folder = tmp_path / "weights_only"
    folder.mkdir()
    shutil.copy(TINY / "config.json", folder / "config.json")
    with pytest.raises(ConfigError) as e:
        load_tokenizer(folder, "model.tokenizer")
    assert str(e.value).startswith("model.tokenizer: ") and "no tokenizer files" in str(e.value)
    assert "\n" not in str(e.value)
    json.loads((folder / "config.json").read_text())  # the folder itself is fine as a model folder
