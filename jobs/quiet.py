"""A quiet driver: overheard's progress, captions and summary, not Ray's own notices.

On every run of Ray 2.60 the driver's terminal got (measured on ``overheard caption
./examples/media ./out``, 9 lines besides overheard's own):
- INFO/WARNING records of the ``ray`` logger: token authentication set-up, "Started a local Ray
  instance" (``ray.init(logging_level=...)`` controls them);
- INFO/WARNING records of ``ray.data``'s console handler: execution plan, "Progress bars
  disabled", "execution finished" (its file handler keeps them in the session's ray-data.log);
- one ``[... E ... core_worker.cc] Actor with class name ... has constructor arguments in the object
  store and max_restarts > 0`` line per actor pool: Ray Data itself passes its DataContext and map
  transformer by reference to restartable actors, so every Ray Data actor pool logs it at ERROR
  level although nothing is wrong. It comes from C++ straight to file descriptor 2, so the only
  way to hide it is a filter on fd 2 that drops exactly that message.
With ``verbose`` nothing is hidden. Real errors still show: other C++ lines, ERROR records, and
exceptions pass through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading

# Known-harmless C++ notices (matched on one whole line of fd 2).
HARMLESS = (
    re.compile(rb"^\[[^\]]* E \d+ \d+\] core_worker\.cc:\d+: Actor with class name: .* has "
               rb"constructor arguments in the object store and max_restarts > 0"),
)


def ray_console_level(level: int) -> None:
    """Ray's Python-side notices on the console from ``level`` up (its log files keep all):
    ERROR when quiet, INFO (Ray's default) when verbose."""
    import ray.data  # noqa: F401  (configures the ray.data handlers this adjusts)

    logging.getLogger("ray").setLevel(level)
    for h in logging.getLogger("ray.data").handlers:
        if not hasattr(h, "baseFilename"):  # the console handler; not the session log files
            h.setLevel(level)


class StderrFilter:
    """Copies file descriptor 2 through a pipe, dropping lines that match ``HARMLESS``.

    Install after ``ray.init``: Ray's daemons started by ``ray.init`` keep the real stderr.
    Segments ending in ``\\r`` (tqdm redraws) pass through at once, so the progress bar stays live.
    """

    def __init__(self, patterns=HARMLESS):
        self.patterns = patterns
        self.saved = None
        self.thread = None

    def start(self) -> "StderrFilter":
        sys.stderr.flush()
        r, w = os.pipe()
        self.saved = os.dup(2)
        os.dup2(w, 2)
        os.close(w)
        self.thread = threading.Thread(target=self._pump, args=(r,), daemon=True,
                                       name="overheard-stderr-filter")
        self.thread.start()
        return self

    def _emit(self, seg: bytes) -> None:
        if not any(p.search(seg.rstrip(b"\r\n")) for p in self.patterns):
            os.write(self.saved, seg)

    def _pump(self, r: int) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(r, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            while True:
                cut = min((i for i in (buf.find(b"\n"), buf.find(b"\r")) if i >= 0), default=-1)
                if cut < 0:
                    break
                self._emit(buf[:cut + 1])
                buf = buf[cut + 1:]
            if buf and not buf.startswith(b"["):  # not the start of a C++ log line: show now
                self._emit(buf)
                buf = b""
        if buf:
            self._emit(buf)
        os.close(r)

    def stop(self) -> None:
        if self.saved is None:
            return
        sys.stderr.flush()
        os.dup2(self.saved, 2)  # closes the pipe's last write end: the pump drains and ends
        if self.thread is not None:
            self.thread.join(timeout=5)
            if self.thread.is_alive():  # a child holds the pipe: leave its output a target
                return
        os.close(self.saved)
        self.saved = None


@contextlib.contextmanager
def quiet_driver(verbose: bool = False):
    """Within the block, hide Ray's notices in this driver (``verbose``: hide nothing). Scoped,
    not process-wide, so a caller that redirects fd 2 itself (pytest's capture) gets it back."""
    if verbose:
        ray_console_level(logging.INFO)
        yield
        return
    ray_console_level(logging.ERROR)
    try:
        f = StderrFilter().start()
    except OSError:  # no fd 2 to filter (a closed stderr): nothing to hide either
        f = StderrFilter()
    try:
        yield
    finally:
        f.stop()
