"""ASR throughput: the gpu worker's batched Transcriber against a file-by-file loop.

    .venv/bin/python -m bench.bench_asr [--corpus mixed|short] [--smoke] [--out PATH]
                                        [--models-root DIR]

On a GPU host, for the large-model figures: ``ASR_MODEL=whisper/large-v3
ASR_DEVICE=cuda .venv/bin/python -m bench.bench_asr --corpus short --models-root
/data/models`` (faster-whisper backend: the baseline is faster-whisper's own loop).

Corpus: espeak-ng speech clips (devtools.sample) of 3-30 s (``mixed``, the
default) or 2-8 s (``short``, the case the issue's 2.5x target is stated for),
converted to Opus exactly as the unpack worker does, with the spoken text as
the reference. ``short`` writes its report as ``asr-short``.

- candidate: ``load_transcriber`` with the gpu worker's settings (ASR_* from the
  environment, defaults otherwise), fed BATCH_SIZE files per ``transcribe_many``
  call, which is what the worker does with one claim.
- baseline: a plain loop of ``WhisperModel.transcribe(path)`` per file on the same
  loaded model (so model, device, compute type and threads are identical), with
  faster-whisper's defaults (beam 5, no VAD) and the same language.

Both are timed on the same files in the same run after one warm-up call each,
interleaved group by group (BATCH_SIZE files) in alternating order;
the figure is the ratio of their audio seconds per wall second. WER (jiwer,
lower-cased, punctuation removed) is reported for both. A third pass hands the
same Transcriber one file per call, to show what packing several files into
shared 30 s windows adds on top of VAD + the batched pipeline.

Look-ahead (short corpus and smoke only, where decoding is the largest share of
a claim): the worker prepares (decodes, VAD-cuts, packs) its next claim in a side
thread while the model runs on this one. Measured as two continuous passes over
all groups, ``transcribe_many`` group after group against ``prepare(next)`` in a
thread while ``transcribe_prepared(this)`` runs, in A B B A order; the figure is
their ratio. They cannot be interleaved with the passes above: the overlap only
exists between consecutive claims.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jiwer

from audio_pipeline.asr import SAMPLE_RATE, AsrSettings, Transcriber, load_transcriber
from audio_pipeline.audio import AudioSettings, Conversion, convert_many
from audio_pipeline.workers.gpu_worker import GpuSettings
from bench import benchlib
from devtools.dev_models import install_whisper

FULL_CLIPS = 60  # the issue asks for at least 60
SMOKE_CLIPS = 6
# Two corpora: "mixed" (3-30 s, what issue 6 item 1 prescribes) and "short" (2-8 s,
# the short-clip case its target is stated for, where file-by-file calls waste most
# of each 30 s window). The smoke size is a few short clips.
CORPORA = {"mixed": (3.0, 30.0), "short": (2.0, 8.0)}
SMOKE_CLIP_S = (3.0, 8.0)
CORPUS_SEED = 6
TARGET_SPEEDUP = 2.5
TARGET_WER_LOSS = 0.01  # at most one point of WER worse than the baseline
NORMALISE = jiwer.Compose(
    [jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip()]
)


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    refs = [NORMALISE(r) for r in references]
    hyps = [NORMALISE(h) or "<empty>" for h in hypotheses]
    return round(float(jiwer.wer(refs, hyps)), 4)


def make_corpus(
    work: Path, n_clips: int, min_s: float, max_s: float
) -> tuple[list[Path], list[str]]:
    batch, mp3s = benchlib.speech_corpus(work, n_clips, CORPUS_SEED, min_s, max_s)
    jobs = [
        Conversion(rel, mp3, work / "opus" / f"{i:04d}.opus")
        for i, (rel, mp3) in enumerate(sorted(mp3s.items()))
    ]
    results = {r.key: r for r in convert_many(jobs, AudioSettings())}
    bad = [r for r in results.values() if not r.ok]
    if bad:
        raise SystemExit(f"corpus conversion failed: {bad[0].key}: {bad[0].error}")
    ordered = sorted(results)
    return [results[k].output for k in ordered], [batch.manifest[k] for k in ordered]


def sequential_pass(transcriber: Transcriber, groups: list[list[Path]]) -> tuple[float, list[str]]:
    """Claim after claim, each decoded then transcribed (PREFETCH=0)."""
    started = time.perf_counter()
    texts = [t.text for g in groups for t in transcriber.transcribe_many(g)]
    return time.perf_counter() - started, texts


def look_ahead_pass(transcriber: Transcriber, groups: list[list[Path]]) -> tuple[float, list[str]]:
    """The next claim prepared in a side thread while the model runs (PREFETCH=1)."""
    started = time.perf_counter()
    texts: list[str] = []
    with ThreadPoolExecutor(max_workers=1) as side:
        prepared = transcriber.prepare(groups[0])
        for n in range(len(groups)):
            ahead = side.submit(transcriber.prepare, groups[n + 1]) if n + 1 < len(groups) else None
            texts.extend(t.text for t in transcriber.transcribe_prepared(prepared))
            if ahead is not None:
                prepared = ahead.result()
    return time.perf_counter() - started, texts


def main(argv: Sequence[str] | None = None) -> int:
    def corpus_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--corpus",
            choices=sorted(CORPORA),
            default="mixed",
            help="clip lengths: mixed 3-30 s (default) or short 2-8 s",
        )
        parser.add_argument(
            "--models-root",
            type=Path,
            metavar="DIR",
            help="load ASR_MODEL from DIR as the worker would (e.g. /data/models on a GPU "
            "host); default: a scratch directory with the bundled tiny.en",
        )

    args = benchlib.parse_args(__doc__.split("\n\n")[0], argv, corpus_option)
    report_name = "asr" if args.corpus == "mixed" else f"asr-{args.corpus}"
    report = benchlib.Report(report_name, args.smoke)
    n_clips = SMOKE_CLIPS if args.smoke else FULL_CLIPS
    min_s, max_s = SMOKE_CLIP_S if args.smoke else CORPORA[args.corpus]
    settings = AsrSettings.from_env()
    batch_size = GpuSettings.from_env().batch_size
    with tempfile.TemporaryDirectory(prefix="bench-asr-") as tmp:
        work = Path(tmp)
        paths, texts = make_corpus(work, n_clips, min_s, max_s)
        if args.models_root is not None:
            models = args.models_root  # read only: a host's synced models are not touched
        else:
            models = work / "models"
            install_whisper(models)
        transcriber = load_transcriber(models, settings)
        model = transcriber.model  # type: ignore[attr-defined]
        language = None if settings.language == "auto" else settings.language

        def baseline_one(path: Path) -> str:
            segments, _ = model.transcribe(
                str(path), language=language, beam_size=settings.beam_size
            )
            return " ".join(s.text.strip() for s in segments).strip()

        # Warm-up: first calls pay for allocations and the VAD model's load.
        baseline_one(paths[0])
        transcriber.transcribe_many(paths[:2])

        # The three passes are interleaved group by group (one claim's worth of files
        # each), in alternating order, so a neighbour's burst on this shared machine
        # lands on all of them alike instead of on whichever ran at the time.
        walls = {"baseline": 0.0, "candidate": 0.0, "single": 0.0}
        base_texts: list[str] = []
        cand_texts: list[str] = []
        single_texts: list[str] = []
        audio_s = 0.0

        def run_baseline(group: list[Path]) -> None:
            base_texts.extend(baseline_one(p) for p in group)

        def run_candidate(group: list[Path]) -> None:
            nonlocal audio_s
            for t in transcriber.transcribe_many(group):
                cand_texts.append(t.text)
                audio_s += t.audio_seconds

        def run_single(group: list[Path]) -> None:
            # What packing several files per call buys on its own: the same
            # Transcriber (VAD + batched pipeline) handed one file per call.
            single_texts.extend(transcriber.transcribe_many([p])[0].text for p in group)

        passes = [("baseline", run_baseline), ("candidate", run_candidate), ("single", run_single)]
        for n, i in enumerate(range(0, len(paths), batch_size)):
            group = paths[i : i + batch_size]
            for name, run in passes if n % 2 == 0 else passes[::-1]:
                started = time.perf_counter()
                run(group)
                walls[name] += time.perf_counter() - started
        base_wall, cand_wall, single_wall = walls["baseline"], walls["candidate"], walls["single"]

        look_ahead: dict[str, Any] | None = None
        if args.smoke or args.corpus == "short":
            groups = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
            pass_walls = {sequential_pass: 0.0, look_ahead_pass: 0.0}
            pass_texts: dict[Any, list[str]] = {}
            for runner in (sequential_pass, look_ahead_pass, look_ahead_pass, sequential_pass):
                wall, pass_texts[runner] = runner(transcriber, groups)
                pass_walls[runner] += wall
            seq_wall, ahead_wall = pass_walls[sequential_pass], pass_walls[look_ahead_pass]
            ahead_texts = pass_texts[look_ahead_pass]
            look_ahead = {
                "sequential_wall_s": round(seq_wall, 2),
                "look_ahead_wall_s": round(ahead_wall, 2),
                "gain": benchlib.ratio(seq_wall, ahead_wall),
                "wer": wer(texts, ahead_texts),
                "passes": "A B B A, two of each, continuous over all groups",
            }

    base_rtf = audio_s / base_wall
    cand_rtf = audio_s / cand_wall
    speedup = benchlib.ratio(cand_rtf, base_rtf)
    base_wer, cand_wer = wer(texts, base_texts), wer(texts, cand_texts)
    single_rtf, single_wer = audio_s / single_wall, wer(texts, single_texts)
    report.data.update(
        {
            "corpus": {
                "name": args.corpus,
                "clips": len(paths),
                "audio_s": round(audio_s, 1),
                "clip_s_range": [min_s, max_s],
                "mean_clip_s": round(audio_s / len(paths), 2),
                "source": "espeak-ng via devtools.sample, Opus 16 kHz mono",
            },
            "settings": {
                "model": settings.model,
                "backend": transcriber.backend,
                "device": transcriber.device,  # type: ignore[attr-defined]
                "compute_type": transcriber.compute_type,  # type: ignore[attr-defined]
                "beam_size": settings.beam_size,
                "asr_batch_size": settings.batch_size,
                "files_per_call": batch_size,
                "sample_rate": SAMPLE_RATE,
            },
            "baseline": {
                "wall_s": round(base_wall, 2),
                "audio_s_per_s": round(base_rtf, 2),
                "wer": base_wer,
            },
            "candidate": {
                "wall_s": round(cand_wall, 2),
                "audio_s_per_s": round(cand_rtf, 2),
                "wer": cand_wer,
            },
            "candidate_one_file_per_call": {
                "wall_s": round(single_wall, 2),
                "audio_s_per_s": round(single_rtf, 2),
                "wer": single_wer,
            },
            "speedup": speedup,
            "speedup_one_file_per_call": benchlib.ratio(single_rtf, base_rtf),
            "wer_delta": round(cand_wer - base_wer, 4),
            "look_ahead": look_ahead,
            "targets": {"speedup_min": TARGET_SPEEDUP, "wer_delta_max": TARGET_WER_LOSS},
            "meets_targets": speedup >= TARGET_SPEEDUP and cand_wer - base_wer <= TARGET_WER_LOSS,
        }
    )
    report.row("clips / audio", f"{len(paths)} / {audio_s:.0f} s")
    report.row("baseline (file by file)", f"{base_rtf:.1f} x rt", f"WER {base_wer:.3f}")
    report.row("gpu worker (batched)", f"{cand_rtf:.1f} x rt", f"WER {cand_wer:.3f}")
    report.row("same, one file per call", f"{single_rtf:.1f} x rt", f"WER {single_wer:.3f}")
    report.row("speedup", f"{speedup:.2f}x", f"target >= {TARGET_SPEEDUP}x")
    report.row("WER delta", f"{(cand_wer - base_wer) * 100:+.1f} pt", "target <= +1.0 pt")
    if look_ahead is not None:
        report.row("look-ahead prepare", f"{look_ahead['gain']:.2f}x", "vs the same claims in turn")
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
