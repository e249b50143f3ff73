"""Media files that are really playlists, and witnesses that see what a decoder opens.

A playlist (HLS ``.m3u8``, ``ffconcat``) named like an audio file makes a decoder
that guesses formats open what it lists. ``FifoWatch`` is a named pipe that
records whether anything opened it to read; ``RecordingServer`` is an HTTP server
on 127.0.0.1 that records every request. Together they show that a file or URL
was never touched, not merely that its bytes did not reach the output.
"""

from __future__ import annotations

import http.server
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Self


def hls_playlist(path: Path, target: str) -> Path:
    path.write_text(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n"
        f"#EXTINF:10.0,\n{target}\n#EXT-X-ENDLIST\n"
    )
    return path


def ffconcat_playlist(path: Path, target: str) -> Path:
    path.write_text(f"ffconcat version 1.0\nfile '{target}'\n")
    return path


PLAYLISTS = {"hls": hls_playlist, "ffconcat": ffconcat_playlist}


class _Witness(ABC):
    """Used in a ``with`` block: it stops watching when the block ends."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class FifoWatch(_Witness):
    """A named pipe at ``path``; ``opened`` is set if a reader opens it.

    A thread blocks opening the write end, which returns only once a reader has
    opened the pipe (it then sees end of file at once). ``close`` opens the read
    end itself to release that thread, after marking that the reader was us.
    """

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.opened = threading.Event()
        self._releasing = False
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        if not self._releasing:
            self.opened.set()
        os.close(fd)

    def close(self) -> None:
        self._releasing = True
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            self._thread.join(timeout=10)
        finally:
            os.close(fd)


class RecordingServer(_Witness):
    """HTTP on 127.0.0.1 (a free port) answering every GET with ``body``;
    ``requests`` lists the paths asked for."""

    def __init__(self, body: bytes = b"") -> None:
        requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.requests = requests
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
