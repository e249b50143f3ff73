"""The cope-a backend through its real loading and scoring code, on the tiny Gemma 2
that dev_models builds (random weights: scores are meaningless but exact)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from audio_pipeline.classify import (
    ClassifierBackend,
    ClassifierSettings,
    ClassifyItem,
    CopeAClassifier,
    Policy,
    TextSegment,
    cope_a_prompt,
    load_classifier,
)
from audio_pipeline.dev_models import CLASSIFIER_DIR, install_classifier

POLICIES = [
    Policy(1, "violence", 1, "# Policy\n\n## Overview\n\nThreats of violence.", ("kill",)),
    Policy(2, "spam", 2, "# Policy\n\n## Overview\n\nUnsolicited commercial offers.", ()),
]


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    install_classifier(root)
    return root


def settings(**overrides) -> ClassifierSettings:
    return ClassifierSettings(
        backend=ClassifierBackend.COPE_A, model=CLASSIFIER_DIR, device="cpu", **overrides
    )


@pytest.fixture(scope="module")
def classifier(models_root: Path) -> CopeAClassifier:
    clf = load_classifier(models_root, settings(batch_size=3))
    assert isinstance(clf, CopeAClassifier)
    return clf


def items() -> list[ClassifyItem]:
    return [
        ClassifyItem(
            1,
            "Good morning. I will find you tomorrow.",
            [TextSegment(0.0, 1.0, "Good morning."), TextSegment(1.2, 3.0, "I will find you.")],
        ),
        ClassifyItem(2, "The birch canoe slid on the smooth planks. " * 5),
        ClassifyItem(3, "Buy now."),
    ]


def test_answer_tokens_are_single_tokens(classifier: CopeAClassifier) -> None:
    assert classifier.yes_id != classifier.no_id
    assert classifier.tokenizer.decode([classifier.yes_id]) == "1"
    assert classifier.tokenizer.decode([classifier.no_id]) == "0"


def test_score_is_the_softmax_of_the_two_answer_logits(classifier: CopeAClassifier) -> None:
    prompt = cope_a_prompt(POLICIES[0].text, "I will find you tomorrow.")
    (score,) = classifier.score_prompts([prompt])

    # By hand: one unpadded forward pass of the model loaded straight from disk.
    enc = classifier.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = classifier.model(**enc).logits[0, -1]
    l1, l0 = logits[classifier.yes_id].item(), logits[classifier.no_id].item()
    manual = torch.softmax(torch.tensor([l1, l0]), dim=0)[0].item()
    assert 0.0 <= score <= 1.0
    assert score == pytest.approx(manual, abs=1e-5)


def test_left_padded_batches_score_like_single_prompts(classifier: CopeAClassifier) -> None:
    prompts = [
        cope_a_prompt(p.text, i.text) for i in items() for p in POLICIES
    ]  # lengths differ, so every batch of 3 pads some rows
    batched = classifier.score_prompts(prompts)
    alone = [classifier.score_prompts([p])[0] for p in prompts]
    assert batched == pytest.approx(alone, abs=1e-5)


def test_classify_gives_a_verdict_per_item_and_policy(models_root: Path) -> None:
    # A threshold of 0 flags everything, so evidence is computed for every item.
    clf = load_classifier(models_root, settings(threshold=0.0))
    verdicts = clf.classify(items(), POLICIES)

    assert [(v.key, v.policy_id) for v in verdicts] == [(k, p) for k in (1, 2, 3) for p in (1, 2)]
    for v in verdicts:
        assert v.model == CLASSIFIER_DIR
        assert 0.0 <= v.score <= 1.0
        assert v.label == 1
        assert v.threshold == 0.0
        assert not v.truncated
    first = verdicts[0]
    assert [e.segment for e in first.evidence] == [0, 1]
    assert all(0.0 <= e.score <= 1.0 and e.terms == [] for e in first.evidence)
    assert verdicts[2].evidence == []  # no segments given


def test_threshold_above_every_score_flags_nothing(models_root: Path) -> None:
    clf = load_classifier(models_root, settings(threshold=1.0))
    verdicts = clf.classify(items(), POLICIES)
    assert all(v.label == 0 and v.evidence == [] for v in verdicts)


def test_long_content_is_truncated_to_fit_and_says_so(models_root: Path, caplog) -> None:
    clf = load_classifier(models_root, settings(max_tokens=200))
    long_item = ClassifyItem(9, "The juice of lemons makes fine punch. " * 100)
    with caplog.at_level("WARNING"):
        verdicts = clf.classify([long_item, items()[2]], POLICIES[:1])

    assert verdicts[0].truncated
    assert not verdicts[1].truncated
    assert "event=classify.truncated audio_id=9" in caplog.text
    fitted = clf._fit(POLICIES[0].text, long_item.text)
    assert len(clf.tokenizer(fitted.text)["input_ids"]) <= 200
    assert fitted.text.endswith("\n\n\nANSWER\n======\n\n")


def test_dev_model_build_is_deterministic(tmp_path: Path, models_root: Path) -> None:
    again = install_classifier(tmp_path)

    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    assert digest(again) == digest(models_root / CLASSIFIER_DIR)
    assert (again / "tokenizer.json").read_text() == (
        models_root / CLASSIFIER_DIR / "tokenizer.json"
    ).read_text()


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    from audio_pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"classifier model directory .* does not exist"):
        load_classifier(tmp_path, settings())
