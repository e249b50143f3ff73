"""Merge the CoPE-A LoRA adapter into its Gemma-2 base: the model the workers load.

CoPE-A (zentropi-ai/cope-a-9b) ships as a LoRA adapter on google/gemma-2-9b. The
gpu worker loads one plain causal LM from ``MODELS_ROOT/CLASSIFIER_MODEL`` (no
peft at run time, and no adapter arithmetic per forward pass), so the adapter is
folded into the base weights once, on the operator's machine, and the result is
published to the model store for every GPU host to sync:

    audio-pipeline models merge-cope-a --base gemma-2-9b/ --adapter cope-a-9b/ \\
        --out cope-a-9b-merged/ --publish classifier/cope-a-9b

Both inputs are local directories (downloaded once from the gated hub pages by
whoever has access); nothing is fetched here. The base is loaded in bf16, the
dtype Gemma 2 is trained in (fp16 overflows), merged with peft's
``merge_and_unload`` and saved as bf16 safetensors with the tokenizer, written to
a temporary directory beside ``out`` and renamed into place when complete.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DTYPE = "bfloat16"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


class MergeError(RuntimeError):
    """The inputs cannot be merged; the message says which and why."""


def _tokenizer_source(base: Path, adapter: Path) -> Path:
    """The adapter's tokenizer when it carries one (it was trained with it), else the base's."""
    if any((adapter / f).is_file() for f in TOKENIZER_FILES):
        return adapter
    return base


def merge_cope_a(base: Path, adapter: Path, out: Path, dtype: str = DEFAULT_DTYPE) -> Path:
    """Merge ``adapter`` into ``base`` and save the merged model and tokenizer at ``out``.

    ``out`` must not exist yet (a merge never overwrites a model in use).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter, out = Path(base), Path(adapter), Path(out)
    if not (base / "config.json").is_file():
        raise MergeError(f"--base {base}: no config.json (not a Hugging Face model directory)")
    if not (adapter / "adapter_config.json").is_file():
        raise MergeError(f"--adapter {adapter}: no adapter_config.json (not a peft adapter)")
    if out.exists():
        raise MergeError(f"--out {out} already exists: choose a new directory")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise MergeError(f"unknown dtype {dtype!r}")

    log.info("event=merge.load base=%s adapter=%s dtype=%s", base, adapter, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(base), dtype=torch_dtype, local_files_only=True
    )
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    merged = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(
        str(_tokenizer_source(base, adapter)), local_files_only=True
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        merged.save_pretrained(str(partial), safe_serialization=True)
        tokenizer.save_pretrained(str(partial))
        partial.rename(out)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    log.info("event=merge.saved out=%s", out)
    return out
