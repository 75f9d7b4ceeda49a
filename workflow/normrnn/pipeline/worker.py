"""A fork server for the jobs of one local workflow run: torch imported once, a child per job.

A job's own process spends seconds importing torch (and, at its optimizer's first step,
torch._dynamo) before it trains: more than a toy run's training. With a worker serving the
working directory, a job's script (``run_job``) sends its ``snakemake`` object over a Unix
socket and the worker forks a child that has everything imported already; the child runs the
job (logging to the job's log as ever) and its exit status becomes the script's. Snakemake
still sees one job per run, with its outputs, logs and benchmarks.

The Snakefile starts a worker where jobs run on this machine (``onstart``; never for a cluster
executor or conda environments) and stops it at the end; it also stops when the Snakemake
process is gone and no job runs, or after ``idle`` seconds without a job. Without a worker,
or if it cannot be reached, a job runs in its own process as before (``NORMRNN_WORKER=0``
forces that). A signal to the job's script (SIGTERM, SIGUSR1, SIGINT) is passed to the child,
which checkpoints and exits as a job does; if the script dies, the worker sends its child
SIGTERM. The worker never runs a tensor operation itself, so no thread pool or GPU context is
forked into a child.
"""

from __future__ import annotations

import argparse
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

SOCKET = Path(".snakemake") / "normrnn-worker.sock"
# The jobs the worker runs; the others (downloads, and the benchmark, which times in a
# process of its own) always run in their script's process.
FORKED = ("train", "prepare", "tables", "plots", "figure", "summary", "claims")
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _send(conn: socket.socket, obj) -> None:
    data = pickle.dumps(obj)
    conn.sendall(struct.pack("!Q", len(data)) + data)


def _recv(conn: socket.socket):
    head = _exactly(conn, 8)
    return None if head is None else pickle.loads(_exactly(conn, struct.unpack("!Q", head)[0]))


def _exactly(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


# ----------------------------------------------------------------------------- the job's side
def run_job(name: str, smk) -> None:
    """Run ``normrnn.pipeline.jobs.<name>_job(smk)``: in a child of the worker serving the working
    directory, or in this process where there is none."""
    if name in FORKED and os.environ.get("NORMRNN_WORKER", "1") != "0" and SOCKET.exists():
        status = _through_worker(name, smk)
        if status is not None:
            if status:
                sys.exit(status)
            return
    from . import jobs

    getattr(jobs, f"{name}_job")(smk)


def _through_worker(name: str, smk) -> int | None:
    """The child's exit status, or None where no worker answered (run here instead)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(SOCKET))
        _send(conn, (name, smk, os.getcwd()))
        pid = _recv(conn)
    except (OSError, pickle.PicklingError):
        conn.close()
        return None
    if pid is None:
        return None
    old = {s: signal.signal(s, lambda signum, frame: _forward(pid, signum)) for s in FORWARDED}
    try:
        status = _recv(conn)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        conn.close()
    return 1 if status is None else status  # (the worker died: the job failed)


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------- the worker
def preload() -> None:
    """What every job imports, imported once: torch, torch._dynamo (imported by an
    optimizer's first step), the package's modules and snakemake's job object."""
    import snakemake.script  # noqa: F401  (unpickling a job's snakemake object)
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401

    from . import evaluation, jobs, training  # noqa: F401


def serve(path: Path, parent: int | None = None, idle: float = 600.0) -> None:
    """Accept jobs on ``path`` until stopped, ``parent`` is gone or ``idle`` seconds pass
    without a job (never while a child runs)."""
    preload()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(64)
    children: dict[int, socket.socket] = {}  # child pid -> its job's connection
    last = time.monotonic()
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda s, f: stop.update(now=True))
    try:
        while not (stop["now"] and not children):
            ready, _, _ = select.select([server, *children.values()], [], [], 0.5)
            for conn in ready:
                if conn is server:
                    if _accept(server, children) == "stop":
                        stop["now"] = True
                elif _closed(conn):  # the job's script is gone: stop its child
                    _forward(next(p for p, c in children.items() if c is conn), signal.SIGTERM)
            _reap(children)
            if children:
                last = time.monotonic()
            elif (parent and not _alive(parent)) or time.monotonic() - last > idle:
                break
    finally:
        server.close()
        path.unlink(missing_ok=True)


def _closed(conn: socket.socket) -> bool:
    try:
        return not conn.recv(1, socket.MSG_PEEK)
    except OSError:
        return True


def _accept(server: socket.socket, children: dict) -> str | None:
    """Take one request: a job (forked to a child), ``stop``, or a probe (nothing)."""
    conn, _ = server.accept()
    try:
        request = _recv(conn)
    except OSError:
        request = None
    if request is None or request[0] == "stop":
        conn.close()
        return None if request is None else "stop"
    name, smk, cwd = request
    pid = os.fork()
    if pid == 0:  # the child: run the job, then leave without the parent's cleanup
        status = 1
        try:
            server.close()
            for other in children.values():
                other.close()
            for s in (*FORWARDED, signal.SIGCHLD):
                signal.signal(s, signal.SIG_DFL)
            os.chdir(cwd)
            from . import jobs

            getattr(jobs, f"{name}_job")(smk)
            status = 0
        except SystemExit as e:  # (a checkpoint on SIGTERM exits with 143)
            status = e.code if isinstance(e.code, int) else 1
        except BaseException:  # the traceback is in the job's log (jobs.logged)
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    children[pid] = conn
    try:
        _send(conn, pid)
    except OSError:  # the script is gone already: _closed stops the child
        pass
    return None


def _reap(children: dict) -> None:
    for pid in list(children):
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            conn = children.pop(pid)
            status = os.waitstatus_to_exitcode(code)
            try:
                _send(conn, status if status >= 0 else 128 - status)
            except OSError:
                pass
            conn.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- the Snakefile's
def start(workdir: Path, package_dir: Path, wait: float = 60.0) -> subprocess.Popen | None:
    """Start a worker for ``workdir`` (from the Snakefile's ``onstart``) and wait until it
    listens; None where one already does."""
    path = Path(workdir) / SOCKET
    if path.exists() and _answers(path):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    paths = [str(Path(package_dir).parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    log = open(path.with_suffix(".log"), "a")  # noqa: SIM115  (the worker's own output)
    proc = subprocess.Popen(
        [sys.executable, "-m", "normrnn.pipeline.worker", "--socket", str(path), "--parent",
         str(os.getpid())],
        cwd=workdir, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and _answers(path):
            return proc
        time.sleep(0.1)
    return proc


def stop(workdir: Path) -> None:
    """Ask the worker of ``workdir`` to exit once its jobs are done (the Snakefile's
    ``onsuccess`` and ``onerror``)."""
    path = Path(workdir) / SOCKET
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        _send(conn, ("stop", None, None))
    except OSError:
        pass
    finally:
        conn.close()


def _answers(path: Path) -> bool:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        conn.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="the pipeline's job worker (a fork server)")
    parser.add_argument("--socket", type=Path, default=SOCKET)
    parser.add_argument("--parent", type=int, help="exit when this process is gone")
    parser.add_argument("--idle", type=float, default=600.0)
    args = parser.parse_args(argv)
    serve(args.socket, args.parent, args.idle)


if __name__ == "__main__":
    main()
