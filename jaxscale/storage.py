"""Where a run's files live: a local directory or a bucket, through etils.epath as Orbax does.

`run.dir` is a local path (a relative one is taken from the working directory), `file:///abs/path`
(the same local path) or `gs://bucket/path` (Google Cloud Storage: Orbax, tensorstore, epath and
TensorBoard's writer all reach it natively). On many hosts `run.dir` must be storage every host
sees, which a bucket is. Other schemes are refused: Orbax 0.12 writes checkpoint arrays through
tensorstore only to local paths and gs://.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from etils import epath

from jaxscale.errors import UserError

REMOTE_SCHEMES = ("gs",)


def run_path(location: str | os.PathLike) -> epath.Path:
    """`location` (a run.dir, or a file or folder in one) as the path every reader and writer of the run uses.

    A URL stays a URL; a local path is made absolute against the working directory now, so a later
    change of directory cannot move the run.
    """
    text = os.fspath(location)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return epath.Path(Path(text).absolute())
    if scheme == "file":
        if not rest.startswith("/"):
            raise UserError(f"run.dir={text}: a file:// URL names an absolute path, e.g. file:///data/runs/my-run.")
        return epath.Path(rest)
    if scheme in REMOTE_SCHEMES:
        return epath.Path(text)
    raise UserError(
        f"run.dir={text}: the {scheme}:// scheme is not supported; checkpoint arrays are written by Orbax, which "
        f"reaches local paths and gs:// only. Use gs://BUCKET/PATH or a local path (a bucket mounted on every "
        f"host, e.g. with a FUSE driver, is a local path)."
    )


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` (as `run_path` returns it) is in an object store rather than on a local disk."""
    return "://" in os.fspath(path)


@contextlib.contextmanager
def written_locally(directory: epath.Path) -> Iterator[Path]:
    """A local directory to write files into that end up in `directory`.

    For the profiler's trace writer, which reaches buckets through storage code of its own (its own
    credentials lookup and endpoint): files meant for a bucket go to a temporary directory first and
    are copied up through epath, like every other file of the run, when the block ends.
    """
    if not is_remote(directory):
        yield Path(directory)
        return
    staging = Path(tempfile.mkdtemp(prefix="jaxscale-upload-"))
    try:
        yield staging
        for root, _, files in os.walk(staging):
            for name in files:
                local = Path(root) / name
                (directory / local.relative_to(staging).as_posix()).write_bytes(local.read_bytes())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# Tensorstore reports errors as ValueError("CODE: ..."), CODE an absl status; these pass with time.
_TRANSIENT_STATUSES = ("UNAVAILABLE:", "DEADLINE_EXCEEDED:", "RESOURCE_EXHAUSTED: Rate limit")
_TRANSIENT_ERRNOS = {
    errno.ETIMEDOUT,
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.ESTALE,  # a network filesystem's handle gone stale after a server restart
}


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and every error it was raised from, including the members of exception groups."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        e = pending.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        pending += [c for c in (e.__cause__, e.__context__) if c is not None]
        pending += list(getattr(e, "exceptions", ()))  # an ExceptionGroup of a task group's failures


def _http_status(error: BaseException) -> int | None:
    """The HTTP status a storage client's error carries (gcsfs: .code, aiohttp: .status, google-api-core: .code)."""
    for name in ("code", "status", "status_code"):
        value = getattr(error, name, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    return None


def is_transient(error: BaseException) -> bool:
    """Whether `error`, or one it was raised from, is storage failing for now (a timeout, a refused or reset
    connection, a 5xx or 429 answer, a tensorstore UNAVAILABLE), which the same command may get past later."""
    for e in error_chain(error):
        if isinstance(e, TimeoutError | ConnectionError):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        status = _http_status(e)
        if status is not None and (status >= 500 or status == 429):
            return True
        if isinstance(e, ValueError | RuntimeError) and str(e).startswith(_TRANSIENT_STATUSES):
            return True
    return False
