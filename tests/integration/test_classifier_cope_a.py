"""The cope-a backend through its real loading and scoring code, on the tiny Gemma 2
that dev_models builds (random weights: scores are meaningless but exact)."""

from __future__ import annotations

import hashlib
import itertools
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
from devtools.dev_models import CLASSIFIER_DIR, install_classifier
from tests.support.rows import add_audio_file, add_batch, add_policy

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
        assert (v.windows, v.truncated) == (1, False)
    first = verdicts[0]
    assert [e.segment for e in first.evidence] == [0, 1]
    assert all(0.0 <= e.score <= 1.0 and e.terms == [] for e in first.evidence)
    assert verdicts[2].evidence == []  # no segments given


def test_threshold_above_every_score_flags_nothing(models_root: Path) -> None:
    clf = load_classifier(models_root, settings(threshold=1.0))
    verdicts = clf.classify(items(), POLICIES)
    assert all(v.label == 0 and v.evidence == [] for v in verdicts)


# --- long transcripts: judged in windows that cover all of it ------------------------

# The tiny model's context for these tests: about 100 content tokens per prompt
# beside POLICIES[0], so FILLER alone spans several windows.
SMALL_CONTEXT = 200
FILLERS = [
    "Glue the sheet to the dark blue background. ",
    "The birch canoe slid on the smooth planks. ",
    "It is easy to tell the depth of a well. ",
    "A pot of tea helps to pass the evening. ",
]
FILLER = FILLERS[0] * 40
# Appended to filler, each lands in the last window or two. The random model's
# scores mean nothing, so the test picks the first filler and trigger where a window
# holding the trigger outscores every window without it, and puts the threshold
# between them.
TRIGGERS = [
    "Give me the money or else.",
    "I will kill you tomorrow.",
    "Weapon attack, kill kill kill.",
    "Buy now, free money, scam spam.",
]


def window_scores(
    clf: CopeAClassifier, policy: Policy, content: str
) -> tuple[list[str], list[float]]:
    windows = clf.windows(policy.text, content)
    assert not windows.truncated
    return windows.texts, clf.score_prompts([cope_a_prompt(policy.text, t) for t in windows.texts])


def test_windows_cover_the_whole_transcript_with_overlap(models_root: Path) -> None:
    clf = load_classifier(models_root, settings(max_tokens=SMALL_CONTEXT))
    assert isinstance(clf, CopeAClassifier)
    # numbered, so each window's text occurs once in the transcript
    content = " ".join(f"Plank number {i} slid on the canoe." for i in range(60))
    texts = clf.windows(POLICIES[0].text, content).texts
    assert len(texts) > 3
    starts = [content.index(t) for t in texts]
    ends = [start + len(t) for start, t in zip(starts, texts, strict=True)]
    assert starts[0] == 0
    assert ends[-1] == len(content)
    for i in range(1, len(texts)):
        assert starts[i] < ends[i - 1], f"window {i} does not overlap the one before"
        assert ends[i] > ends[i - 1]
    # every prompt fits the context, also where cuts fall inside multi-byte characters
    for text in (content, "ÜNÏCÖDÉ 日本語 の 声 😀🎉 " * 50):
        for t in clf.windows(POLICIES[0].text, text).texts:
            prompt = cope_a_prompt(POLICIES[0].text, t)
            assert len(clf.tokenizer(prompt)["input_ids"]) <= SMALL_CONTEXT


def test_a_violation_past_the_first_window_flags_the_file(models_root: Path, monkeypatch) -> None:
    probe = load_classifier(models_root, settings(max_tokens=SMALL_CONTEXT))
    assert isinstance(probe, CopeAClassifier)
    policy = POLICIES[0]
    for filler, trigger in itertools.product(FILLERS, TRIGGERS):
        content = filler * 40 + trigger
        texts, scores = window_scores(probe, policy, content)
        hot = [s for t, s in zip(texts, scores, strict=True) if trigger in t]
        cold = [s for t, s in zip(texts, scores, strict=True) if trigger not in t]
        if hot and max(hot) - max(cold) >= 1e-3:
            break
    else:
        pytest.fail("no trigger outscores the windows of its filler")
    assert trigger not in texts[0], "the violation is past the first window"
    threshold = (max(cold) + max(hot)) / 2

    clf = load_classifier(models_root, settings(max_tokens=SMALL_CONTEXT, threshold=threshold))
    assert isinstance(clf, CopeAClassifier)
    scored: list[str] = []
    real_score = clf.score_prompts
    monkeypatch.setattr(clf, "score_prompts", lambda ps: scored.extend(ps) or real_score(ps))
    [verdict] = clf.classify([ClassifyItem(7, content)], [policy])

    assert scored == [cope_a_prompt(policy.text, t) for t in texts], "every window, once"
    assert verdict.windows == len(texts)
    assert not verdict.truncated
    assert verdict.score == pytest.approx(max(scores), abs=1e-5), "the most severe window"
    assert verdict.label == 1
    # What one prompt cut to the context (the behaviour before windows) judged:
    first_only = clf._fit(policy.text, content)
    assert first_only.truncated
    assert real_score([first_only.text])[0] < threshold, "the first window alone would not flag"


def test_text_past_the_window_cap_is_left_out_and_says_so(models_root: Path, caplog) -> None:
    clf = load_classifier(models_root, settings(max_tokens=SMALL_CONTEXT, max_windows=2))
    long_item = ClassifyItem(9, FILLER + "I will kill you tomorrow.")
    with caplog.at_level("WARNING"):
        verdicts = clf.classify([long_item, items()[2]], POLICIES[:1])

    assert (verdicts[0].windows, verdicts[0].truncated) == (2, True)
    assert (verdicts[1].windows, verdicts[1].truncated) == (1, False)
    assert "event=classify.truncated audio_id=9 policy_id=1 windows=2" in caplog.text


@pytest.mark.integration
def test_the_classification_row_records_windows_and_truncation(models_root: Path, db_conn) -> None:
    from audio_pipeline.asr import Transcript
    from audio_pipeline.classify import LexiconClassifier
    from audio_pipeline.records.results import FileResult, save_results

    add_batch(db_conn, "b-win")
    ids = [add_audio_file(db_conn, "b-win", n, "transcribing") for n in ("long.mp3", "capped.mp3")]
    policy = add_policy(db_conn, "violence", POLICIES[0].text, lexicon=["kill"])
    db_conn.commit()
    policies = [Policy(policy, "violence", 1, POLICIES[0].text, ("kill",))]
    text = FILLER + "I will kill you tomorrow."
    windowed = load_classifier(models_root, settings(max_tokens=SMALL_CONTEXT))
    capped = load_classifier(models_root, settings(max_tokens=SMALL_CONTEXT, max_windows=2))
    lexicon = LexiconClassifier()

    def result(audio_id: int, *verdicts: list) -> FileResult:
        transcript = Transcript(text, "en", 1.0, [], 60.0, 1.0, "whisper/tiny.en", "fw")
        return FileResult(audio_id, transcript, [v for vs in verdicts for v in vs])

    item = ClassifyItem(0, text)
    save_results(
        db_conn,
        [
            result(ids[0], windowed.classify([item], policies), lexicon.classify([item], policies)),
            result(ids[1], capped.classify([item], policies)),
        ],
    )

    rows = db_conn.execute(
        "SELECT audio_id, model, windows, truncated, label FROM classifications "
        "ORDER BY audio_id, model"
    ).fetchall()
    by_key = {(r["audio_id"], r["model"]): r for r in rows}
    long_row = by_key[(ids[0], CLASSIFIER_DIR)]
    assert long_row["windows"] > 3
    assert long_row["truncated"] is False
    assert (
        by_key[(ids[0], "lexicon-v1")]["windows"],
        by_key[(ids[0], "lexicon-v1")]["truncated"],
    ) == (1, False)
    assert by_key[(ids[0], "lexicon-v1")]["label"] == 1, "the lexicon reads the whole text"
    assert (
        by_key[(ids[1], CLASSIFIER_DIR)]["windows"],
        by_key[(ids[1], CLASSIFIER_DIR)]["truncated"],
    ) == (2, True)


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
