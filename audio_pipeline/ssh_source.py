"""The collection host, reached over SSH/SFTP (paramiko): list, copy resumably, put aside.

Host keys are checked against COLLECTION_SSH_KNOWN_HOSTS and unknown hosts are
refused: the transfer worker never trusts a host it has not been told about.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko

from audio_pipeline.config import EnvReader, EnvSettings

CONNECT_TIMEOUT_S = 15.0
READ_CHUNK = 1024 * 1024  # bytes per SFTP read; prefetch keeps many in flight
REMOTE_HASH_TIMEOUT_S = 3600.0  # sha256sum of a 40 GB archive on a slow disk


@dataclass(frozen=True)
class SshSettings(EnvSettings):
    host: str
    port: int
    user: str
    key_path: Path
    known_hosts: Path
    remote_dir: str

    @classmethod
    def read(cls, env: EnvReader) -> SshSettings:
        return cls(
            host=env.str("COLLECTION_SSH_HOST", required=True),
            port=env.int("COLLECTION_SSH_PORT", 22, minimum=1, maximum=65535),
            user=env.str("COLLECTION_SSH_USER", required=True),
            key_path=env.path("COLLECTION_SSH_KEY", "", required=True),
            known_hosts=env.path(
                "COLLECTION_SSH_KNOWN_HOSTS", Path.home() / ".ssh" / "known_hosts"
            ),
            remote_dir=env.str("COLLECTION_DIR", required=True),
        )


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    mtime: int


# What a lost or refused connection raises (paramiko's own errors are not OSErrors).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, paramiko.SSHException)

ProgressFn = Callable[[int, int], None]  # (bytes copied so far, total bytes)


class CollectionHost:
    """One SSH connection to the collection host; reconnects on demand."""

    def __init__(self, settings: SshSettings) -> None:
        self.settings = settings
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def label(self) -> str:
        s = self.settings
        return f"{s.user}@{s.host}:{s.port}"

    def sftp(self) -> paramiko.SFTPClient:
        transport = self._client.get_transport() if self._client else None
        if self._sftp is None or transport is None or not transport.is_active():
            self.close()
            self._connect()
        assert self._sftp is not None
        return self._sftp

    def _connect(self) -> None:
        s = self.settings
        client = paramiko.SSHClient()
        client.load_host_keys(str(s.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(
            s.host,
            port=s.port,
            username=s.user,
            key_filename=str(s.key_path),
            timeout=CONNECT_TIMEOUT_S,
            banner_timeout=CONNECT_TIMEOUT_S,
            auth_timeout=CONNECT_TIMEOUT_S,
            allow_agent=False,
            look_for_keys=False,
        )
        self._client = client
        self._sftp = client.open_sftp()

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        if self._client is not None:
            self._client.close()
        self._sftp = None
        self._client = None

    def path(self, *names: str) -> str:
        return posixpath.join(self.settings.remote_dir, *names)

    def list_files(self, subdir: str = "") -> dict[str, RemoteFile]:
        """Regular files directly in the collection dir (links and dirs are ignored)."""
        files = {}
        for attr in self.sftp().listdir_attr(self.path(subdir) if subdir else self.path()):
            if attr.st_mode is not None and stat.S_ISREG(attr.st_mode):
                files[attr.filename] = RemoteFile(
                    attr.filename, attr.st_size or 0, attr.st_mtime or 0
                )
        return files

    def download(
        self,
        name: str,
        local_path: Path,
        progress: ProgressFn | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Copy ``name`` to ``local_path``, resuming from what is already there.

        Returns the offset it resumed from. A local file longer than the remote one
        cannot be a prefix of it and is started over.
        """
        sftp = self.sftp()
        remote = self.path(name)
        total = sftp.stat(remote).st_size or 0
        offset = local_path.stat().st_size if local_path.exists() else 0
        if offset > total:
            local_path.unlink()
            offset = 0
        local_path.parent.mkdir(parents=True, exist_ok=True)
        with sftp.open(remote, "rb") as src, local_path.open("ab") as dst:
            src.seek(offset)
            src.prefetch(total)
            done = offset
            while done < total:
                chunk = src.read(min(READ_CHUNK, total - done))
                if not chunk:
                    raise OSError(f"{self.label}:{remote} ended at {done} of {total} bytes")
                dst.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
                if should_stop is not None and should_stop() and done < total:
                    dst.flush()
                    raise InterruptedError(f"copy of {name} stopped at {done} of {total} bytes")
            dst.flush()
            os.fsync(dst.fileno())
        return offset

    def sha256(self, name: str) -> str | None:
        """The remote file's SHA-256 via ``sha256sum``; None when the host lacks it."""
        self.sftp()  # (re)connects if needed
        assert self._client is not None
        command = f"sha256sum -- {shlex.quote(self.path(name))}"
        _, stdout, _ = self._client.exec_command(command, timeout=REMOTE_HASH_TIMEOUT_S)
        output = stdout.read().decode("utf-8", "replace")
        if stdout.channel.recv_exit_status() != 0:
            return None
        digest = output.split(" ", 1)[0].strip().lower()
        return digest if len(digest) == 64 else None

    def move_into(self, name: str, subdir: str) -> None:
        """Move ``name`` into ``subdir`` of the collection dir (created if missing)."""
        sftp = self.sftp()
        target_dir = self.path(subdir)
        try:
            sftp.stat(target_dir)
        except FileNotFoundError:
            sftp.mkdir(target_dir)
        target = posixpath.join(target_dir, name)
        try:
            sftp.stat(target)
            # An earlier file of this name was already put aside: keep both.
            target = posixpath.join(target_dir, f"{name}.{int(time.time())}")
        except FileNotFoundError:
            pass
        sftp.rename(self.path(name), target)

    def touch(self, name: str) -> None:
        with self.sftp().open(self.path(name), "w") as f:
            f.write(b"")

    def exists(self, name: str) -> bool:
        try:
            self.sftp().stat(self.path(name))
            return True
        except FileNotFoundError:
            return False
