"""Stream an Opus file from S3 to an authorised browser, with HTTP Range support.

The browser never gets S3 credentials or a URL to the store (which usually sits
on a private network): the app checks access, then relays the bytes. Range
requests are passed through to S3, so seeking in a long file fetches only the
part that plays.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from botocore.exceptions import ClientError
from flask import Response, abort, current_app, request

from audio_pipeline.s3_utils import is_not_found, make_client

CHUNK = 64 * 1024  # bytes relayed per write
OPUS_MIME = "audio/ogg; codecs=opus"


def _s3() -> Any:
    client = current_app.extensions.get("ra_s3")
    if client is None:
        cfg = current_app.config
        client = make_client(
            cfg["S3_ENDPOINT"], cfg["S3_ACCESS_KEY"], cfg["S3_SECRET_KEY"], cfg["S3_REGION"]
        )
        current_app.extensions["ra_s3"] = client
    return client


def _relay(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()


def stream_opus(key: str) -> Response:
    """The object at ``key`` as a (partial) response; 404 if missing, 416 if out of range."""
    client = _s3()
    bucket = current_app.config["S3_BUCKET"]
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc):
            abort(404, description="The audio file is not in the store.")
        raise
    size = int(head["ContentLength"])
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=300"}
    status, part = 200, {}
    byte_range = request.range
    if byte_range is not None and byte_range.units == "bytes" and len(byte_range.ranges) == 1:
        bounds = byte_range.range_for_length(size)
        if bounds is None:
            return Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        start, stop = bounds
        status, part = 206, {"Range": f"bytes={start}-{stop - 1}"}
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        headers["Content-Length"] = str(stop - start)
    else:
        headers["Content-Length"] = str(size)
    obj = client.get_object(Bucket=bucket, Key=key, **part)
    return Response(
        _relay(obj["Body"]),
        status=status,
        mimetype=OPUS_MIME,
        headers=headers,
        direct_passthrough=True,
    )
