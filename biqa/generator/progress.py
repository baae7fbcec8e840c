"""Progress of a job: workers report per-group counts, the driver shows one bar or log lines.

Workers are other processes (loky, a Dask LocalCluster).  A task sends the
cumulative counts of its current attempt -- (shard index, written, skipped,
not applicable) -- to a socket the driver listens on, at most
every ``REPORT_INTERVAL`` seconds.  The driver keeps the latest counts of each
running shard and swaps them for the shard's final stats when its result
arrives, so a late, lost or repeated message never miscounts.  A worker that
cannot reach the socket (on another machine of a Dask cluster) reports each
finished shard through its result only.  Reporting changes no output byte.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import secrets
import struct
import sys
import threading
import time
import warnings
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener, wait
from typing import Callable

REPORT_INTERVAL = 0.25  # seconds between a task's messages: a few per second per worker
LOG_EVERY = 30.0  # seconds between plain log lines while no shard finishes
_MESSAGE = struct.Struct("<qqqq")  # index, written, skipped, not applicable

Report = Callable[[int, int, int, int], None]


# ------------------------------------------------------------------ worker side

class TaskProgress:
    """The counts of one attempt at one shard, passed on to ``report`` (throttled)."""

    def __init__(self, report: Report | None, index: int):
        self.report, self.index = report, index
        self._last = -math.inf

    def __call__(self, written: int, skipped: int, not_applicable: int) -> None:
        now = time.monotonic()
        if self.report is not None and now - self._last >= REPORT_INTERVAL:
            self._last = now
            self.report(self.index, written, skipped, not_applicable)


_driver: dict = {"address": None, "conn": None}  # this process's connection to the driver
_driver_lock = threading.Lock()  # a Dask worker may run tasks in several threads


def _connection(address, authkey: bytes):
    """One connection per worker process, to the current driver; None if it is unreachable."""
    if _driver["address"] != address:
        if _driver["conn"] is not None:
            _driver["conn"].close()
        _driver.update(address=address, conn=None)
        try:
            _driver["conn"] = Client(address, authkey=authkey)
        except (OSError, EOFError, AuthenticationError):
            pass  # another machine, or the driver is gone: results still report each shard
    return _driver["conn"]


class SocketReporter:
    """A picklable ``Report`` that sends to the driver's ``ProgressChannel``."""

    def __init__(self, address, authkey: bytes):
        self.address, self.authkey = address, authkey

    def __call__(self, index: int, written: int, skipped: int, not_applicable: int) -> None:
        with _driver_lock:
            conn = _connection(self.address, self.authkey)
            if conn is None:
                return
            try:
                conn.send_bytes(_MESSAGE.pack(index, written, skipped, not_applicable))
            except OSError:  # the driver went away: stop reporting, the task goes on
                conn.close()
                _driver["conn"] = None


# ------------------------------------------------------------------ driver side

class ProgressChannel:
    """The driver's end: a local socket (AF_UNIX; a named pipe on Windows) with one thread
    accepting workers and one reading their messages into ``on_message``."""

    def __init__(self, on_message: Report):
        self._on_message = on_message
        self._authkey = secrets.token_bytes(32)
        self._listener = Listener(authkey=self._authkey)
        self._conns: list = []
        self._lock = threading.Lock()
        self._closing = False
        self._threads = [threading.Thread(target=f, daemon=True, name=f"biqa-progress-{n}")
                         for n, f in (("accept", self._accept), ("read", self._read))]
        for t in self._threads:
            t.start()

    @property
    def reporter(self) -> SocketReporter:
        return SocketReporter(self._listener.address, self._authkey)

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn = self._listener.accept()
            except AuthenticationError:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)

    def _read(self) -> None:
        while True:
            closing = self._closing  # once set: one last pass over what has arrived
            with self._lock:
                conns = list(self._conns)
            ready = wait(conns, timeout=0 if closing else 0.2) if conns else []
            if closing and not ready:
                return
            if not conns:
                time.sleep(0.05)
            for conn in ready:
                try:
                    data = conn.recv_bytes()
                except (EOFError, OSError):
                    with self._lock:
                        self._conns.remove(conn)
                    conn.close()
                    continue
                if len(data) == _MESSAGE.size:
                    self._on_message(*_MESSAGE.unpack(data))

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError, EOFError, AuthenticationError):
            Client(self._listener.address, authkey=self._authkey).close()  # wakes accept()
        self._listener.close()
        for t in self._threads:
            t.join(timeout=5)
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()


@contextlib.contextmanager
def progress_channel(on_message: Report):
    """A ``SocketReporter`` for workers, or None where no local socket can be made."""
    try:
        channel = ProgressChannel(on_message)
    except OSError:
        yield None
        return
    try:
        yield channel.reporter
    finally:
        channel.close()


class _LinesAboveBar(io.TextIOBase):
    """A text stream that hands each complete line to ``write_line`` (tqdm.write)."""

    def __init__(self, write_line: Callable[[str], None]):
        self._write_line, self._pending = write_line, ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._write_line(line)
        return len(text)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 \
        else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A tqdm bar on a terminal, plain log lines otherwise, over samples processed in this
    run: shards found already done shrink the total instead of inflating the rate.

    ``advance`` takes workers' running counts (from any thread), ``update`` a finished
    shard's result; ``write`` prints a message without breaking the bar.
    """

    def __init__(self, total_samples: int, total_shards: int, enabled: bool = True,
                 stream=None, tty: bool | None = None, log_every: float = LOG_EVERY):
        self.stream = stream or sys.stderr
        self.total_samples, self.total_shards = total_samples, total_shards
        self.enabled, self.log_every = enabled, log_every
        self.tty = self.stream.isatty() if tty is None else tty
        self.start = time.perf_counter()
        self._last_line = None
        self._lock = threading.RLock()
        self._live: dict[int, tuple[int, int, int]] = {}  # index -> written, skipped, n/a
        self._finished: set[int] = set()
        self.written = self.skipped = self.not_applicable = self.failed_samples = 0
        self.shards = self.failed = self.resumed = self.resumed_samples = 0
        self._bar = None
        if enabled and self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total_samples, unit="img", file=self.stream,
                             dynamic_ncols=True, smoothing=0.1)

    # counts over finished shards plus the running ones
    def _counts(self) -> tuple[int, int, int]:
        live = list(self._live.values())
        return (self.written + sum(c[0] for c in live), self.skipped + sum(c[1] for c in live),
                self.not_applicable + sum(c[2] for c in live))

    @property
    def processed(self) -> int:
        """Samples of this run's work that are settled: written, skipped, n/a or failed."""
        return sum(self._counts()) + self.failed_samples

    @property
    def to_do(self) -> int:
        return self.total_samples - self.resumed_samples

    def advance(self, index: int, written: int, skipped: int, not_applicable: int) -> None:
        with self._lock:
            if index in self._finished:
                return  # a message that arrived after the shard's result
            before = self.processed
            self._live[index] = (written, skipped, not_applicable)
            self._show(self.processed - before, None)

    def add_tasks(self, tasks) -> None:
        """More work than planned at the start (a walk's next round); a task that runs
        again (a walk chunk cut short) counts again."""
        with self._lock:
            for task in tasks:
                self._finished.discard(task.index)
                self.total_samples += task.planned_samples
                self.total_shards += 1

    def update(self, result: dict) -> None:
        with self._lock:
            before = self.processed
            self._finished.add(result["index"])
            self._live.pop(result["index"], None)
            self.shards += 1
            if result.get("resumed"):
                self.resumed += 1
                self.resumed_samples += result["planned"]
            elif result["status"] == "failed":
                self.failed += 1
                self.failed_samples += result["planned"]
            else:
                self.written += result["samples"]
                self.skipped += result["samples_skipped"]
                self.not_applicable += (result["planned"] - result["samples"]
                                        - result["samples_skipped"])
            self._show(self.processed - before, result)

    def _show(self, delta: int, result: dict | None) -> None:
        if not self.enabled:
            return
        written, skipped, na = self._counts()
        if self._bar is not None:
            self._bar.total = self.to_do
            extras = [(skipped, "skipped"), (na, "n/a"), (self.resumed, "shards already done"),
                      (self.failed, "shards failed")]
            self._bar.set_postfix_str(", ".join(
                [f"{self.shards}/{self.total_shards} shards", f"{written} written"]
                + [f"{n} {what}" for n, what in extras if n]), refresh=False)
            if delta:
                self._bar.update(delta)
            elif result is not None:
                self._bar.refresh()
            return
        now = time.perf_counter()
        if result is None and self._last_line is not None \
                and now - self._last_line < self.log_every:
            return  # the first running counts print at once, then every log_every seconds
        self._last_line = now
        elapsed = now - self.start
        rate = self.processed / elapsed if elapsed > 0 else 0.0
        images_rate = f"{written / elapsed:.1f} images/s" if written and elapsed > 0 else \
            "no images yet"
        eta = _fmt_seconds((self.to_do - self.processed) / rate) if rate > 0 else "?"
        what = "" if result is None else f"{result['shard']} " + (
            "already done" if result.get("resumed") else result["status"]) + "; "
        counts = (f", {self.processed}/{self.to_do} samples processed ({written} written, "
                  f"{skipped} skipped, {na} not applicable); {images_rate}, ETA {eta}"
                  if self.to_do else "")  # else every shard so far was already done
        self.write(f"{what}{self.shards}/{self.total_shards} shards ({self.resumed} already "
                   f"done, {self.failed} failed){counts}")

    def write(self, message: str) -> None:
        """``biqa-gen: message`` on the stream, above the bar if one is shown."""
        line = f"biqa-gen: {message}"
        with self._lock:
            if self._bar is not None:
                self._bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)

    @contextlib.contextmanager
    def redirect_logging(self):
        """While the bar is shown, log records and warnings print above it, not inside it:
        every console handler of every logger (and logging's last resort) and
        ``warnings.showwarning`` write through the bar for the duration."""
        if self._bar is None:
            yield
            return
        above = _LinesAboveBar(lambda line: self._bar.write(line, file=self.stream))
        loggers = [logging.root, *(lg for lg in logging.root.manager.loggerDict.values()
                                   if isinstance(lg, logging.Logger))]
        handlers = [h for lg in loggers for h in lg.handlers
                    if type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)]
        streams = [h.setStream(above) for h in handlers]
        last_resort = logging.lastResort
        logging.lastResort = logging.StreamHandler(above)
        logging.lastResort.setLevel(logging.WARNING)

        def show(message, category, filename, lineno, file=None, line=None):
            above.write(warnings.formatwarning(message, category, filename, lineno, line))

        try:
            with warnings.catch_warnings():
                warnings.showwarning = show
                yield
        finally:
            logging.lastResort = last_resort
            for h, stream in zip(handlers, streams):
                h.setStream(stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
