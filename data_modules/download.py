"""``gqn-data download``: copy a dataset (or a part of it) from a remote data dir, resumably and safely.

Each file is written to ``NAME.part`` beside its final name; an interrupted run continues every
``.part`` from its last byte (a range request). A finished ``.part`` is checked record by record
(framing and CRC32C) and only then renamed, so a half or corrupt file never sits where the reader
looks. A file whose final name exists with the remote size is complete: re-running is a no-op.
"""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from data_modules.datasets import CARD, PUBLIC_BUCKET
from data_modules.errors import CorruptRecordError, GQNDataError
from data_modules.records import RECORD_NAMES
from data_modules.remote import RemoteDataError, RemoteReader, Settings, join, list_files, read_bytes, verify_file

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Job:
    url: str
    size: int
    dest: Path

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")

    @property
    def complete(self) -> bool:
        return self.dest.is_file() and self.dest.stat().st_size == self.size


def parse_files(spec: str | None) -> slice | None:
    """``"a:b"`` (Python slice of the sorted file list, either end optional) or ``"n"`` (file n alone)."""
    if spec is None:
        return None
    try:
        if ":" not in spec:
            i = int(spec)
            return slice(i, i + 1)
        a, b = spec.split(":", 1)
        return slice(int(a) if a else None, int(b) if b else None)
    except ValueError:
        raise GQNDataError(f"--files takes START:END (file indices, e.g. 0:100), got {spec!r}") from None


def plan(name: str, out: str | Path, source: str = PUBLIC_BUCKET, split: str = "all", files: str | None = None,
         fraction: float | None = None) -> list[Job]:
    """The files to have locally: ``out/name/{split}/<file>`` for the chosen part of each split."""
    if split not in ("all", *SPLITS):
        raise GQNDataError(f"--split must be train, test or all, got {split!r}")
    if fraction is not None and not 0 < fraction <= 1:
        raise GQNDataError(f"--fraction must be in (0, 1], got {fraction}")
    if fraction is not None and files is not None:
        raise GQNDataError("give --files or --fraction, not both")
    pick = parse_files(files)
    jobs, seen = [], {}
    for s in SPLITS if split == "all" else (split,):
        listing = list_files(join(source, name, s))
        seen[s] = len(listing)
        if fraction is not None:
            listing = listing[: max(1, math.ceil(fraction * len(listing) - 1e-9))] if listing else []
        elif pick is not None:
            listing = listing[pick]
        jobs += [Job(url, size, Path(out) / name / s / url.rsplit("/", 1)[-1]) for url, size in listing]
    if not any(seen.values()):
        raise GQNDataError(f"no {RECORD_NAMES} files at {join(source, name)}/{{{','.join(seen)}}}/ "
                           f"(check the dataset name and --source; the DeepMind datasets are at {PUBLIC_BUCKET})")
    if not jobs:
        raise GQNDataError(f"--files {files} selects none of the {seen} files of {join(source, name)}")
    return jobs


def fetch(job: Job, progress=None, settings: Settings | None = None) -> str:
    """Bring one file to ``job.dest``; returns ``complete`` (already there), ``fetched`` or ``resumed``.

    Raises :class:`CorruptRecordError` (URL and byte offset) when the server's file fails its check;
    the partial file is then deleted, never kept.
    """
    if job.complete:
        return "complete"
    settings = settings or Settings.from_env()
    job.dest.parent.mkdir(parents=True, exist_ok=True)
    start = job.part.stat().st_size if job.part.is_file() else 0
    if start > job.size:  # the server's file changed: start again
        start = 0
    status = "resumed" if start else "fetched"
    for attempt in (0, 1):
        with open(job.part, "r+b" if start else "wb") as fh:
            fh.truncate(start)
            fh.seek(start)
            with RemoteReader(job.url, start=start, size=job.size, settings=settings) as reader:
                while True:
                    block = reader.read(settings.block_bytes)
                    if not block:
                        break
                    fh.write(block)
                    if progress is not None:
                        progress(len(block))
            fh.flush()
            os.fsync(fh.fileno())
        problem = verify_file(job.part)
        if problem is None:
            os.replace(job.part, job.dest)
            return status
        if start and attempt == 0:  # the kept part may be what is damaged: fetch the whole file once more
            if progress is not None:
                progress(-job.part.stat().st_size)
            start, status = 0, "fetched"
            continue
        job.part.unlink(missing_ok=True)
        raise CorruptRecordError(job.url, problem.offset, f"{problem.problem}; not kept (the file on the server "
                                 "is damaged: report it, or skip it with --files)")
    raise AssertionError("unreachable")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def download(name: str, out: str | Path, source: str = PUBLIC_BUCKET, split: str = "all", files: str | None = None,
             fraction: float | None = None, jobs: int = 4, dry_run: bool = False, progress: bool = True) -> int:
    """The ``gqn-data download`` command; returns the exit code (1 when some file failed)."""
    if jobs < 1:
        raise GQNDataError(f"--jobs must be >= 1, got {jobs}")
    todo = plan(name, out, source, split, files, fraction)
    by_split: dict[str, list[Job]] = {}
    for job in todo:
        by_split.setdefault(job.dest.parent.name, []).append(job)
    missing = [j for j in todo if not j.complete]
    partial = sum(j.part.stat().st_size for j in missing if j.part.is_file() and j.part.stat().st_size <= j.size)
    need = sum(j.size for j in missing) - partial
    for s, js in by_split.items():
        print(f"{s:5s}  {len(js):5d} files  {_human(sum(j.size for j in js)):>10s}  "
              f"{js[0].dest.name} .. {js[-1].dest.name}")
    print(f"to fetch: {len(missing)} file(s), {_human(need)}"
          + (f" ({_human(partial)} already in .part files)" if partial else "")
          + f"; {len(todo) - len(missing)} complete in {Path(out) / name}")
    if dry_run:
        return 0
    card = read_bytes(join(source, name, CARD))  # generated datasets carry a card; the DeepMind ones do not
    if card is not None:
        (Path(out) / name).mkdir(parents=True, exist_ok=True)
        (Path(out) / name / CARD).write_bytes(card)
    if not missing:
        return 0
    counts, problems = {"complete": 0, "fetched": 0, "resumed": 0}, []
    started = time.perf_counter()
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), disable=not progress)
    with bar, ThreadPoolExecutor(jobs) as pool:
        task = bar.add_task(f"{name}: {len(missing)} files", total=need)
        futures = {pool.submit(fetch, job, lambda n: bar.advance(task, n)): job for job in missing}
        for fut in as_completed(futures):
            try:
                counts[fut.result()] += 1
            except GQNDataError as err:  # a damaged file, or a network failure after retries
                problems.append(str(err))
    seconds = time.perf_counter() - started
    got = counts["fetched"] + counts["resumed"]
    print(f"{name}: {got} file(s) written ({counts['resumed']} resumed), {_human(need)} in {seconds:.1f} s "
          f"({_human(need / max(seconds, 1e-9))}/s) to {Path(out) / name}")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} file(s) failed; rerunning the same command retries them (finished files are kept)",
              file=sys.stderr)
        return 1
    return 0


def remote_info(url: str) -> list[tuple[str, int, int]]:
    """``[(split, files, bytes)]`` of a remote dataset dir, from listings only."""
    rows = []
    for s in SPLITS:
        listing = list_files(join(url, s))
        if listing:
            rows.append((s, len(listing), sum(size for _, size in listing)))
    if not rows:
        raise GQNDataError(f"no {RECORD_NAMES} files at {url}/train/ or {url}/test/ (expected a dataset dir "
                           f"such as {PUBLIC_BUCKET}/rooms_ring_camera)")
    return rows


__all__ = ["Job", "RemoteDataError", "download", "fetch", "plan", "remote_info"]
