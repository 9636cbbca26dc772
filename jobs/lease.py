"""One run at a time per output: a lease object ``OUTPUT/_lease.json`` (no Ray import).

Why: resume skips what is committed when a run *starts*; two runs started together on the
same OUTPUT both see nothing done and write every window twice (issue 15). The lease makes
the second run refuse before it lists or decodes anything.

    lease = OutputLease(output, run_id, stale_s=120).acquire()   # or raises LeaseHeld
    ...                                                         # heartbeat thread renews it
    lease.release()

* Taking it is one exclusive create: ``O_CREAT | O_EXCL`` locally; on S3 a conditional PUT
  (``If-None-Match: *`` through s3fs ``pipe_file(mode="create")``). AWS S3 and moto (the test
  server) honour it: the second PUT fails with 412 PreconditionFailed. A store that ignores the
  header lets both PUTs succeed, last writer wins; so after creating, the lease is read back and
  a run that finds another run's id there refuses too. What remains on such a store is the
  rare case where both read back after both wrote the same instant -- use a store with
  conditional writes (AWS S3, MinIO, moto, GCS through its S3 API) for a hard guarantee.
* A heartbeat thread rewrites the lease every ``stale_s / 4`` seconds. A lease whose heartbeat
  is older than ``stale_s`` (default 120 s) belongs to a killed run and is taken over (the stale
  object is removed, then created exclusively again, so of two runs taking over one wins).
  A lease written on this host by a process that no longer exists is taken over at once (a
  rerun right after a kill -9 does not wait).
* If a heartbeat finds the lease gone or held by another run (ours went stale: a paused
  process), ``lost`` is set; the caption job stops before writing another part.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from overheard import storage

LEASE_NAME = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another live run holds the output's lease."""


def _dead_here(held: dict) -> bool:
    """The lease's run was on this host and its process is gone (killed, crashed): no need to
    wait for its heartbeat to go stale."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but is not ours to signal
        return False
    return False


class OutputLease:
    def __init__(self, output: str, run_id: str, stale_s: float = 120.0):
        self.output, self.run_id, self.stale_s = output, run_id, float(stale_s)
        self.uri = storage.join(output, LEASE_NAME)
        self.lost = ""
        self._made_dir = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ storage primitives
    def _body(self) -> bytes:
        return json.dumps(dict(run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(),
                               heartbeat=time.time(), stale_s=self.stale_s)).encode()

    def _create(self) -> bool:
        """Exclusive create; False if the lease object already exists."""
        fs, path = storage.get_fs(self.uri)
        if storage.protocol_of(self.uri) == "file":
            if not os.path.isdir(os.path.dirname(path)):
                os.makedirs(os.path.dirname(path))
                self._made_dir = os.path.dirname(path)  # removed again if left empty
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
            return True
        try:
            fs.pipe_file(path, self._body(), mode="create")
        except (FileExistsError, OSError) as e:
            if isinstance(e, FileExistsError) or "PreconditionFailed" in str(e) or "412" in str(e):
                return False
            raise
        return True

    def _read(self) -> dict | None:
        try:
            fs, path = storage.get_fs(self.uri)
            if storage.protocol_of(self.uri) != "file":
                fs.invalidate_cache(path)
            return json.loads(storage.read_bytes(self.uri))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # half-written by a non-atomic store, or unreadable
            return {}

    def _remove(self) -> None:
        fs, path = storage.get_fs(self.uri)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------------------- API
    def acquire(self) -> "OutputLease":
        for _ in range(3):
            if self._create():
                held = self._read()
                if held is not None and held.get("run_id") not in (None, self.run_id):
                    # a store without conditional writes let another run's PUT win
                    raise LeaseHeld(self._held_message(held))
                self._start_heartbeat()
                return self
            held = self._read()
            if held is None:
                continue  # released between our create and our read: try again
            age = time.time() - float(held.get("heartbeat", 0) or 0)
            if age <= float(held.get("stale_s", self.stale_s) or self.stale_s) \
                    and not _dead_here(held):
                raise LeaseHeld(self._held_message(held))
            self._remove()  # a killed run's lease: take it over
        raise LeaseHeld(f"could not take the lease {self.uri} (other runs keep taking it)")

    def _held_message(self, held: dict) -> str:
        age = time.time() - float(held.get("heartbeat", 0) or 0)
        stale = float(held.get("stale_s", self.stale_s) or self.stale_s)
        return (f"output {self.output} is in use by run {held.get('run_id', '?')} (pid "
                f"{held.get('pid', '?')} on {held.get('host', '?')}, heartbeat {age:.0f} s ago); "
                f"wait for it to finish, or if it was killed retry after {max(stale - age, 0):.0f} s "
                f"(a lease is stale {stale:g} s after its last heartbeat)")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="overheard-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_s / 4):
            try:
                held = self._read()
                if not held or held.get("run_id") != self.run_id:
                    self.lost = (f"lost the output lease {self.uri} (now "
                                 f"{(held or {}).get('run_id', 'absent')}); stopping")
                    return
                storage.write_bytes_atomic(self.uri, self._body())
            except Exception:  # noqa: BLE001 - a store hiccup: try again next beat
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held is not None and held.get("run_id") == self.run_id:
            self._remove()
        if self._made_dir:
            try:
                os.rmdir(self._made_dir)  # a run that failed before writing leaves no folder
            except OSError:
                pass
