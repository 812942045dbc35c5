"""Stage folders: how xbmd's batch stages (``xbmd synth``, ``xbmd prepare``) own an output folder.

One mechanism for both:

- :func:`claim_folder`: a stage writes only into a folder that is new, empty, or already its own
  with the same settings (a marker JSON says so); anything else is refused with a clear error,
  so two runs never mix and a re-run resumes;
- :func:`write_atomic` and its helpers: every file is written to a hidden temporary name and
  renamed, so an interrupted run leaves whole files or none;
- :class:`CaseLog`: an append-only log per case;
- :func:`run_cases`: cases in parallel processes (or in this one), each result handed back as it
  comes; a worker process that dies (killed, out of memory) becomes a failure of its case, the
  others go on.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from xbmd.errors import InputError

T = TypeVar("T")
R = TypeVar("R")


def safe_name(name: str) -> str:
    """A file-name-safe version of an id: only letters, digits, '.', '_' and '-' (no '..')."""
    safe = re.sub(r"[^\w.-]", "_", str(name)).strip(".") or "_"
    return safe.replace("..", "_")


def check_output_folder(out: Path) -> Path:
    """``out`` as a folder that can be written: created if missing; InputError if it is a file,
    lies under a file, or cannot be written."""
    out = Path(out)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise InputError(f"{out}: cannot be an output folder: {parent} is a file")
        if parent.exists():
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise InputError(f"{out}: the output folder is not writable")
    return out


def check_output_file(path: Path, what: str = "output file") -> Path:
    """``path`` as a file that can be written, checked before any work is done: its folder is
    created if missing; InputError if ``path`` is a folder, lies under a file, or its folder
    cannot be written (an existing file is overwritten, as before)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; the {what} must be a file name")
    parent = path.parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists() and not ancestor.is_dir():
            raise InputError(f"{path}: cannot write the {what}: {ancestor} is a file")
        if ancestor.exists():
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create its folder {parent} ({exc.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{path}: not writable")
    return path


def claim_folder(
    out: Path, marker: str, fmt: str, identity: dict, allowed: Iterable[str] = ()
) -> dict | None:
    """Claim ``out`` for a stage; returns the marker's earlier content when resuming, else None.

    Parameters
    ----------
    out : the stage's output folder.
    marker : name of its marker JSON (e.g. 'prepare.json'), holding ``format`` and ``identity``.
    fmt : the stage's format name (e.g. 'xbmd-training-set').
    identity : what must be equal for a run to resume the folder (seed, settings, version).
    allowed : names that may already be in a folder without a marker (inputs made beforehand).

    Raises InputError when ``out`` holds another stage's or another run's output.
    """
    out = check_output_folder(out)
    path = out / marker
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: unreadable ({exc}); choose an empty folder") from None
        if old.get("format") != fmt:
            raise InputError(f"{out} holds a {old.get('format')!r}, not a {fmt!r}; choose another")
        if old.get("identity") != identity:
            raise InputError(
                f"{out} holds output made with other settings ({old.get('identity')} there, "
                f"{identity} asked); choose an empty folder or the same settings"
            )
        return old
    others = sorted(p.name for p in out.iterdir() if p.name not in set(allowed))
    if others:
        raise InputError(
            f"{out} holds other files ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''})"
            f" and no {marker}; choose an empty folder"
        )
    write_json(path, {"format": fmt, "status": "running", "identity": identity})
    return None


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a hidden temporary file, then rename: no half-written files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, doc: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8"))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez_compressed(f, **arrays)

    write_atomic(path, write)


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    """A CSV of ``rows`` (missing or None cells empty), written atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})

    write_atomic(path, write)


class CaseLog:
    """Append-only log of one case (``folder/logs/<case>.log``); a context manager."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def __call__(self, message: str) -> None:
        self._file.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {message}\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CaseLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_cases(
    items: list[T],
    work: Callable[..., R],
    crashed: Callable[[T, BaseException], R],
    workers: int = 1,
    progress: str | None = None,
    args: tuple = (),
) -> Iterator[R]:
    """Run ``work(item, *args)`` for every item; yields each result as it comes.

    ``work`` should not raise (it records its own failures); if it does, or if its worker process
    dies, ``crashed(item, exception)`` stands for its result. With ``workers`` > 1 the items run in
    that many spawned processes of ``cpu_count // workers`` torch threads each; ``work`` must then
    be a module-level function and the items and ``args`` picklable. ``progress`` is the progress
    bar's label (None: no bar).
    """
    from tqdm import tqdm

    workers = max(1, min(workers, len(items)))
    bar = tqdm(total=len(items), desc=progress, unit="case", disable=progress is None)
    try:
        if workers == 1:
            for item in items:
                try:
                    result = work(item, *args)
                except Exception as exc:  # a bug in one case must not stop the others
                    result = crashed(item, exc)
                bar.update()
                yield result
            return
        threads = max(1, (os.cpu_count() or 1) // workers)
        for result in _in_processes(items, work, crashed, workers, threads, args):
            bar.update()
            yield result
    finally:
        bar.close()


def _in_processes(
    items: list[T],
    work: Callable[..., R],
    crashed: Callable[[T, BaseException], R],
    workers: int,
    threads: int,
    args: tuple = (),
) -> Iterator[R]:
    """:func:`run_cases` in ``workers`` spawned processes, each in a process pool of its own.

    When a pool's worker process dies, Python fails every unfinished item of that pool
    (BrokenProcessPool), not only the one it was running; one pool per process confines this to
    that item: it becomes ``crashed(item, exc)``, its slot gets a new process, the others go on.
    """
    context = get_context("spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            1, mp_context=context, initializer=_init_worker, initargs=(threads,)
        )

    todo = list(reversed(items))  # pop() takes them in order
    pools = [new_pool() for _ in range(workers)]
    running: dict[Future, tuple[int, T]] = {}
    try:
        while todo or running:
            busy = {slot for slot, _ in running.values()}
            for slot in range(workers):
                if slot not in busy and todo:
                    item = todo.pop()
                    running[pools[slot].submit(work, item, *args)] = (slot, item)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                slot, item = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool as exc:  # its process died (killed, out of memory)
                    pools[slot].shutdown(wait=False)
                    pools[slot] = new_pool()
                    result = crashed(item, exc)
                except Exception as exc:  # work raised, or its item or result did not pickle
                    result = crashed(item, exc)
                yield result
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
