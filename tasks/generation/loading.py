"""``load_runner(url)``: the model runner for a language-model URL.

- ``hf:FOLDER``: a Hugging Face causal LM folder (config.json + *.safetensors, and
  tokenizer.json when it has one; local or any fsspec URL), found and loaded by
  :mod:`tasks.models.hf` as training loads it (``local_files_only=True,
  use_safetensors=True`` — never a hub download) and run by the Llama- or GPT-2-family
  runner its ``model_type`` names.
- anything else: one of our checkpoints or optimized models, rebuilt by
  ``tasks.models.loading.load_model``; its folder's ``tokenizer.json`` and ``meta.json``'s
  ``eot_id`` (the LM contract) give the tokenizer and the end-of-text token.
"""

from __future__ import annotations

import json
import os

import fsspec

from storage.errors import ConfigError, SourceError
from tasks.generation.runners.base import ModelRunner

HF_PREFIX = "hf:"


def load_runner(url: str, storage_options: dict | None = None) -> ModelRunner:
    if url.startswith(HF_PREFIX):
        return _load_hf(url[len(HF_PREFIX):], storage_options)
    from tasks.models.loading import load_model

    loaded = load_model(url, storage_options)
    tokenizer = _read_tokenizer(loaded.url.rstrip("/") + "/tokenizer.json", storage_options)
    return runner_for_model(loaded.model, tokenizer=tokenizer, eot_id=loaded.meta.get("eot_id"), source=url)


def runner_for_model(model, tokenizer=None, eot_id: int | None = None, source: str = "the model") -> ModelRunner:
    """The runner for an in-memory model: the built-in GPT or a transformers causal LM."""
    from tasks.models.gpt import GPT

    if isinstance(model, GPT):
        from tasks.generation.runners.gpt import GPTRunner

        return GPTRunner(model, eos_token_ids=() if eot_id is None else (int(eot_id),), tokenizer=tokenizer)
    hf_model = _find_hf_causal_lm(model)
    if hf_model is not None:
        from tasks.generation.runners.hf import runner_for_hf

        runner = runner_for_hf(hf_model, tokenizer)
        if eot_id is not None and int(eot_id) not in runner.eos_token_ids:
            runner.eos_token_ids = (*runner.eos_token_ids, int(eot_id))
        return runner
    raise ConfigError(
        f"{source} is a {type(model).__name__}, not a language model: generation needs the built-in 'gpt' "
        f"or an hf: causal LM (Llama or GPT-2 family)"
    )


def _find_hf_causal_lm(model):
    """The transformers model itself, or the one a training wrapper holds (an LM checkpoint of
    an ``hf:`` model may rebuild as a module around it)."""
    if not hasattr(model, "modules"):
        return None
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def _load_hf(url: str, storage_options: dict | None = None) -> ModelRunner:
    """An ``hf:`` folder through :mod:`tasks.models.hf` (the one place that finds, copies and
    loads such folders), after checking its architecture is one generation runs."""
    from tasks.models.hf import build, local_folder

    folder = local_folder(url, storage_options)  # checks config.json is there
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:  # plain JSON: no weights, no hub
        model_type = json.load(f).get("model_type")
    from tasks.generation.runners.hf import GPT2_FAMILY, LLAMA_FAMILY

    if model_type not in LLAMA_FAMILY + GPT2_FAMILY:
        raise ConfigError(f"hf:{url} is a {model_type!r} model; generation supports "
                          f"{', '.join(LLAMA_FAMILY + GPT2_FAMILY)}")
    model = build(url, storage_options=storage_options)
    return runner_for_model(model, tokenizer=_read_tokenizer(os.path.join(folder, "tokenizer.json")),
                            source=f"hf:{url}")


def is_language_model(url: str, storage_options: dict | None = None) -> bool:
    """Whether ``url`` names a language model: an ``hf:`` folder, or a checkpoint or optimized
    model whose metadata says ``task: causal-lm``; a missing checkpoint raises its usual error."""
    if url.startswith(HF_PREFIX):
        return True
    from storage import checkpoint as ckpt

    _, meta = ckpt.read_meta(url, storage_options, formats=(ckpt.FORMAT_ID, ckpt.MODEL_FORMAT_ID))
    return meta.get("task") == "causal-lm"


def _read_tokenizer(url: str, storage_options: dict | None = None):
    fs, path = fsspec.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        return None
    from tokenizers import Tokenizer

    with fs.open(path, "rb") as f:
        text = f.read().decode("utf-8")
    try:
        json.loads(text)
        return Tokenizer.from_str(text)
    except Exception as exc:  # a corrupt tokenizer file is the user's data, not a bug
        raise SourceError(f"{url}: not a readable tokenizer.json ({exc})") from None
