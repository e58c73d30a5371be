"""Loading student / teacher models and tokenizers, compatibility checks, and tiny local model builders.

A model or tokenizer is named the way ``from_pretrained`` names it: a local folder written by ``save_pretrained``
(relative paths are looked up in the working directory first, then inside the installed ``rlad_pl`` package, so
``assets/tiny-student`` works from any directory), or a Hugging Face hub id ``org/name``, optionally at a revision
(``org/name@v1.0`` or the ``*_revision`` argument). Hub ids are read from the local Hugging Face cache
(``cache_dir``, else ``HF_HUB_CACHE`` / ``HF_HOME``) and downloaded when missing; with ``HF_HUB_OFFLINE=1`` nothing is
downloaded. Tokens come from ``huggingface_hub`` itself (``HF_TOKEN`` or ``hf auth login``); nothing here reads,
passes or records one. Remote code (a repository's own ``*.py``) runs only with ``trust_remote_code=True``.

``resolve_source`` does every check that needs no weights (folder / repository / revision / cache, ``config.json``
and other JSON files, safetensors headers, known ``model_type``) so that a bad name fails with one line before any
model is loaded; ``load_tokenizer`` / ``load_causal_lm`` then call ``from_pretrained`` on the resolved source.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Literal, Optional

import torch

from rlad_pl.core.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # rlad_pl/ (assets/ lives there)

log = logging.getLogger(__name__)

#: files fetched from the hub while resolving (small; the weights come later, with ``from_pretrained``)
_META_FILES = {"model": ["config.json", "model.safetensors.index.json"],
               "tokenizer": ["tokenizer_config.json", "tokenizer.json", "config.json"]}
#: JSON files that ``from_pretrained`` parses; each present one is checked so that a broken one is named
_JSON_FILES = {"model": ("config.json", "generation_config.json", "model.safetensors.index.json"),
               "tokenizer": ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "config.json")}

Kind = Literal["model", "tokenizer"]


@dataclass(frozen=True)
class ModelSource:
    """Where one model or tokenizer comes from, after every check that needs no weights.

    ``folder`` is the local folder (a user folder, or the hub snapshot folder of ``commit``); ``repo_id`` /
    ``commit`` are set for hub ids. ``field`` is the config key that named it (for error messages)."""

    spec: str
    field: str
    folder: Path
    repo_id: Optional[str] = None
    commit: Optional[str] = None
    offline: bool = False
    cache_dir: Optional[str] = None
    trust_remote_code: bool = False
    kind: Kind = dc_field(default="model", compare=False)

    @property
    def tag(self) -> str:
        """A stable name of exactly these files: ``org/name@<commit>`` for hub ids, the spec for folders."""
        return f"{self.repo_id}@{self.commit}" if self.repo_id else self.spec

    def from_pretrained_args(self) -> tuple[str, dict]:
        """``(name_or_path, kwargs)`` for ``from_pretrained``: the hub id at the resolved commit (so every file
        comes from one snapshot, and missing weights are downloaded into the same cache), or the folder itself
        when it is local or when offline (then the snapshot folder *is* what ``from_pretrained`` would read)."""
        kwargs = {"trust_remote_code": self.trust_remote_code}
        if self.repo_id is None or self.offline:
            return str(self.folder), kwargs
        return self.repo_id, {**kwargs, "revision": self.commit, "cache_dir": self.cache_dir}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` as ``huggingface_hub`` reads them, re-read from the environment
    (so a value set after import, e.g. by a test or a launcher, is respected too)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return constants.HF_HUB_OFFLINE or (env or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir(cache_dir: Optional[str | os.PathLike] = None) -> str:
    """The hub cache ``from_pretrained`` uses: ``cache_dir``, else ``HF_HUB_CACHE``, else ``$HF_HOME/hub`` (the
    ``huggingface_hub`` rules, re-read from the environment)."""
    if cache_dir is not None:
        return os.path.expandvars(os.path.expanduser(str(cache_dir)))
    home = os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"))
    hub = os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    return os.path.expandvars(os.path.expanduser(hub))


def split_revision(spec: str, revision: Optional[str], field: str, revision_field: str) -> tuple[str, Optional[str]]:
    """``'org/name@rev'`` -> ``('org/name', 'rev')``; a separate ``revision`` must agree with the ``@rev``."""
    name, at, rev = spec.partition("@")
    if not at:
        return spec, revision
    if not name or not rev:
        raise ConfigError(field, f"expected 'org/name' or 'org/name@revision', got '{spec}'")
    if revision is not None and revision != rev:
        raise ConfigError(revision_field, f"'{revision}' conflicts with the revision in {field} '{spec}'")
    return name, rev


def _local_folder(spec: str) -> Optional[Path]:
    p = Path(os.path.expanduser(spec))
    for candidate in (p, PACKAGE_DIR / p):
        if candidate.is_dir():
            return candidate
    return None


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1 or os.path.exists(spec)


def resolve_source(spec: str | os.PathLike | ModelSource, field: str, kind: Kind = "model",
                   revision: Optional[str] = None, revision_field: Optional[str] = None,
                   cache_dir: Optional[str | os.PathLike] = None, trust_remote_code: bool = False) -> ModelSource:
    """Find ``spec`` (local folder or hub id) and check it without loading weights; one-line ``ConfigError``s
    name ``field`` (or ``revision_field``) and say what is wrong: no such folder, folder without ``config.json``,
    not in the cache and offline, no such repository (or gated), no such revision, a broken JSON or safetensors
    file (named), an unknown ``model_type`` or one that needs remote code."""
    if isinstance(spec, ModelSource):
        return spec
    spec, revision_field = str(spec), revision_field or f"{field}_revision"
    folder = _local_folder(spec)
    if folder is not None:
        if revision is not None:
            raise ConfigError(revision_field, f"'{revision}' given, but {field} '{spec}' is a local folder; a "
                                              "revision applies to hub ids only")
        src = ModelSource(spec, field, folder, trust_remote_code=trust_remote_code, kind=kind)
    else:
        src = _resolve_hub(spec, field, kind, revision, revision_field, cache_dir, trust_remote_code)
    _check_folder(src)
    return src


def _resolve_hub(spec: str, field: str, kind: Kind, revision: Optional[str], revision_field: str,
                 cache_dir: Optional[str | os.PathLike], trust_remote_code: bool) -> ModelSource:
    """``snapshot_download`` of the small metadata files only (``local_files_only`` when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.file_download import repo_folder_name

    looked = f"looked in {Path.cwd()} and in {PACKAGE_DIR}"
    if os.path.isfile(os.path.expanduser(spec)):
        raise ConfigError(field, f"'{spec}' is a file; expected a model folder (config.json + weights) or a hub id")
    if _looks_like_path(spec):
        raise ConfigError(field, f"no such local folder '{spec}'" + ("" if os.path.isabs(os.path.expanduser(spec))
                                                                     else f" ({looked})"))
    repo_id, revision = split_revision(spec, revision, field, revision_field)
    if "@" in spec:
        revision_field = field  # the revision was written in the id itself
    cache, offline = hub_cache_dir(cache_dir), hub_offline()
    at = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                   allow_patterns=_META_FILES[kind])
    except HFValidationError:
        raise ConfigError(field, f"'{spec}' is neither a local folder ({looked}) nor a valid hub id "
                                 "('org/name')") from None
    except GatedRepoError:
        raise ConfigError(field, f"hub repository '{repo_id}' is gated: accept its terms on huggingface.co and log "
                                 "in (HF_TOKEN or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ConfigError(field, f"no model '{repo_id}' on the hub (or it is private and needs a token: HF_TOKEN "
                                 f"or `hf auth login`), and no local folder of that name ({looked})") from None
    except DisabledRepoError:
        raise ConfigError(field, f"hub repository '{repo_id}' is disabled") from None
    except RevisionNotFoundError:
        raise ConfigError(revision_field if revision else field,
                          f"revision '{revision}' not found in hub repository '{repo_id}'") from None
    except LocalEntryNotFoundError:
        repo_dir = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model")
        if offline and repo_dir.is_dir() and revision:
            cached = sorted(p.name for p in (repo_dir / "refs").glob("*")) + sorted(
                p.name[:12] for p in (repo_dir / "snapshots").glob("*"))
            raise ConfigError(revision_field, f"revision '{revision}' of '{repo_id}' is not in the local cache "
                                              f"{cache} (cached: {', '.join(cached) or 'nothing'}) and offline "
                                              "(HF_HUB_OFFLINE=1)") from None
        if offline:
            raise ConfigError(field, f"{at} is not in the local cache {cache} and offline (HF_HUB_OFFLINE=1), and "
                                     f"there is no local folder of that name ({looked})") from None
        raise ConfigError(field, f"{at} is not in the local cache {cache} and the hub cannot be reached "
                                 f"(no local folder of that name either: {looked})") from None
    folder = Path(folder)
    src = ModelSource(spec, field, folder, repo_id=repo_id, commit=folder.name, offline=offline,
                      cache_dir=cache, trust_remote_code=trust_remote_code, kind=kind)
    log.info("%s: %s from the hub cache %s%s", field, src.tag, cache, " (offline)" if offline else "")
    return src


def _check_folder(src: ModelSource) -> None:
    """Checks on the files present in ``src.folder`` (weights still to be downloaded are checked by loading)."""
    where = f"{src.field} '{src.spec}'" + (f" (snapshot {src.folder})" if src.repo_id else "")
    names = ("config.json",) if src.kind == "model" else ("tokenizer_config.json", "tokenizer.json", "config.json")
    if not any((src.folder / n).is_file() for n in names):
        what = ("config.json (a model folder is written by save_pretrained: config.json + weights)"
                if src.kind == "model" else "tokenizer files (tokenizer_config.json or tokenizer.json)")
        has = sorted(p.name for p in src.folder.iterdir())[:6] if src.folder.is_dir() else []
        raise ConfigError(src.field, f"{where} has no {what}; it holds {has or 'nothing'}")
    parsed = {}
    for name in _JSON_FILES[src.kind]:
        path = src.folder / name
        if path.is_file():
            try:
                parsed[name] = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(src.field, f"{path} is not valid JSON ({e})") from None
    if src.kind == "model":
        _check_model_type(src, parsed["config.json"], where)
        _check_weights(src, parsed.get("model.safetensors.index.json"), where)


def _check_model_type(src: ModelSource, config: dict, where: str) -> None:
    from transformers import CONFIG_MAPPING, __version__

    model_type, auto_map = config.get("model_type"), config.get("auto_map") or {}
    if model_type in CONFIG_MAPPING:
        return
    if auto_map and not src.trust_remote_code:
        raise ConfigError(src.field, f"{where} needs its own Python code (config.json has model_type "
                                     f"'{model_type}' and an auto_map); set model.trust_remote_code: true if you "
                                     "trust that code")
    if not auto_map:
        what = f"model_type {model_type!r}, which transformers {__version__} does not know" if model_type else \
            "no model_type (not a transformers model config?)"
        raise ConfigError(src.field, f"{src.folder / 'config.json'} has {what}")


def _check_weights(src: ModelSource, index: Optional[dict], where: str) -> None:
    """Safetensors headers of the weight files ``from_pretrained`` will read (``model.safetensors`` or the shards
    of ``model.safetensors.index.json``); a truncated or corrupt file is named. Local folders must hold weights."""
    from safetensors import SafetensorError, safe_open

    if index is not None:
        files = sorted(set(index.get("weight_map", {}).values()))
    elif (src.folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = []
        others = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "tf_model.h5", "flax_model.msgpack")
        if (src.repo_id is None or src.offline) and not any((src.folder / n).exists() for n in others):
            raise ConfigError(src.field, f"{where} has config.json but no weights (model.safetensors, "
                                         "model.safetensors.index.json or pytorch_model.bin)")
    for name in files:
        path = src.folder / name
        if not path.is_file():
            if src.repo_id is None or src.offline:
                raise ConfigError(src.field, f"weights file {path} is missing (listed in "
                                             "model.safetensors.index.json)")
            continue  # downloaded by from_pretrained
        try:
            with safe_open(str(path), "pt"):
                pass
        except SafetensorError as e:
            raise ConfigError(src.field, f"weights file {path} is corrupt or truncated ({e}); re-save it, or delete "
                                         "it to download it again") from None


def resolve_model_and_tokenizer(model: str | os.PathLike, field: str, tokenizer: Optional[str] = None,
                                tokenizer_field: Optional[str] = None, revision: Optional[str] = None,
                                tokenizer_revision: Optional[str] = None, cache_dir: Optional[str] = None,
                                trust_remote_code: bool = False) -> tuple[ModelSource, ModelSource]:
    """Resolve a model and its tokenizer. Without a tokenizer of its own (None, or the model's own name and no
    ``tokenizer_revision``) the tokenizer comes from the model's resolved snapshot, so both are one commit."""
    m = resolve_source(model, field, "model", revision, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    if tokenizer_revision is None and (tokenizer is None or str(tokenizer) == str(model)):
        return m, resolve_source(m.tag, field, "tokenizer", cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    t = resolve_source(model if tokenizer is None else tokenizer, tokenizer_field or f"{field}_tokenizer",
                       "tokenizer", tokenizer_revision, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    return m, t


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def resolve_path(path: str | os.PathLike, field: str) -> Path:
    """The local folder of ``path`` (a folder or a hub id, see ``resolve_source``); one-line ``ConfigError``s."""
    return resolve_source(path, field, kind="tokenizer").folder


def warn_remote_code(*sources: Optional[ModelSource]) -> None:
    """One warning line naming every source loaded with ``trust_remote_code`` (none when it is off)."""
    tags = list(dict.fromkeys(s.tag for s in sources if s is not None and s.trust_remote_code))
    if tags and os.environ.get("RANK", "0") in ("0", ""):
        print("rlad_pl: warning: model.trust_remote_code: on, so Python code from "
              f"{', '.join(repr(t) for t in tags)} may run on this machine", file=sys.stderr)


def load_tokenizer(path: str | os.PathLike | ModelSource, field: str = "model.tokenizer"):
    """``AutoTokenizer.from_pretrained`` on a resolved source; the pad token defaults to the eos token."""
    from transformers import AutoTokenizer

    src = resolve_source(path, field, kind="tokenizer")
    if not any((src.folder / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(src.field, f"'{src.spec}' holds no tokenizer files (expected one of "
                          f"{', '.join(TOKENIZER_FILES)}); set model.tokenizer to a folder that has them")
    name, kwargs = src.from_pretrained_args()
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(src.field, f"cannot load the tokenizer of '{src.spec}': {_first_line(e)}") from None
    tok = faithful_tokenizer(tok, src)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError(src.field, "tokenizer has neither a pad nor an eos token; one is needed for padding")
        tok.pad_token = tok.eos_token
    return tok


#: files of which a tokenizer folder holds at least one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
#: text whose encoding must be the same through transformers' class and the saved ``tokenizer.json``
PROBE_TEXT = "a b  c\n\t1+2=3; Hello, World! x_y"


def faithful_tokenizer(tok, src: ModelSource):
    """``tok``, or the saved ``tokenizer.json`` pipeline when transformers' class for the model type encodes
    differently from it.

    transformers 5 picks the tokenizer class from ``config.json``'s model type and may rebuild the pre-tokenizer
    (a ``Qwen2Tokenizer`` over a char-level ``tokenizer.json`` drops spaces and newlines: ``"a b"`` -> ``"ab"``).
    The file as saved is what the model was trained with, so a mismatch on ``PROBE_TEXT`` falls back to the generic
    fast tokenizer over that file, with one warning line.
    """
    file = src.folder / "tokenizer.json"
    if not file.is_file():
        return tok
    from tokenizers import Tokenizer

    try:
        saved = Tokenizer.from_file(str(file)).encode(PROBE_TEXT, add_special_tokens=False).ids
    except Exception:  # noqa: BLE001 -- an unreadable file is for transformers to report
        return tok
    if tok(PROBE_TEXT, add_special_tokens=False)["input_ids"] == saved:
        return tok
    from transformers import PreTrainedTokenizerFast

    name, kwargs = src.from_pretrained_args()
    generic = PreTrainedTokenizerFast.from_pretrained(name, **kwargs)
    if generic(PROBE_TEXT, add_special_tokens=False)["input_ids"] != saved:
        return tok
    if PACKAGE_DIR not in src.folder.resolve().parents:  # the shipped char-level assets are known to need it
        print(f"rlad_pl: warning: {src.field}: transformers' {type(tok).__name__} encodes differently from "
              f"'{src.spec}/tokenizer.json'; using the saved tokenizer.json as is", file=sys.stderr)
    return generic


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def load_causal_lm(path: str | os.PathLike | ModelSource, field: str, dtype: str | torch.dtype = "float32",
                   trainable: bool = True) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` on a resolved source (folder or hub id); frozen models are put in
    eval mode without grad. Load failures (a weights file that cannot be downloaded offline, a corrupt download)
    become one-line ``ConfigError``s naming ``field``."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    src = resolve_source(path, field, kind="model")
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ConfigError(src.field.rsplit(".", 1)[0] + ".dtype", f"unknown dtype '{dtype}' (expected float32, "
                              "bfloat16 or float16)")
        dtype = getattr(torch, dtype)
    name, kwargs = src.from_pretrained_args()
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except SafetensorError as e:  # a file downloaded just now: the header check names it
        _check_weights(ModelSource(src.spec, src.field, src.folder, src.repo_id, src.commit, offline=True),
                       _read_json(src.folder / "model.safetensors.index.json"), src.field)
        raise ConfigError(src.field, f"a weights file of '{src.spec}' ({src.folder}) is corrupt or truncated "
                                     f"({e}); delete it to download it again") from None
    except OSError as e:
        raise ConfigError(src.field, f"cannot load '{src.spec}': {_first_line(e)}") from None
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def check_tokenizers_match(student_tok, teacher_tok, field: str = "model.teacher") -> None:
    """Fail with one line when teacher and student tokenizers would map the same ids to different strings."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))[:3]
        only_t = sorted(set(t_vocab) - set(s_vocab))[:3]
        diff_ids = [k for k in s_vocab if k in t_vocab and s_vocab[k] != t_vocab[k]][:3]
        raise ConfigError(field, f"teacher and student vocabularies differ (student {len(s_vocab)} tokens, teacher "
                                 f"{len(t_vocab)}; only in student: {only_s}, only in teacher: {only_t}, "
                                 f"different ids: {diff_ids}); distillation needs a shared tokenizer")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        s, t = getattr(student_tok, name), getattr(teacher_tok, name)
        if s != t:
            raise ConfigError(field, f"teacher and student special tokens differ: {name} is {t} for the teacher "
                                     f"and {s} for the student")


def shared_vocab_size(tokenizer, *models: torch.nn.Module) -> int:
    """Number of logit columns that mean the same token in every model (embeddings may be padded past the
    tokenizer)."""
    n = len(tokenizer)
    for m in models:
        n_out = m.get_output_embeddings().weight.shape[0]
        if n_out < n:
            raise ConfigError("model", f"a model's output layer has {n_out} rows but the tokenizer has {n} tokens")
    return n
