"""The lexicon backend and the classifier settings: pure logic, no model."""

from __future__ import annotations

from pathlib import Path

import pytest

from audio_pipeline.classify import (
    ClassifierBackend,
    ClassifierSettings,
    ClassifyItem,
    LexiconClassifier,
    Policy,
    TextSegment,
    cope_a_prompt,
    lexicon_score,
    load_classifier,
)
from audio_pipeline.config import ConfigError

VIOLENCE = Policy(1, "violence", 1, "# Policy\n\nThreats of violence.", ("kill", "beat up"))
SPAM = Policy(2, "spam", 3, "# Policy\n\nUnsolicited offers.", ("free money", "buy now"))


def item(key: int, *segments: str) -> ClassifyItem:
    segs = [TextSegment(float(i), float(i + 1), text) for i, text in enumerate(segments)]
    return ClassifyItem(key, " ".join(segments), segs)


def test_whole_words_and_phrases_case_insensitive() -> None:
    clf = LexiconClassifier()
    verdicts = clf.classify(
        [
            item(10, "I will KILL you.", "Then I'll beat\n up your car."),
            item(11, "Skill is killer."),
        ],
        [VIOLENCE, SPAM],
    )
    by_key = {(v.key, v.policy_id): v for v in verdicts}
    assert [(v.key, v.policy_id) for v in verdicts] == [(10, 1), (10, 2), (11, 1), (11, 2)]

    flagged = by_key[(10, 1)]
    assert flagged.score == pytest.approx(0.75)  # two hits
    assert flagged.label == 1
    assert flagged.model == "lexicon-v1"
    assert flagged.threshold == 0.5
    assert flagged.evidence_json() == [
        {"segment": 0, "start": 0.0, "end": 1.0, "score": 0.5, "terms": ["kill"]},
        {"segment": 1, "start": 1.0, "end": 2.0, "score": 0.5, "terms": ["beat up"]},
    ]
    # "Skill" and "killer" contain "kill" but are other words.
    assert by_key[(11, 1)].score == 0.0
    assert by_key[(11, 1)].label == 0
    assert by_key[(11, 1)].evidence == []
    assert by_key[(10, 2)].label == 0


def test_score_formula_and_threshold() -> None:
    assert [lexicon_score(n) for n in range(4)] == [0.0, 0.5, 0.75, 0.875]
    strict = LexiconClassifier(threshold=0.8)
    (verdict,) = strict.classify([item(1, "kill kill")], [VIOLENCE])
    assert verdict.score == pytest.approx(0.75)
    assert verdict.label == 0
    assert verdict.threshold == 0.8


def test_policy_without_lexicon_never_flags() -> None:
    empty = Policy(3, "empty", 1, "text", ())
    (verdict,) = LexiconClassifier().classify([item(1, "kill")], [empty])
    assert (verdict.score, verdict.label) == (0.0, 0)


def test_regex_characters_in_terms_are_literal() -> None:
    policy = Policy(4, "symbols", 1, "text", ("c++", "a.b"))
    (verdict,) = LexiconClassifier().classify([item(1, "I like c++ and axb")], [policy])
    assert verdict.score == 0.5
    assert verdict.evidence[0].terms == ["c++"]


def test_settings_default_to_lexicon_without_torch() -> None:
    settings = ClassifierSettings.from_env({})
    assert settings.backend is ClassifierBackend.LEXICON
    assert settings.threshold == 0.5
    assert isinstance(load_classifier(Path("/nonexistent"), settings), LexiconClassifier)


def test_settings_errors_name_every_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        ClassifierSettings.from_env(
            {"CLASSIFIER_BACKEND": "gpt", "FLAG_THRESHOLD": "1.5", "CLASSIFIER_MAX_TOKENS": "x"}
        )
    message = str(caught.value)
    assert "CLASSIFIER_BACKEND='gpt'" in message
    assert "FLAG_THRESHOLD=1.5" in message
    assert "CLASSIFIER_MAX_TOKENS='x'" in message


def test_cope_a_prompt_is_the_trained_format() -> None:
    assert cope_a_prompt("# Policy\n\nP.", "Some content.") == (
        "INSTRUCTIONS\n============\n\n"
        "Examine the given POLICY and determine if the given CONTENT meets the criteria for "
        'ANY of the LABELS. Answer "1" if yes, and "0" if no.\n\n\n'
        "POLICY\n======\n\n# Policy\n\nP.\n\n\n"
        "CONTENT\n=======\n\nSome content.\n\n\n"
        "ANSWER\n======\n\n"
    )


def test_importing_the_lexicon_path_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, audio_pipeline.classify as c, audio_pipeline.asr;"
        "c.load_classifier(__import__('pathlib').Path('/x'), c.ClassifierSettings());"
        "heavy = ('torch', 'transformers', 'whisperx', 'faster_whisper');"
        "bad = [m for m in heavy if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_term_at_the_end_of_a_very_long_transcript_flags():
    """The lexicon has no context limit: it reads the whole text, in one window."""
    benign = "The birch canoe slid on the smooth planks. " * 50_000
    [verdict] = LexiconClassifier().classify([item(1, benign, "I will kill you.")], [VIOLENCE])
    assert verdict.label == 1
    assert (verdict.windows, verdict.truncated) == (1, False)
    assert [e.segment for e in verdict.evidence] == [1]
