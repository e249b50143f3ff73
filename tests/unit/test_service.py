"""The process service without a loop: where its settings come from, how a second
stop signal (or the stop grace running out) reaches the work in hand
(``interruptible()``, ``shielded()``), and what it tells systemd (sd_notify)."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator, Mapping

import pytest

from audio_pipeline.config import ConfigError, load_settings
from audio_pipeline.queue import RetryPolicy
from audio_pipeline.runtime.heartbeat import HeartbeatTimings
from audio_pipeline.runtime.service import Service, ServiceTimings, ShutdownForced
from audio_pipeline.runtime.systemd_notify import SystemdNotifier

BAD_ENV = {
    "WORKER_HEARTBEAT_INTERVAL_S": "soon",
    "QUEUE_MAX_ATTEMPTS": "many",
    "REDIS_PORT": "none",
}


class Idle(Service):
    stage = "idle"


class NoEnvironment(Mapping[str, str]):
    """os.environ for code that must not read it."""

    def __getitem__(self, key: str) -> str:
        raise AssertionError(f"read os.environ[{key!r}]")

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("iterated os.environ")

    def __len__(self) -> int:
        raise AssertionError("measured os.environ")


@pytest.fixture
def service() -> Idle:
    return Idle(load_settings({}), worker_id="idle:test")


def signal_stop(service: Service) -> None:
    service._on_stop_signal(signal.SIGTERM, None)


def test_passed_in_settings_are_used_and_the_environment_is_not_read(monkeypatch):
    settings = load_settings({"WORKER_HOST": "here"})
    with monkeypatch.context() as patch:
        patch.setattr(os, "environ", NoEnvironment())
        service = Idle(settings)
    assert service.settings is settings
    assert service.worker_id == f"idle:here:{os.getpid()}"
    assert service.heartbeat.timings == HeartbeatTimings()
    assert service.queue.retry_policy == RetryPolicy()


def test_without_settings_everything_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORKER_HEARTBEAT_TTL_S", "2.5")
    monkeypatch.setenv("QUEUE_MAX_ATTEMPTS", "7")
    service = Idle()
    assert service.heartbeat.timings.ttl_s == 2.5
    assert service.queue.retry_policy.max_attempts == 7
    for name, value in BAD_ENV.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="REDIS_PORT"):
        Idle()


def test_a_stage_is_required():
    with pytest.raises(TypeError, match="stage"):
        Service(load_settings({}))


def test_the_first_signal_only_asks_to_stop(service):
    with service.interruptible():
        signal_stop(service)
    assert service.stopping
    assert not service.stop_forced


def test_a_second_signal_abandons_interruptible_work(service):
    steps: list[str] = []

    def work() -> None:
        with service.interruptible():
            steps.append("started")
            signal_stop(service)
            steps.append("went on after the second signal")

    signal_stop(service)
    with pytest.raises(ShutdownForced):
        work()
    assert steps == ["started"]
    assert service.stop_forced
    with pytest.raises(ShutdownForced):
        work()  # nothing new starts once the stop is forced
    assert steps == ["started"]


def test_a_second_signal_outside_interruptible_work_is_only_noted(service):
    signal_stop(service)
    signal_stop(service)  # no ShutdownForced: nothing in hand to abandon
    assert service.stop_forced


def test_a_shielded_step_finishes_before_the_forced_stop(service):
    steps: list[str] = []

    def work() -> None:
        with service.interruptible():
            with service.shielded():
                signal_stop(service)
                steps.append("claimed and recorded")
            steps.append("went on after the shielded step")

    signal_stop(service)
    with pytest.raises(ShutdownForced):
        work()
    assert steps == ["claimed and recorded"]


def test_the_stop_grace_is_read_with_every_other_setting(monkeypatch):
    monkeypatch.setenv("WORKER_STOP_GRACE_S", "45")
    assert Idle().timings.stop_grace_s == 45
    monkeypatch.setenv("WORKER_STOP_GRACE_S", "soon")
    monkeypatch.setenv("QUEUE_MAX_ATTEMPTS", "many")
    with pytest.raises(ConfigError, match="WORKER_STOP_GRACE_S") as raised:
        Idle()
    assert "QUEUE_MAX_ATTEMPTS" in str(raised.value)  # listed together


def test_the_grace_running_out_abandons_interruptible_work(service):
    signal_stop(service)
    assert not service.stop_forced  # the grace runs
    with pytest.raises(ShutdownForced), service.interruptible():
        service._on_stop_signal(signal.SIGALRM, None)
    assert service.stop_forced


def test_an_alarm_before_any_stop_is_ignored(service):
    with service.interruptible():
        service._on_stop_signal(signal.SIGALRM, None)
    assert not service.stopping
    assert not service.stop_forced


def test_a_zero_grace_hands_the_work_back_at_the_first_signal():
    service = Idle(load_settings({}), worker_id="idle:test", timings=ServiceTimings(stop_grace_s=0))
    with pytest.raises(ShutdownForced), service.interruptible():
        signal_stop(service)
    assert service.stop_forced


# -- the link to systemd (sd_notify) ----------------------------------------------------


def test_without_notify_socket_nothing_is_sent():
    notifier = SystemdNotifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False


def test_the_abstract_namespace_and_a_path_are_both_understood():
    assert SystemdNotifier({"NOTIFY_SOCKET": "@sd/notify"}).address == "\0sd/notify"
    assert SystemdNotifier({"NOTIFY_SOCKET": "/run/sd.sock"}).address == "/run/sd.sock"
    assert SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"}).address is None


def test_the_watchdog_is_ours_only_when_its_pid_is_ours_or_unset():
    usec = {"WATCHDOG_USEC": "30000000"}
    assert SystemdNotifier(usec).watchdog_s == 30
    assert SystemdNotifier({**usec, "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 30
    assert SystemdNotifier({**usec, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_s is None
    assert SystemdNotifier({"WATCHDOG_USEC": "soon"}).watchdog_s is None


def test_a_socket_nobody_listens_on_is_logged_once_and_never_raised(caplog):
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "@audio-pipeline-test-nobody-listens"})
    assert notifier.send("READY=1") is False
    assert notifier.send("WATCHDOG=1") is False
    assert caplog.text.count("systemd.notify_failed") == 1


def test_watchdog_pings_are_rate_limited_to_a_fraction_of_the_interval(tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "n.sock"))
    server.settimeout(0.5)
    env = {"NOTIFY_SOCKET": str(tmp_path / "n.sock"), "WATCHDOG_USEC": "60000000"}
    notifier = SystemdNotifier(env)
    for _ in range(5):
        notifier.watchdog()
    assert server.recv(100) == b"WATCHDOG=1"
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.recv(100)  # one ping, not five, within 60 s / PINGS_PER_INTERVAL
    server.close()
    notifier.close()


def test_alive_pings_only_once_started_and_only_from_the_main_thread(service, tmp_path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "n.sock"))
    server.setblocking(False)
    env = {"NOTIFY_SOCKET": str(tmp_path / "n.sock"), "WATCHDOG_USEC": "1"}
    service._systemd = SystemdNotifier(env)
    service.alive()
    with pytest.raises(BlockingIOError):
        server.recv(100)  # not started yet: the watchdog is not armed
    service._ready = True
    side = threading.Thread(target=service.alive)
    side.start()
    side.join()
    with pytest.raises(BlockingIOError):
        server.recv(100)  # a side thread proves nothing
    service.alive()
    assert server.recv(100) == b"WATCHDOG=1"
    server.close()
