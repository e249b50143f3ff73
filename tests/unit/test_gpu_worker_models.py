"""The gpu_worker role syncs exactly the models its workers open (no drift).

Renders the role's defaults with group_vars/gpu_workers.yml through Ansible's own
templating, then reads the rendered worker environment with the ASR and
classifier settings code the gpu worker uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

from audio_pipeline.asr import AsrBackend, AsrSettings
from audio_pipeline.classify import ClassifierBackend, ClassifierSettings

REPO = Path(__file__).parents[2]
MODELS_ROOT = "/data/models"


def trusted(value: Any) -> Any:
    """Ansible 2.19 templates only strings marked trusted, as its own loader marks them."""
    if isinstance(value, str):
        return trust_as_template(value)
    if isinstance(value, dict):
        return {k: trusted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [trusted(v) for v in value]
    return value


def load_vars(path: Path) -> dict[str, Any]:
    return trusted(yaml.safe_load(path.read_text()))


def render(**overrides: Any) -> tuple[list[str], dict[str, str]]:
    """gpu_worker_models and the worker environment (backend part included)."""
    variables = {
        **load_vars(REPO / "roles/common/defaults/main.yml"),  # common_env_pipeline
        **load_vars(REPO / "roles/gpu_worker/defaults/main.yml"),
        **load_vars(REPO / "group_vars/gpu_workers.yml"),
        "models_root": MODELS_ROOT,
        **overrides,
    }
    templar = Templar(loader=DataLoader(), variables=variables)
    models = templar.template(variables["gpu_worker_models"])
    backend_env = templar.template(variables["gpu_worker_backend_env"])
    # What roles/gpu_worker/tasks/env.yml writes: the connection settings, then its own.
    written = {**variables["common_env_pipeline"], **variables["gpu_worker_env"]}
    env = {
        k: str(templar.template(written[k]))
        for k in (
            "MODELS_ROOT",
            "ASR_BACKEND",
            "ASR_MODEL",
            "ASR_BATCH_SIZE",
            "CLASSIFIER_BACKEND",
            "CLASSIFIER_MODEL",
            "CLASSIFIER_BATCH_SIZE",
        )
    }
    return list(models), {**env, **{k: str(v) for k, v in backend_env.items()}}


def opened_models(env: dict[str, str]) -> set[str]:
    """Every directory under MODELS_ROOT the gpu worker will open with this environment."""
    asr = AsrSettings.from_env(env)
    clf = ClassifierSettings.from_env(env)
    opened = {asr.model}
    if asr.backend is AsrBackend.WHISPERX:
        opened.add(asr.align_model)
        nltk_data = Path(env["NLTK_DATA"])
        assert nltk_data.parent == Path(env["MODELS_ROOT"])
        opened.add(nltk_data.name)
    if clf.backend is ClassifierBackend.COPE_A:
        opened.add(clf.model)
    return opened


def test_production_group_vars_sync_what_the_workers_open() -> None:
    models, env = render()
    assert set(models) == opened_models(env)
    assert "alignment/wav2vec2-en" in models
    assert "nltk" in models
    assert env["NLTK_DATA"] == f"{MODELS_ROOT}/nltk"


@pytest.mark.parametrize("asr", ["faster-whisper", "whisperx"])
@pytest.mark.parametrize("clf", ["lexicon", "cope-a"])
def test_every_backend_combination(asr: str, clf: str) -> None:
    models, env = render(gpu_worker_asr_backend=asr, gpu_worker_classifier_backend=clf)
    assert set(models) == opened_models(env)
    if asr == "faster-whisper":
        # nothing rendered that names a model this host does not sync
        assert "ASR_ALIGN_MODEL" not in env
        assert "NLTK_DATA" not in env


def test_extra_models_are_added() -> None:
    models, _ = render(gpu_worker_models_extra=["whisper/tiny.en"])
    assert models[-1] == "whisper/tiny.en"


def test_the_batch_sizes_that_bound_gpu_memory_reach_the_workers() -> None:
    _, env = render(gpu_worker_asr_batch_size=4, gpu_worker_classifier_batch_size=2)
    assert AsrSettings.from_env(env).batch_size == 4
    assert ClassifierSettings.from_env(env).batch_size == 2
