"""One run at a time per work dir: a lease file (run id, host, pid) made with an exclusive create
(O_EXCL on a local disk, a conditional PUT on object storage).

A second run on the same work dir refuses with the holder's details instead of writing beside it.
A lease whose process is gone (same host, pid not alive: a driver killed with SIGKILL) is taken
over with a warning; a lease from another host can only be judged by a person, so the message
says which file to delete once no run is active.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
from typing import Iterator

from curate.core.config import ConfigError
from curate.io.storage import WorkPath, exclusive_create

log = logging.getLogger(__name__)
LEASE = ".curate-run.lease"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: WorkPath) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_lease(workdir: WorkPath, run_id: str) -> Iterator[None]:
    """Hold the work dir's lease for the duration of a run."""
    path = workdir / LEASE
    me = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
          "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(2):
        try:
            exclusive_create(path, json.dumps(me).encode())
        except FileExistsError:
            held = _holder(path)
            if held and held.get("host") == me["host"] and not _alive(int(held.get("pid", -1))):
                log.warning("work dir lease of run %s (pid %s) is stale: its process is gone; taking it over",
                            held.get("run_id"), held.get("pid"))
                path.unlink(missing_ok=True)
                continue
            who = (f"run {held.get('run_id')} on {held.get('host')} (pid {held.get('pid')}, since {held.get('since')})"
                   if held else "another run")
            raise ConfigError(f"work dir {workdir} is in use by {who}; wait for it to finish, use another "
                              f"--workdir, or delete {path} if no run is active") from None
        except OSError as e:  # a read-only folder, a bucket that does not exist or refuses us
            raise ConfigError(f"work dir {workdir} is not writable: {e.strerror or e}") from None
        break
    try:
        yield
    finally:
        if (_holder(path) or {}).get("run_id") == run_id:
            path.unlink(missing_ok=True)
