"""Remote data dirs: list and stream GQN TFRecords from ``gs://``, ``https://`` or any fsspec URL.

``data_dir`` may be a URL: ``gs://gqn-dataset`` (the public DeepMind bucket, read anonymously unless
credentials are given), ``https://storage.googleapis.com/gqn-dataset`` (the same bucket: mapped to
``gs://`` because plain HTTPS cannot list a bucket), any other fsspec URL (``s3://``, an ``https://``
mirror with directory listings, ``memory://``), or ``file://`` (a local path). Transport is fsspec's
(gcsfs for Cloud Storage); this module adds what training needs on top of it:

* **one retry policy** for every protocol: a request that fails for a transient reason (no
  connection, time-out, HTTP 408/429/5xx) is retried with exponential back-off, then the caller gets
  one :class:`RemoteDataError` line saying what failed, which URL, and what to do. Missing objects and
  403s are not retried. Settings come from the environment, so DataLoader workers and
  ``gqn-data download`` share them: ``GQN_REMOTE_RETRIES`` (tries per request, default 6),
  ``GQN_REMOTE_BACKOFF`` (first wait in seconds, doubled per retry, capped at 30; default 1),
  ``GQN_REMOTE_TIMEOUT`` (connect/read time-out in seconds, default 60), ``GQN_REMOTE_BLOCK_MB``
  (bytes per range request, default 8), ``GQN_REMOTE_READAHEAD`` (range requests in flight, default 2).
* **streaming with read-ahead**: :class:`RemoteReader` is a sequential file object that fetches the next
  blocks in background threads while the current one is parsed; a block that fails is fetched again
  from its own offset, so a transient failure does not lose the reader's place.
* **a local cache** (:class:`RemoteCache`, opt-in): a file read to its end is written beside the
  stream, verified record by record (CRC32C) and only then renamed into the cache; a cached copy that
  fails a CRC is dropped and the file fetched again. Least recently used files go past a size cap.

Cloud Storage: the standard JSON-API client ``gcsfs.core.GCSFileSystem`` is used, not the class that
gcsfs exports by default (``ExtendedGcsFileSystem``), which first probes every bucket's type over gRPC
(zonal/hierarchical buckets). That probe buys nothing for the DeepMind bucket (a standard bucket) and
against an emulator (``STORAGE_EMULATOR_HOST``) costs a 60 s time-out per call. Set
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=true`` explicitly to use gcsfs' extended class anyway. Credentials:
anonymous by default; ``GOOGLE_APPLICATION_CREDENTIALS`` (a service-account key) is used when set, and
``GQN_GCS_TOKEN`` passes any gcsfs ``token`` (``google_default``, ``cloud``, a key file). gcsfs' own
request retries are bypassed so that the policy above is the only one (gcsfs would retry a refused
connection for about 35 s, with a traceback in the log).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data_modules.errors import CorruptRecordError, GQNDataError
from data_modules.records import RECORD_NAMES, RECORD_SUFFIXES

log = logging.getLogger(__name__)

GCS_HTTPS = "https://storage.googleapis.com/"
MAX_BACKOFF = 30.0
RETRIABLE_STATUS = {408, 429, 500, 502, 503, 504}
#: sizes of remote files seen in listings (url -> bytes); inherited by forked DataLoader workers
_SIZES: dict[str, int] = {}


class RemoteDataError(GQNDataError):
    """A remote data dir could not be read (after retries where that makes sense)."""


# ---------------------------------------------------------------------------------------- URLs
def is_url(path) -> bool:
    """True for a remote URL (``gs://``, ``https://``, ``s3://`` ...); ``file://`` and paths are local."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local_path(path) -> str:
    """``file:///x`` -> ``/x``; anything else unchanged."""
    text = str(path)
    return text[len("file://"):] if text.startswith("file://") else text


def join(base: str, *parts: str) -> str:
    """Join URL (or path) parts with ``/``."""
    out = str(base).rstrip("/")
    for part in parts:
        out += "/" + str(part).strip("/")
    return out


@dataclass(frozen=True)
class Settings:
    retries: int = 6
    backoff: float = 1.0
    timeout: float = 60.0
    block_bytes: int = 8 << 20
    readahead: int = 2

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        try:
            return cls(
                retries=max(1, int(env.get("GQN_REMOTE_RETRIES", cls.retries))),
                backoff=max(0.0, float(env.get("GQN_REMOTE_BACKOFF", cls.backoff))),
                timeout=float(env.get("GQN_REMOTE_TIMEOUT", cls.timeout)),
                block_bytes=max(1024, int(float(env.get("GQN_REMOTE_BLOCK_MB", cls.block_bytes / 2**20)) * 2**20)),
                readahead=max(1, int(env.get("GQN_REMOTE_READAHEAD", cls.readahead))),
            )
        except ValueError as err:
            raise GQNDataError(f"bad GQN_REMOTE_* setting in the environment: {err} (use numbers)") from None


def _gcs_token():
    token = os.environ.get("GQN_GCS_TOKEN")
    if token:
        return token
    return "google_default" if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") else "anon"


_GCS_CLASSES: dict = {}


def _gcs_class():
    """gcsfs' standard client (or its extended one, when explicitly asked for), minus its own retries."""
    import gcsfs
    import gcsfs.core

    extended = os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "").lower() in ("true", "1")
    base = gcsfs.GCSFileSystem if extended else gcsfs.core.GCSFileSystem
    if base not in _GCS_CLASSES:
        single_try = getattr(base._request, "__wrapped__", None)  # the request without gcsfs' retry loop
        attrs = {"_request": single_try} if single_try is not None else {}
        _GCS_CLASSES[base] = type("GQNGCSFileSystem", (base,), attrs)
        logger = logging.getLogger("gcsfs")
        if logger.level == logging.NOTSET:  # failures are reported here, once, in one line
            logger.setLevel(logging.CRITICAL)
    return _GCS_CLASSES[base]


def filesystem(url: str):
    """``(fsspec filesystem, path inside it)`` for a URL."""
    import fsspec

    settings = Settings.from_env()
    protocol, _, rest = str(url).partition("://")
    if str(url).startswith(GCS_HTTPS):  # the public bucket over HTTPS: the same objects, listable via gs
        protocol, rest = "gs", str(url)[len(GCS_HTTPS):]
    if protocol in ("gs", "gcs"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.timeout, sock_read=settings.timeout)
        return _gcs_class()(token=_gcs_token(), requests_timeout=timeout), rest.rstrip("/")
    try:
        fs, path = fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as err:
        raise RemoteDataError(f"cannot open {url}: {err} (install the fsspec backend for this protocol)") from None
    return fs, path


# ---------------------------------------------------------------------------------------- retries
def _status(err: BaseException) -> int | None:
    for attr in ("code", "status"):
        value = getattr(err, attr, None)
        if isinstance(value, int):
            return value
    return None


def _classify(err: BaseException) -> str:
    """``missing``, ``denied``, ``transient`` or ``fatal``."""
    if isinstance(err, FileNotFoundError):
        return "missing"
    status = _status(err)
    text = str(err)
    if isinstance(err, PermissionError) or status in (401, 403) or text.startswith("Forbidden"):
        return "denied"
    if status == 404:
        return "missing"
    if status is not None:
        return "transient" if status in RETRIABLE_STATUS else "fatal"
    if isinstance(err, ValueError):
        return "fatal"
    try:
        import aiohttp

        if isinstance(err, aiohttp.ClientError):
            return "transient"
    except ImportError:  # pragma: no cover - aiohttp comes with gcsfs
        pass
    return "transient" if isinstance(err, (OSError, TimeoutError)) else "fatal"


def _short(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def call(what: str, url: str, fn: Callable, *args, settings: Settings | None = None, **kwargs):
    """``fn(*args, **kwargs)`` under the retry policy; failures become one :class:`RemoteDataError` line."""
    settings = settings or Settings.from_env()
    for attempt in range(1, settings.retries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - classified below, re-raised as one line
            kind = _classify(err)
            if kind == "missing":
                raise RemoteDataError(f"{url} not found (check the URL, the bucket and the dataset name)") from None
            if kind == "denied":
                raise RemoteDataError(
                    f"access to {url} denied ({_short(err)}); the public gs://gqn-dataset needs no credentials: "
                    "unset GQN_GCS_TOKEN, or give credentials that can read this bucket "
                    "(GOOGLE_APPLICATION_CREDENTIALS=key.json)"
                ) from None
            if kind == "fatal":
                raise RemoteDataError(f"could not {what} {url}: {_short(err)}") from None
            if attempt == settings.retries:
                emulator = os.environ.get("STORAGE_EMULATOR_HOST")
                where = f" (STORAGE_EMULATOR_HOST={emulator} is set: is that server running?)" if emulator else ""
                raise RemoteDataError(
                    f"could not {what} {url} after {settings.retries} tries ({_short(err)}){where}; check the "
                    "network and retry (progress is kept), raise GQN_REMOTE_RETRIES to wait longer, or download "
                    "the files first with gqn-data download"
                ) from None
            wait = min(settings.backoff * 2 ** (attempt - 1), MAX_BACKOFF) * (1 + 0.25 * random.random())
            log.warning("%s %s failed (%s); retry %d of %d in %.1f s", what, url, _short(err), attempt,
                        settings.retries - 1, wait)
            time.sleep(wait)


# ---------------------------------------------------------------------------------------- listing
def list_files(directory: str, suffix: str | tuple[str, ...] = RECORD_SUFFIXES) -> list[tuple[str, int]]:
    """``[(url, size in bytes)]`` of the files ending in ``suffix`` (one, or any of several) directly in a remote
    directory, sorted.

    A directory that does not exist gives ``[]`` (object stores have no empty directories)."""
    fs, path = filesystem(directory)
    try:
        entries = call("list", directory, fs.ls, path, detail=True, refresh=True)
    except RemoteDataError as err:
        if "not found" in str(err):
            return []
        raise
    out = []
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type", "file") == "file" and name.endswith(suffix):
            url = join(directory, name)
            out.append((url, int(entry.get("size") or 0)))
            _SIZES[url] = out[-1][1]
    return sorted(out)


def list_split(data_dir: str, dataset: str, split: str, how_to_get: str) -> list[str]:
    """The remote split's record URLs (:data:`RECORD_SUFFIXES`), sorted (the remote twin of ``split_files``)."""
    directory = join(data_dir, dataset, split)
    files = [url for url, _ in list_files(directory)]
    if not files:
        raise GQNDataError(f"no {RECORD_NAMES} files at {directory}; {how_to_get}")
    return files


def read_bytes(url: str) -> bytes | None:
    """A small remote file's bytes, or None when it does not exist."""
    fs, path = filesystem(url)
    try:
        return call("read", url, fs.cat_file, path)
    except RemoteDataError as err:
        if "not found" in str(err):
            return None
        raise


def size_of(url: str) -> int:
    if url not in _SIZES:
        fs, path = filesystem(url)
        _SIZES[url] = int(call("stat", url, fs.size, path))
    return _SIZES[url]


# ---------------------------------------------------------------------------------------- reading
class RemoteReader:
    """A read-only, sequential file object over a remote file, with read-ahead and retries.

    Blocks of ``block_bytes`` are fetched by range requests, ``readahead`` of them in flight; each
    block has its own retries (so a failure resumes at that block's offset). ``tee``: a local path that
    receives every block in order (the cache writes through it). ``name`` is the URL (for messages).
    """

    def __init__(self, url: str, start: int = 0, size: int | None = None, tee: str | Path | None = None,
                 settings: Settings | None = None):
        self.name, self.settings = url, settings or Settings.from_env()
        self._fs, self._path = filesystem(url)
        self.size = size_of(url) if size is None else size
        self._pos = self._next = start
        self._buf, self._buf_at = b"", start
        self._pending: deque = deque()
        self._pool = ThreadPoolExecutor(self.settings.readahead, thread_name_prefix="gqn-readahead")
        self._tee = open(tee, "wb") if tee is not None and start == 0 else None
        self.tee_path = Path(tee) if self._tee else None
        self.requests = 0

    def _fetch(self, start: int, end: int) -> bytes:
        self.requests += 1
        data = call("read", self.name, self._fs.cat_file, self._path, start=start, end=end, settings=self.settings)
        if len(data) != end - start:
            raise RemoteDataError(f"{self.name}: asked for bytes {start}-{end} and got {len(data)} bytes "
                                  "(did the file change on the server?)")
        return data

    def _fill(self) -> None:
        while len(self._pending) < self.settings.readahead and self._next < self.size:
            end = min(self._next + self.settings.block_bytes, self.size)
            self._pending.append(self._pool.submit(self._fetch, self._next, end))
            self._next = end

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self._pos
        out = []
        while n > 0:
            at = self._pos - self._buf_at
            if at < len(self._buf):
                piece = self._buf[at: at + n]
                out.append(piece)
                self._pos += len(piece)
                n -= len(piece)
                continue
            self._fill()
            if not self._pending:
                break
            self._buf_at += len(self._buf)
            self._buf = self._pending.popleft().result()
            if self._tee is not None:
                self._tee.write(self._buf)
        return b"".join(out)

    def seek(self, pos: int) -> int:
        if pos != self._pos:  # only forward moves within the stream are supported cheaply: restart there
            self._drop_pending()
            self._pos = self._next = self._buf_at = pos
            self._buf = b""
            self._close_tee(keep=False)
        return pos

    def tell(self) -> int:
        return self._pos

    @property
    def complete(self) -> bool:
        """Every byte of the file went through (the tee holds the whole file)."""
        return self._tee is not None and self._buf_at + len(self._buf) == self.size and not self._pending

    def _drop_pending(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()

    def _close_tee(self, keep: bool) -> Path | None:
        if self._tee is None:
            return None
        self._tee.close()
        self._tee = None
        if not keep:
            self.tee_path.unlink(missing_ok=True)
            return None
        return self.tee_path

    def close(self, keep_tee: bool = False) -> Path | None:
        """Close; returns the tee file if ``keep_tee`` and the whole file went through it."""
        keep = keep_tee and self.complete
        self._drop_pending()
        self._pool.shutdown(wait=True, cancel_futures=True)
        return self._close_tee(keep)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_url(url: str) -> RemoteReader:
    return RemoteReader(url)


def verify_file(path: str | Path) -> CorruptRecordError | None:
    """The first problem of a local TFRecord file (framing or a record's CRC), or None when sound."""
    from data_modules.records import iter_records

    try:
        for _ in iter_records(path):
            pass
    except CorruptRecordError as err:
        return err
    return None


# ---------------------------------------------------------------------------------------- the cache
class RemoteCache:
    """Whole remote files kept on local disk under ``root`` (``root/<protocol>/<bucket>/<path>``).

    A file enters the cache only after it was read to its end and every record passed its CRC; past
    ``max_bytes`` the least recently read files are deleted. Safe for several processes: each writes
    its own temporary file and renames it into place.
    """

    def __init__(self, root: str | Path, max_gb: float | None = None):
        self.root = Path(root).expanduser()
        self.max_bytes = None if max_gb in (None, 0) else int(float(max_gb) * 2**30)
        if self.max_bytes is not None and self.max_bytes < 0:
            raise GQNDataError(f"data.cache_max_gb must be positive (or null for no cap), got {max_gb}")

    def path(self, url: str) -> Path:
        protocol, _, rest = url.partition("://")
        if url.startswith(GCS_HTTPS):
            protocol, rest = "gs", url[len(GCS_HTTPS):]
        protocol = "gs" if protocol == "gcs" else protocol
        return self.root / protocol / rest.lstrip("/")

    def lookup(self, url: str) -> Path | None:
        path = self.path(url)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if url in _SIZES and _SIZES[url] != size:  # the listing says the file changed: fetch it again
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # recency for the eviction order
        return path

    def temp_path(self, url: str) -> Path:
        path = self.path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")

    def admit(self, url: str, part: Path) -> Path | None:
        """Verify a fully read file and rename it into the cache (or delete it when it is unsound)."""
        size = part.stat().st_size
        problem = verify_file(part)
        if problem is not None or (self.max_bytes is not None and size > self.max_bytes):
            part.unlink(missing_ok=True)
            return None
        dest = self.path(url)
        os.replace(part, dest)
        self.evict(keep=dest)
        return dest

    def drop(self, path: Path) -> None:
        Path(path).unlink(missing_ok=True)

    def files(self) -> list[tuple[float, int, Path]]:
        out = []
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                if name.startswith("."):
                    continue
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.files())

    def evict(self, keep: Path | None = None) -> None:
        if self.max_bytes is None:
            return
        files = self.files()
        total = sum(size for _, size, _ in files)
        for _, size, path in files:  # least recently read first
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            path.unlink(missing_ok=True)  # another process may have evicted it already
            total -= size

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def iter_file_records(path: str, on_bad_data=None, cache: RemoteCache | None = None) -> Iterator[tuple[int, bytes]]:
    """``(offset, record)`` of one data file, local or remote, through the cache when one is given.

    A cached copy that fails a CRC is dropped (with a warning) and the file fetched again; records it
    already gave are not given twice. A remote file read to its end enters the cache after its check.
    """
    from data_modules.records import iter_records

    if not is_url(path):
        yield from iter_records(local_path(path), on_bad_data=on_bad_data)
        return
    done = 0  # records before this offset were already given (from a cached copy that then failed)
    if cache is not None and (cached := cache.lookup(path)) is not None:
        try:
            for offset, data in iter_records(cached):
                yield offset, data
                done = offset + 16 + len(data)
            return
        except CorruptRecordError as err:
            cache.drop(cached)
            log.warning("cached copy of %s is damaged (%s at byte %d); dropped it, fetching the file again",
                        path, err.problem, err.offset)
    tee = cache.temp_path(path) if cache is not None else None
    reader = RemoteReader(path, tee=tee)
    keep = False
    try:
        for offset, data in iter_records(reader, on_bad_data=on_bad_data):
            if offset >= done:
                yield offset, data
        keep = True
    finally:
        part = reader.close(keep_tee=keep)
        if part is not None:
            cache.admit(path, part)
