"""Policy classifiers: transcripts in, one verdict per (transcript, policy) out.

Backends (``CLASSIFIER_BACKEND``):

* ``lexicon`` (default; no torch needed, so CPU fleet hosts and the demo run it):
  each policy's lexicon terms matched as whole words or phrases, case-insensitive.
  score = 1 - 0.5 ** hits (0 hits -> 0, 1 -> 0.5, 2 -> 0.75, ...), so with the
  default threshold 0.5 one hit flags. Its model name is ``lexicon-v1``, so the
  database says a word list, not a model, made the verdict.
* ``cope-a``: a CoPE-A style causal LM (production: zentropi-ai/cope-a-9b merged
  into Gemma-2-9B) from ``MODELS_ROOT/CLASSIFIER_MODEL``, prompted with the
  INSTRUCTIONS / POLICY / CONTENT / ANSWER format of ../shared/notes/cope-a.md.
  score = p("1") / (p("1") + p("0")) from the last position's logits. Prompts run
  in batches with left padding. torch and transformers are imported only here.

Long transcripts: the lexicon matches the whole text. CoPE-A judges at most
CLASSIFIER_MAX_TOKENS per prompt, so a transcript whose content does not fit is
judged in overlapping windows of the content budget, each prompt holding the whole
policy; the verdict is the most severe window (max score), so long benign speech
cannot hide a later violation. At most CLASSIFIER_MAX_WINDOWS windows are scored per
transcript and policy; text past them is judged by none, and the verdict says so
(``truncated``; stored with ``windows`` on the classification row).

Evidence (classifications.evidence): the segments that drove a verdict, as
``{"segment", "start", "end", "score", "terms"}``. Lexicon: every segment holding a
term. cope-a: for flagged items only, every segment is scored alone in one extra
batched pass; those at or above the threshold are kept, or the top few if none is.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from audio_pipeline.config import ConfigError, Device, EnvReader, EnvSettings

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # CoPE-A's own "uncertain" point
DEFAULT_CLASSIFIER_MODEL = "classifier/cope-a-9b"
DEFAULT_MAX_TOKENS = 8192  # CoPE-A was trained on policy + content within 8K tokens
DEFAULT_CLASSIFIER_BATCH = 8  # prompts per forward pass
# Windows per transcript and policy: 32 windows of an 8K context hold many hours of
# speech; the cap bounds the GPU time one file can take.
DEFAULT_MAX_WINDOWS = 32
# Neighbouring windows share 1/8 of a window, so a sentence cut at one window's
# edge is whole in the next.
WINDOW_OVERLAP_DIVISOR = 8
# Text cut at token boundaries takes a few more tokens when tokenized again inside
# the prompt (a merge lost at the cut, a character split across byte tokens).
CUT_SLACK_TOKENS = 8
EVIDENCE_TOP_K = 3  # cope-a: segments kept when none reaches the threshold alone
LEXICON_MODEL = "lexicon-v1"
LEXICON_HIT_DECAY = 0.5  # each further hit halves the distance to 1

COPE_A_INSTRUCTIONS = (
    "Examine the given POLICY and determine if the given CONTENT meets the criteria for ANY "
    'of the LABELS. Answer "1" if yes, and "0" if no.'
)
COPE_A_TEMPLATE = (
    "INSTRUCTIONS\n============\n\n{instructions}\n\n\n"
    "POLICY\n======\n\n{policy}\n\n\n"
    "CONTENT\n=======\n\n{content}\n\n\n"
    "ANSWER\n======\n\n"
)


class ClassifierBackend(StrEnum):
    LEXICON = "lexicon"
    COPE_A = "cope-a"


@dataclass(frozen=True)
class ClassifierSettings(EnvSettings):
    """CLASSIFIER_* and FLAG_THRESHOLD variables; read with ``from_env``."""

    backend: ClassifierBackend = ClassifierBackend.LEXICON
    model: str = DEFAULT_CLASSIFIER_MODEL  # relative to MODELS_ROOT (cope-a only)
    threshold: float = DEFAULT_THRESHOLD
    max_tokens: int = DEFAULT_MAX_TOKENS
    batch_size: int = DEFAULT_CLASSIFIER_BATCH
    device: str = Device.AUTO
    max_windows: int = DEFAULT_MAX_WINDOWS

    @classmethod
    def read(cls, env: EnvReader) -> ClassifierSettings:
        return cls(
            backend=env.choice("CLASSIFIER_BACKEND", ClassifierBackend, cls.backend),
            model=env.str("CLASSIFIER_MODEL", cls.model),
            threshold=env.float("FLAG_THRESHOLD", DEFAULT_THRESHOLD, minimum=0.0, maximum=1.0),
            max_tokens=env.int(
                "CLASSIFIER_MAX_TOKENS", DEFAULT_MAX_TOKENS, minimum=64, maximum=1 << 20
            ),
            batch_size=env.int(
                "CLASSIFIER_BATCH_SIZE", DEFAULT_CLASSIFIER_BATCH, minimum=1, maximum=4096
            ),
            device=env.choice("CLASSIFIER_DEVICE", Device, Device.AUTO),
            max_windows=env.int(
                "CLASSIFIER_MAX_WINDOWS", DEFAULT_MAX_WINDOWS, minimum=1, maximum=1 << 20
            ),
        )


@dataclass(frozen=True)
class Policy:
    """One active policy version (a row of the policies table)."""

    id: int
    name: str
    version: int
    text: str
    lexicon: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextSegment:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class ClassifyItem:
    """One transcript to judge; ``key`` comes back on its verdicts (the audio_id)."""

    key: int
    text: str
    segments: Sequence[TextSegment] = ()


@dataclass(frozen=True)
class Evidence:
    segment: int  # index into the transcript's segments
    start: float
    end: float
    score: float
    terms: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    """One row of classifications: a model's judgement of one item under one policy."""

    key: int
    policy_id: int
    model: str
    score: float
    label: int  # 1 = meets the policy (flagged), 0 = does not
    threshold: float
    evidence: list[Evidence] = field(default_factory=list)
    windows: int = 1  # prompts the content was judged in; the score is their max
    truncated: bool = False  # some of the content was in no window (judged by nothing)

    @classmethod
    def judged(
        cls,
        classifier: Classifier,
        item: ClassifyItem,
        policy: Policy,
        score: float,
        evidence: list[Evidence],
        windows: int = 1,
        truncated: bool = False,
    ) -> Verdict:
        """``classifier``'s verdict on ``item`` under ``policy`` for ``score``."""
        return cls(
            key=item.key,
            policy_id=policy.id,
            model=classifier.model_name,
            score=round(score, 6),
            label=label_for(score, classifier.threshold),
            threshold=classifier.threshold,
            evidence=evidence,
            windows=windows,
            truncated=truncated,
        )

    def evidence_json(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.evidence]


class Classifier(Protocol):
    model_name: str
    threshold: float

    def classify(self, items: Sequence[ClassifyItem], policies: Sequence[Policy]) -> list[Verdict]:
        """A verdict for every (item, policy) pair, items outer, policies inner."""
        ...


def label_for(score: float, threshold: float) -> int:
    return int(score >= threshold)


# --- lexicon -------------------------------------------------------------------


def term_pattern(term: str) -> re.Pattern[str]:
    """A term as a whole word or phrase: any run of spaces inside it matches any
    whitespace, and it may not be glued to letters or digits on either side."""
    words = [re.escape(w) for w in term.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


def lexicon_score(hits: int) -> float:
    return 1.0 - LEXICON_HIT_DECAY**hits


class LexiconClassifier:
    """Whole-word/phrase matching of each policy's lexicon terms."""

    model_name = LEXICON_MODEL

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self._patterns: dict[str, re.Pattern[str]] = {}

    def _pattern(self, term: str) -> re.Pattern[str]:
        if term not in self._patterns:
            self._patterns[term] = term_pattern(term)
        return self._patterns[term]

    def _hits(self, text: str, terms: Sequence[str]) -> dict[str, int]:
        counts = {t: len(self._pattern(t).findall(text)) for t in terms if t.strip()}
        return {t: n for t, n in counts.items() if n}

    def classify(self, items: Sequence[ClassifyItem], policies: Sequence[Policy]) -> list[Verdict]:
        verdicts = []
        for item in items:
            for policy in policies:
                hits = self._hits(item.text, policy.lexicon)
                score = lexicon_score(sum(hits.values()))
                evidence = []
                for index, seg in enumerate(item.segments):
                    seg_hits = self._hits(seg.text, list(hits))
                    if seg_hits:
                        evidence.append(
                            Evidence(
                                segment=index,
                                start=seg.start,
                                end=seg.end,
                                score=round(lexicon_score(sum(seg_hits.values())), 4),
                                terms=sorted(seg_hits),
                            )
                        )
                # One window: the whole text is judged, whatever its length.
                verdicts.append(Verdict.judged(self, item, policy, score, evidence))
        return verdicts


# --- cope-a --------------------------------------------------------------------


def cope_a_prompt(policy: str, content: str) -> str:
    """The exact prompt CoPE-A was trained on (no chat template)."""
    return COPE_A_TEMPLATE.format(
        instructions=COPE_A_INSTRUCTIONS, policy=policy.strip(), content=content.strip()
    )


@dataclass(frozen=True)
class _Prompt:
    text: str
    truncated: bool


@dataclass(frozen=True)
class ContentWindows:
    """The pieces of one transcript that are judged, each in a prompt of its own."""

    texts: list[str]
    truncated: bool  # text past the last window is judged by none


def window_spans(
    n_tokens: int, size: int, overlap: int, max_windows: int
) -> tuple[list[tuple[int, int]], bool]:
    """Token ranges [start, end) of windows of ``size`` tokens, each starting
    ``size - overlap`` after the previous one, until one reaches the end or
    ``max_windows`` are taken; and whether tokens were left out."""
    if size < 1 or max_windows < 1 or not 0 <= overlap < size:
        raise ValueError(f"bad windows: size={size} overlap={overlap} max={max_windows}")
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + size, n_tokens)
        spans.append((start, end))
        if end >= n_tokens:
            return spans, False
        if len(spans) == max_windows:
            return spans, True
        start += size - overlap


class CopeAClassifier:
    """A CoPE-A style causal LM scored on its "1" / "0" answer token."""

    def __init__(self, settings: ClassifierSettings, models_root: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = models_root / settings.model
        if not path.is_dir():
            raise ConfigError(
                f"classifier model directory {path} does not exist (MODELS_ROOT={models_root}, "
                f"CLASSIFIER_MODEL={settings.model!r})"
            )
        self.torch = torch
        self.settings = settings
        self.threshold = settings.threshold
        self.model_name = settings.model
        device = str(settings.device)
        if device == Device.AUTO:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        # Gemma 2 is trained in bf16 and overflows in fp16; CPUs are fastest in fp32.
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.tokenizer.padding_side = "left"  # the answer is read at the last position
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype
        ).to(device)
        self.model.eval()
        self.yes_id = self._single_token_id("1")
        self.no_id = self._single_token_id("0")
        log.info(
            "classifier loaded: backend=cope-a model=%s device=%s dtype=%s", path, device, dtype
        )

    def _single_token_id(self, answer: str) -> int:
        ids = self.tokenizer.encode(answer, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(
                f"classifier tokenizer encodes {answer!r} as {len(ids)} tokens; a CoPE-A "
                "model must answer with the single token '1' or '0'"
            )
        return int(ids[0])

    @cached_property
    def _template_tokens(self) -> int:
        """Tokens of the prompt around an empty policy and content (specials included)."""
        return len(self.tokenizer(cope_a_prompt("", ""))["input_ids"])

    def _budget(self, policy: str) -> int:
        """Content tokens that fit in one prompt beside ``policy``."""
        budget = (
            self.settings.max_tokens
            - self._template_tokens
            - len(self.tokenizer.encode(policy.strip(), add_special_tokens=False))
            - CUT_SLACK_TOKENS
        )
        if budget <= 0:
            raise ValueError(
                f"the policy alone exceeds CLASSIFIER_MAX_TOKENS={self.settings.max_tokens}"
            )
        return budget

    def _fit(self, policy: str, content: str) -> _Prompt:
        """The prompt, with the content cut at a token boundary if it would not fit.

        Only evidence uses it (one segment per prompt); the verdict's windows cover
        a segment longer than one window.
        """
        budget = self._budget(policy)
        content = content.strip()
        encoded = self.tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)
        if len(encoded["input_ids"]) <= budget:
            return _Prompt(cope_a_prompt(policy, content), truncated=False)
        cut = encoded["offset_mapping"][budget - 1][1]
        return _Prompt(cope_a_prompt(policy, content[:cut]), truncated=True)

    def windows(self, policy: str, content: str) -> ContentWindows:
        """``content`` cut at token boundaries into the windows judged under ``policy``."""
        budget = self._budget(policy)
        content = content.strip()
        encoded = self.tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
        if len(offsets) <= budget:
            return ContentWindows([content], truncated=False)
        spans, truncated = window_spans(
            len(offsets), budget, budget // WINDOW_OVERLAP_DIVISOR, self.settings.max_windows
        )
        texts = [content[offsets[start][0] : offsets[end - 1][1]] for start, end in spans]
        return ContentWindows(texts, truncated)

    def score_prompts(self, prompts: Sequence[str]) -> list[float]:
        """p("1") / (p("1") + p("0")) at the last position, for each prompt."""
        torch = self.torch
        scores: list[float] = [0.0] * len(prompts)
        # Similar lengths together: less padding per batch.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        size = self.settings.batch_size
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            enc = self.tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True).to(
                self.device
            )
            # Left padding shifts positions; give each row positions counted from its
            # first real token, as if it had been run alone.
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    position_ids=positions,
                    logits_to_keep=1,
                ).logits[:, -1, :]
            pair = logits[:, [self.yes_id, self.no_id]].float()
            probs = torch.softmax(pair, dim=-1)[:, 0].tolist()
            for i, p in zip(chunk, probs, strict=True):
                scores[i] = float(p)
        return scores

    def classify(self, items: Sequence[ClassifyItem], policies: Sequence[Policy]) -> list[Verdict]:
        pairs = [(item, policy) for item in items for policy in policies]
        windows = [self.windows(p.text, item.text) for item, p in pairs]
        for (item, policy), w in zip(pairs, windows, strict=True):
            if w.truncated:
                log.warning(
                    "event=classify.truncated audio_id=%s policy_id=%s windows=%s max_tokens=%s",
                    item.key,
                    policy.id,
                    len(w.texts),
                    self.settings.max_tokens,
                )
        # Every window of every pair in one batched pass, then the max per pair.
        flat = self.score_prompts(
            [
                cope_a_prompt(policy.text, text)
                for (_, policy), w in zip(pairs, windows, strict=True)
                for text in w.texts
            ]
        )
        scores: list[float] = []
        start = 0
        for w in windows:
            scores.append(max(flat[start : start + len(w.texts)]))
            start += len(w.texts)
        evidence = self._evidence(
            [pair for pair, s in zip(pairs, scores, strict=True) if s >= self.threshold]
        )
        return [
            Verdict.judged(
                self,
                item,
                policy,
                score,
                evidence.get((item.key, policy.id), []),
                windows=len(w.texts),
                truncated=w.truncated,
            )
            for (item, policy), w, score in zip(pairs, windows, scores, strict=True)
        ]

    def _evidence(
        self, flagged: Sequence[tuple[ClassifyItem, Policy]]
    ) -> dict[tuple[int, int], list[Evidence]]:
        """Each segment of each flagged item scored alone, in one batched pass."""
        jobs = [
            (item, policy, index, seg)
            for item, policy in flagged
            for index, seg in enumerate(item.segments)
            if seg.text.strip()
        ]
        if not jobs:
            return {}
        scores = self.score_prompts([self._fit(p.text, seg.text).text for _, p, _, seg in jobs])
        found: dict[tuple[int, int], list[Evidence]] = {}
        for (item, policy, index, seg), score in zip(jobs, scores, strict=True):
            found.setdefault((item.key, policy.id), []).append(
                Evidence(segment=index, start=seg.start, end=seg.end, score=round(score, 4))
            )
        for key, candidates in found.items():
            above = [e for e in candidates if e.score >= self.threshold]
            top = sorted(candidates, key=lambda e: e.score, reverse=True)[:EVIDENCE_TOP_K]
            found[key] = above or sorted(top, key=lambda e: e.segment)
        return found


def load_classifier(models_root: Path, settings: ClassifierSettings | None = None) -> Classifier:
    """The configured backend, its model loaded (call once per process)."""
    settings = settings or ClassifierSettings.from_env()
    if settings.backend is ClassifierBackend.COPE_A:
        return CopeAClassifier(settings, models_root)
    return LexiconClassifier(settings.threshold)
