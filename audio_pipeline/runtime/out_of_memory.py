"""Telling a GPU out-of-memory error from any other failure, without importing torch.

A claim that runs out of GPU memory is no fault of its files: the queue worker runs
it again in halves (queue_worker.py). The errors come from several libraries, so
they are recognised by name and message here, in one place:

- torch: ``torch.OutOfMemoryError`` / ``torch.cuda.OutOfMemoryError`` (older releases
  raised a RuntimeError saying "CUDA out of memory. Tried to allocate ...");
- ctranslate2 (faster-whisper): RuntimeError "CUDA failed with error out of memory";
- cuBLAS / cuDNN allocation failures, as torch and ctranslate2 report them.

Host memory (Python's MemoryError) is not included: a worker short of RAM is stopped
by its unit's MemoryMax, and the reaper counts that against the job.
"""

from __future__ import annotations

import re

OOM_CLASS_NAME = "OutOfMemoryError"  # torch.OutOfMemoryError and torch.cuda's alias
_OOM_MESSAGE = re.compile(
    r"CUDA out of memory"
    r"|CUDA failed with error out of memory"
    r"|CUBLAS_STATUS_ALLOC_FAILED"
    r"|CUDNN_STATUS_ALLOC_FAILED"
    r"|cudaErrorMemoryAllocation",
    re.IGNORECASE,
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc``, or an error it was raised from, says the GPU ran out of memory."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(cls.__name__ == OOM_CLASS_NAME for cls in type(current).__mro__):
            return True
        if _OOM_MESSAGE.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False
