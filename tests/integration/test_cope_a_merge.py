"""`audio-pipeline models merge-cope-a` on the tiny Gemma 2 with a tiny LoRA adapter.

The adapter's lora_B weights are random, not peft's zeros, so it really changes
the answers; the merged model must score like base + adapter loaded through peft
(scored by the classifier's own code), and unlike the bare base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from audio_pipeline import cli, model_store
from audio_pipeline.classify import (
    ClassifierBackend,
    ClassifierSettings,
    CopeAClassifier,
    cope_a_prompt,
)
from audio_pipeline.config import load_settings
from audio_pipeline.cope_a_merge import MergeError, merge_cope_a
from devtools.dev_models import CLASSIFIER_DIR, install_classifier

MERGED_DIR = "classifier/tiny-gemma2-merged"
LORA_B_STD = 0.3  # large enough to move every score well past the tolerance below
# bf16 rounding of the merged weights moves a score by far less than this
SCORE_TOLERANCE = 0.005
POLICY = "# Policy\n\n## Overview\n\nThreats of violence."
CONTENTS = [
    "I will find you tomorrow.",
    "Buy now, free money!",
    "The birch canoe slid on the smooth planks.",
]


@dataclass(frozen=True)
class Models:
    root: Path
    base: Path
    adapter: Path
    merged: Path


def make_adapter(base: Path, out: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * LORA_B_STD)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("merge")
    base = install_classifier(root)
    adapter = make_adapter(base, root / "adapter")
    merged = merge_cope_a(base, adapter, root / MERGED_DIR)
    return Models(root, base, adapter, merged)


def classifier(root: Path, model: str) -> CopeAClassifier:
    settings = ClassifierSettings(backend=ClassifierBackend.COPE_A, model=model, device="cpu")
    return CopeAClassifier(settings, root)


def scores(clf: CopeAClassifier) -> list[float]:
    return clf.score_prompts([cope_a_prompt(POLICY, c) for c in CONTENTS])


def test_merged_model_scores_like_base_plus_adapter(models: Models) -> None:
    with_adapter = classifier(models.root, CLASSIFIER_DIR)
    with_adapter.model = PeftModel.from_pretrained(with_adapter.model, str(models.adapter)).eval()
    reference = scores(with_adapter)
    bare = scores(classifier(models.root, CLASSIFIER_DIR))
    merged = scores(classifier(models.root, MERGED_DIR))

    assert merged == pytest.approx(reference, abs=SCORE_TOLERANCE)
    # the adapter really changes the answers, so the comparison above means something
    for b, r in zip(bare, reference, strict=True):
        assert abs(b - r) > 4 * SCORE_TOLERANCE


def test_merged_model_is_plain_bf16_safetensors_with_its_tokenizer(models: Models) -> None:
    files = {p.name for p in models.merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "adapter_config.json" not in files
    with safe_open(str(models.merged / "model.safetensors"), framework="pt") as weights:
        dtypes = {weights.get_slice(k).get_dtype() for k in weights.keys()}  # noqa: SIM118
        assert not any("lora" in k for k in weights.keys())  # noqa: SIM118
    assert dtypes == {"BF16"}
    assert json.loads((models.merged / "config.json").read_text())["dtype"] == "bfloat16"
    assert not list(models.merged.parent.glob(".*partial"))


def test_merge_refuses_bad_inputs(models: Models, tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="already exists"):
        merge_cope_a(models.base, models.adapter, models.merged)
    with pytest.raises(MergeError, match="not a peft adapter"):
        merge_cope_a(models.base, models.base, tmp_path / "out")
    with pytest.raises(MergeError, match="not a Hugging Face model"):
        merge_cope_a(models.adapter, models.adapter, tmp_path / "out")


@pytest.mark.integration
def test_cli_merges_and_publishes(
    models: Models, pipeline_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    env_file = tmp_path / "pipeline.env"
    env_file.write_text("".join(f'{k}="{v}"\n' for k, v in pipeline_env.items()))
    out = tmp_path / "cope-a-merged"
    argv = [
        "models",
        "merge-cope-a",
        "--base",
        str(models.base),
        "--adapter",
        str(models.adapter),
        "--out",
        str(out),
        "--publish",
        "classifier/cope-a-test",
        "--env-file",
        str(env_file),
    ]
    assert cli.main(argv) == 0
    assert "published classifier/cope-a-test" in capsys.readouterr().out

    settings = load_settings(pipeline_env)
    manifest = model_store.read_manifest("classifier/cope-a-test", settings)
    assert set(manifest.files) == {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
    }
    synced = model_store.sync(["classifier/cope-a-test"], tmp_path / "models", settings)
    assert synced.changed == ["classifier/cope-a-test"]
    assert scores(classifier(tmp_path / "models", "classifier/cope-a-test")) == pytest.approx(
        scores(classifier(models.root, MERGED_DIR)), abs=1e-6
    )
