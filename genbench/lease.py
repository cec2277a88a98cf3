"""Run leases: which process trains a run folder right now.

A run folder holds at most one live lease. Whoever trains a run (a `genbench run` process, one of its
worker processes, a Slurm job, a Ray task) takes the run's lease first and gives it back when the run
ends, finished or failed; a second claimant gets the holder instead and skips the run with a line
saying who holds it. Nothing else is shared between claimants but the results folder, so the rules
below hold across processes, hosts and engines alike.

Files (all JSON, each written whole into a temp file first and then put in place by os.link, which
fails when the name exists: a reader never sees half a lease, two writers never both win):

    <run>/lease.json              the first holder (taken when no lease exists)
    <run>/lease.after-<T>.json    the holder that took over the stale lease of token T

The current holder is found by following the chain from lease.json: token T is followed by
lease.after-T.json when that file exists. A chain only grows by takeovers of crashed holders, and is
removed whole when its last holder releases the run (lease.json first, then the rest).

A lease file says: token (unique per claim; a Slurm job or Ray task keeps its token across requeues and
retries), host, pid, the pid namespace, state (running | queued | requeued), since (when taken), who
(a line: "genbench run", "submitit job 1234_5", "ray task"), job (engine, job id, folder) for queued
runs, heartbeat_s, run. Its mtime is the heartbeat: the holder touches its file every heartbeat_s
(a tenth of its stale time, at most 60 s).

Staleness (when a claimant may take over):
  * running: the holder's pid is gone on this same host (same pid namespace), or its file has not
    been touched for max(stale_after_s of the reader, 3 x the holder's heartbeat_s);
  * queued / requeued (placed for a submitted job that has not started, or has been requeued): the
    job is known to have ended (its engine says so: sacct through submitit, or the local job's
    process); while the job's state cannot be read the lease holds (delete the file by hand to free
    the run). A queued lease without a job yet (being submitted) follows the running rules.
Takeover links the claimant's file at lease.after-<stale token>.json: of two takers exactly one
link succeeds; the winner then checks that the chain from lease.json leads to its file (it does not
when the chain was released meanwhile) and otherwise removes its file and starts over.

A claimant whose token is the holder's own (a requeued Slurm job, a retried Ray task) takes the lease
back at once when it is queued or requeued or its process is gone, else once it goes stale. A holder
that finds a successor of its own token, or its file no longer naming it, has lost the lease (it was
silent for longer than the stale time): its heartbeat stops, it never removes the new holder's
files, and when it holds the lease from the main thread that thread gets a KeyboardInterrupt so the
duplicate work stops (the runner turns it into a "lost its lease" line).

Clock note: staleness compares file mtimes (set by the file server) with this host's clock; keep
the hosts' clocks in step (NTP) or the stale time far above their skew.
"""
from __future__ import annotations

import _thread
import dataclasses
import errno
import json
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LEASE_FILE = "lease.json"
SUCCESSOR_PREFIX = "lease.after-"
DEFAULT_STALE_S = 600.0
STALE_ENV = "GENBENCH_LEASE_STALE_S"
STATES = ("running", "queued", "requeued")
LEASE_VERSION = 1


def new_token() -> str:
    return uuid.uuid4().hex


def heartbeat_for(stale_after_s: float) -> float:
    """How often a holder touches its file: a tenth of its stale time, in [0.05 s, 60 s]."""
    return min(60.0, max(0.05, stale_after_s / 10.0))


def stale_after(value: float | None = None) -> float:
    """The stale time: `value`, else $GENBENCH_LEASE_STALE_S, else 10 minutes."""
    if value is None:
        env = os.environ.get(STALE_ENV)
        if env:
            try:
                value = float(env)
            except ValueError:
                from genbench.errors import UserError

                raise UserError(f"${STALE_ENV}={env!r} is not a number of seconds") from None
        else:
            value = DEFAULT_STALE_S
    if not value > 0 or value == float("inf"):
        from genbench.errors import UserError

        raise UserError(f"the lease stale time must be a positive number of seconds, got {value}")
    return float(value)


def _pidns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


HOST = socket.gethostname()


def is_lease_file(name: str) -> bool:
    return name == LEASE_FILE or (name.startswith(SUCCESSOR_PREFIX) and name.endswith(".json"))


def _successor(run_dir: Path, token: str) -> Path:
    return Path(run_dir) / f"{SUCCESSOR_PREFIX}{token}.json"


@dataclass
class Holder:
    """What a lease file says, plus where it lies and when it was last touched."""
    token: str
    host: str = "?"
    pid: int = 0
    pidns: str | None = None
    state: str = "running"
    since: float = 0.0
    who: str = "?"
    job: dict | None = None
    heartbeat_s: float = 60.0
    run: str = ""
    version: int = LEASE_VERSION
    path: Path | None = None          # not in the file
    mtime: float = 0.0                # not in the file

    def to_json(self) -> bytes:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("path", "mtime")}
        return (json.dumps(d, indent=1) + "\n").encode()

    @classmethod
    def read(cls, path: Path) -> "Holder":
        """FileNotFoundError when the file is gone; a holder of unknown identity when it is unreadable."""
        st = os.stat(path)
        try:
            with open(path, "rb") as f:
                d = json.loads(f.read().decode())
            known = {f.name for f in dataclasses.fields(cls)} - {"path", "mtime"}
            h = cls(**{k: v for k, v in d.items() if k in known})
            if not isinstance(h.token, str) or not h.token:
                raise ValueError("no token")
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError):
            # Half written (a file system without hard links) or damaged: a holder nobody can name; it
            # goes stale by its mtime like any other.
            h = cls(token=f"unreadable-{st.st_dev}-{st.st_ino}", heartbeat_s=0.0)
        h.path, h.mtime = Path(path), st.st_mtime
        return h

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since)) if self.since else "?"
        if self.state != "running":      # placed for a submitted job: no heartbeat until it starts
            return f"{self.host} pid {self.pid} ({self.who}, {self.state}) since {since}"
        return (f"{self.host} pid {self.pid} ({self.who}) since {since}, "
                f"last heartbeat {max(0.0, now - self.mtime):.0f} s ago")

    @property
    def is_here(self) -> bool:
        return self.host == HOST and self.pidns == _pidns()


def _pid_gone(pid: int) -> bool:
    """True when no process `pid` runs on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


# engine name -> "module:function" deciding whether a submitted job still lives (True / False / None unknown)
JOB_PROBES = {"submitit": "genbench.executors.submitit_executor:job_alive"}


def _job_alive(job: dict | None) -> bool | None:
    if not job or not isinstance(job, dict):
        return None
    target = JOB_PROBES.get(job.get("engine"))
    if target is None:
        return None
    import importlib

    mod, fn = target.split(":")
    try:
        return getattr(importlib.import_module(mod), fn)(job)
    except Exception:  # noqa: BLE001 - an engine we cannot ask: unknown, the lease holds
        return None


def staleness(h: Holder, stale_after_s: float, now: float | None = None) -> str | None:
    """Why holder `h` may be taken over (a few words), or None while it holds."""
    now = time.time() if now is None else now
    if h.state in ("queued", "requeued") and h.job:
        if _job_alive(h.job) is False:
            return f"its job {h.job.get('job_id')} has ended"
        return None
    if h.is_here and _pid_gone(h.pid):
        return f"process {h.pid} is gone"
    limit = max(stale_after_s, 3.0 * float(h.heartbeat_s or 0.0))
    silent = now - h.mtime
    if silent > limit:
        return f"no heartbeat for {silent:.0f} s (stale after {limit:.0f} s)"
    return None


def current(run_dir: Path) -> Holder | None:
    """The holder at the end of the chain from lease.json, or None when no lease exists.
    Raises FileNotFoundError when the chain changes under the reader (the caller starts over)."""
    root = Path(run_dir) / LEASE_FILE
    try:
        h = Holder.read(root)
    except FileNotFoundError:
        return None
    seen = {h.token}
    while True:
        nxt = _successor(run_dir, h.token)
        try:
            h = Holder.read(nxt)
        except FileNotFoundError:
            if not root.exists():
                raise
            return h
        if h.token in seen:   # a loop is no valid chain: someone wrote by hand
            return h
        seen.add(h.token)


def _link_new(path: Path, data: bytes) -> bool:
    """Create `path` holding `data`, atomically and only if it does not exist; False when it does."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lease-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        # No hard links here: exclusive create, then write (a reader may see it empty for a moment).
        try:
            fd2 = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd2, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _replace(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".lease-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Lease:
    """A lease this process holds. Use as a context manager: the heartbeat runs inside, and the lease is
    released at the end unless it was lost, or suspended for a requeue (then it stays for the job)."""

    def __init__(self, run_dir: Path, me: Holder, path: Path, stale_after_s: float,
                 took_over: Holder | None = None, why: str | None = None, readopted: bool = False):
        self.run_dir, self.me, self.path = Path(run_dir), me, Path(path)
        self.stale_after_s = stale_after_s
        self.took_over, self.why, self.readopted = took_over, why, readopted
        self.lost: Holder | None | bool = False   # the new holder once lost (True when unknown)
        self.released = False
        self.suspended = False
        self.interrupted = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._main = threading.current_thread() is threading.main_thread()
        self.on_lost: Callable[["Lease"], None] | None = None
        self._sigint_before: tuple | None = None   # (the SIGINT handler to put back,) while ours is in place

    @property
    def token(self) -> str:
        return self.me.token

    # ---- keeping it

    def held(self) -> bool:
        """Still ours: no successor names our token, and our file is there and still names this process."""
        if _successor(self.run_dir, self.token).exists():
            return False
        try:
            h = Holder.read(self.path)
        except FileNotFoundError:
            return False
        return h.token == self.token and h.pid == self.me.pid

    def renew(self) -> bool:
        with self._lock:
            if self.released or self.lost:
                return False
            if not self.held():
                self._mark_lost()
                return False
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self._mark_lost()
                return False
            return True

    def _mark_lost(self) -> None:
        try:
            self.lost = current(self.run_dir) or True
        except FileNotFoundError:
            self.lost = True
        if self.on_lost is not None:
            self.on_lost(self)
        elif self._main and not self.suspended and not self._stop.is_set():
            self.interrupted = True
            _thread.interrupt_main()   # stop the duplicate work in the main thread

    def _beat(self) -> None:
        while not self._stop.wait(self.me.heartbeat_s):
            if not self.renew():
                return

    def start_heartbeat(self) -> "Lease":
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.me.run}", daemon=True)
            self._thread.start()
        return self

    def stop_heartbeat(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5.0)

    def update(self, **fields) -> None:
        """Rewrite our file with these fields changed (state, who, job)."""
        with self._lock:
            if self.released or self.lost:
                return
            self.me = dataclasses.replace(self.me, **fields)
            _replace(self.path, self.me.to_json())

    def suspend(self, state: str = "requeued") -> None:
        """Stop the heartbeat and leave the lease for the same token's next incarnation (a requeued job)."""
        self.suspended = True
        self.stop_heartbeat()
        try:
            self.update(state=state)
        except OSError:
            pass

    # ---- giving it back

    def release(self) -> None:
        """Remove the whole chain, when it is still ours (never a new holder's files)."""
        self.stop_heartbeat()            # outside the lock: the heartbeat may be waiting for it
        with self._lock:
            if self.released:
                return
            self.released = True
            if self.lost or not self.held():
                return
            root = self.run_dir / LEASE_FILE
            try:
                root.unlink()
            except FileNotFoundError:
                pass
            for p in self.run_dir.glob(f"{SUCCESSOR_PREFIX}*.json"):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    def _own_sigint(self) -> None:
        """A lost lease stops the main thread through interrupt_main(), which does nothing when SIGINT is
        not handled by Python: a process started in the background by a shell without job control
        (`cmd &` in a script, nohup) inherits SIGINT ignored. Inside the lease a handler raises for a lost
        lease; an ignored Ctrl-C stays ignored, and any other one raises KeyboardInterrupt as Python's own
        handler does. The handler that was there is put back when the lease ends."""
        if not self._main:
            return
        before = signal.getsignal(signal.SIGINT)
        if callable(before):
            return                   # Python's default_int_handler or the caller's own: interrupt_main works
        self._sigint_before = (before,)

        def on_sigint(signum, frame):
            if self.interrupted or before != signal.SIG_IGN:
                raise KeyboardInterrupt
        signal.signal(signal.SIGINT, on_sigint)

    def _restore_sigint(self) -> None:
        if self._sigint_before is not None:
            before = self._sigint_before[0]
            signal.signal(signal.SIGINT, before if before is not None else signal.SIG_DFL)
            self._sigint_before = None

    def __enter__(self) -> "Lease":
        self._own_sigint()
        return self.start_heartbeat()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.suspended and exc_type is not None and issubclass(exc_type, SystemExit):
                self.stop_heartbeat()     # requeued: the next incarnation takes it back by its token
                return
            self.release()
        finally:
            self._restore_sigint()


def acquire(run_dir: Path, *, stale_after_s: float | None = None, token: str | None = None, who: str = "genbench run",
            state: str = "running", job: dict | None = None, run: str = "", wait_own: bool = False,
            poll_s: float | None = None) -> Lease | Holder:
    """Take the run's lease: a Lease when this process now holds it, else the live Holder.

    A stale holder is taken over (Lease.took_over says whom, Lease.why why). With `token` the claimant
    is that token's next incarnation: it takes the lease back from a holder of the same token that is
    queued, requeued, gone or stale; with `wait_own` it waits for such a holder to go stale rather than
    give up (a retried task whose previous process may not be dead yet)."""
    if state not in STATES:
        raise ValueError(f"lease state {state!r} is not one of {STATES}")
    stale_s = stale_after(stale_after_s)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    token = token or new_token()
    me = Holder(token=token, host=HOST, pid=os.getpid(), pidns=_pidns(), state=state, since=time.time(), who=who,
                job=job, heartbeat_s=heartbeat_for(stale_s), run=run)
    poll = poll_s if poll_s is not None else min(5.0, max(0.05, stale_s / 20.0))
    deadline = None
    while True:
        try:
            cur = current(run_dir)
        except FileNotFoundError:
            continue   # the chain was released under us: look again
        if cur is None:
            path = run_dir / LEASE_FILE
            if _link_new(path, me.to_json()):
                lease = _confirmed(run_dir, me, path, stale_s)
                if lease is not None:
                    return lease
            continue   # lost the race for lease.json (or the chain moved): look again
        now = time.time()
        why = staleness(cur, stale_s, now)
        if cur.token == token:
            mine_back = cur.state in ("queued", "requeued") or why is not None or \
                (cur.is_here and cur.pid == os.getpid())
            if mine_back:
                me = dataclasses.replace(me, since=cur.since or me.since)
                try:
                    _replace(cur.path, me.to_json())
                except FileNotFoundError:
                    continue
                lease = _confirmed(run_dir, me, cur.path, stale_s, readopted=True)
                if lease is not None:
                    lease.took_over, lease.why = cur, why
                    return lease
                continue
            if wait_own:
                if deadline is None:
                    deadline = now + max(stale_s, 3.0 * cur.heartbeat_s) + 10 * poll + 5.0
                if now < deadline:
                    time.sleep(poll)
                    continue
            return cur
        if why is None:
            return cur
        path = _successor(run_dir, cur.token)
        if _link_new(path, me.to_json()):
            lease = _confirmed(run_dir, me, path, stale_s)
            if lease is not None:
                lease.took_over, lease.why = cur, why
                return lease
            try:
                path.unlink()   # an orphan: the chain was released meanwhile
            except FileNotFoundError:
                pass
        # another taker won (or the chain moved): look again; the winner is live now


def _confirmed(run_dir: Path, me: Holder, path: Path, stale_s: float, readopted: bool = False) -> Lease | None:
    """A Lease when the chain from lease.json ends at our file with our token, else None."""
    try:
        cur = current(run_dir)
    except FileNotFoundError:
        return None
    if cur is None or cur.token != me.token or cur.path != Path(path) or cur.pid != me.pid:
        return None
    return Lease(run_dir, me, path, stale_s, readopted=readopted)


def holder(run_dir: Path) -> Holder | None:
    """The current holder, whatever its state (None when free)."""
    for _ in range(5):
        try:
            return current(run_dir)
        except FileNotFoundError:
            continue
    return None
