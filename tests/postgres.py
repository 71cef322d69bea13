"""A throwaway PostgreSQL cluster on 127.0.0.1, for tests (the ``postgres`` fixture in conftest.py)
and benchmarks/storage_latency.py.

``initdb`` makes a cluster in a fresh temporary folder, ``pg_ctl`` starts it on a free port with trust
authentication for the role ``bench`` (no password) and without fsync, and stops it (then the folder is
removed) when the ``with`` block ends, whatever happened inside. PostgreSQL refuses to run as root:
as root, its programs run as the ``postgres`` user (``runuser``) on a folder handed to that user.

    with throwaway_cluster() as pg:
        url = pg.create_database()   # postgresql://bench@127.0.0.1:PORT/db1, empty
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROLE = "bench"  # the superuser role initdb creates; clients connect as it without a password
SEARCH = "/usr/lib/postgresql/*/bin"  # Debian and Ubuntu install the server programs here, off PATH
COMMAND_TIMEOUT_S = 60  # initdb, pg_ctl start/stop, CREATE DATABASE


def runuser() -> str | None:
    """util-linux's runuser, which root's PATH has but a trimmed PATH may lack."""
    return shutil.which("runuser") or next((p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)),
                                            None)


def server_binaries() -> tuple[Path | None, str]:
    """The folder holding ``initdb`` and ``pg_ctl`` (PATH first, then the newest Debian version), or
    (None, why not)."""
    initdb = shutil.which("initdb")
    if initdb and Path(initdb).resolve().with_name("pg_ctl").is_file():
        return Path(initdb).resolve().parent, ""
    found = sorted(glob.glob(SEARCH), key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0)
    for folder in reversed(found):
        if Path(folder, "initdb").is_file() and Path(folder, "pg_ctl").is_file():
            return Path(folder), ""
    return None, (f"no PostgreSQL server programs (initdb, pg_ctl) in PATH or {SEARCH}; "
                  "install Debian's postgresql package to run these tests")


def unavailable() -> str:
    """Why a throwaway cluster cannot be started here ('' when it can)."""
    folder, why = server_binaries()
    if folder is None:
        return why
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and PostgreSQL refuses root, but there is no 'postgres' user to run it as"
        if runuser() is None:
            return "running as root without runuser (util-linux) to start PostgreSQL as the 'postgres' user"
    try:
        import psycopg  # noqa: F401 - the driver SQLAlchemy uses for postgresql:// URLs
    except ImportError:
        return "the psycopg driver is not installed"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A running cluster: ``url(database)``, ``create_database()``, ``connections()``."""

    def __init__(self, root: Path, port: int, bin_dir: Path):
        self.root, self.port, self.bin_dir = root, port, bin_dir
        self.data = root / "data"
        self._databases = 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        """One of the server's programs, as ``postgres`` when we are root; its output in the error on failure."""
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = [runuser(), "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, cwd=self.root)
        if done.returncode != 0:
            log = (self.root / "log").read_text()[-2000:] if (self.root / "log").is_file() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}{done.stderr}{log}")

    def start(self, max_connections: int) -> None:
        self._run("initdb", "-D", str(self.data), "-U", ROLE, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections={max_connections} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", str(COMMAND_TIMEOUT_S),
                  "-o", options, "start")

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are ended); failing that, kill the postmaster."""
        if not (self.data / "postmaster.pid").is_file():
            return
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pid_file = self.data / "postmaster.pid"
            if pid_file.is_file():
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)  # immediate shutdown of all backends
                time.sleep(1)

    def execute(self, sql: str, database: str = "postgres", params: tuple = ()) -> list[tuple]:
        """Run one statement (``%s`` placeholders for ``params``) in autocommit mode, as CREATE DATABASE
        needs; its rows."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=ROLE, dbname=database, autocommit=True,
                             connect_timeout=10) as conn:
            cur = conn.execute(sql, params or None)
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (``db1``, ``db2``… unless named); its SQLAlchemy URL."""
        if name is None:
            self._databases += 1
            name = f"db{self._databases}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def connections(self) -> int:
        """Client sessions open on the server now (the one asking excluded)."""
        [(n,)] = self.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                              "AND pid <> pg_backend_pid()")
        return int(n)


@contextmanager
def throwaway_cluster(max_connections: int = 300) -> Iterator[Cluster]:
    """Start a cluster in a new temporary folder on a free 127.0.0.1 port; stop it and remove the folder
    at the end of the block, also when starting it or the block failed. Raises RuntimeError with the
    reason when it cannot start (see :func:`unavailable`)."""
    why = unavailable()
    if why:
        raise RuntimeError(why)
    bin_dir, _ = server_binaries()
    # /tmp rather than pytest's folder: the postgres user must reach it, and the socket path must be short
    root = Path(tempfile.mkdtemp(prefix="elbo-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    cluster = Cluster(root, free_port(), bin_dir)
    try:
        cluster.start(max_connections)
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
