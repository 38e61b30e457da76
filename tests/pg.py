"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl on a free port in a temp dir.

The server binaries come from the system (Debian's ``postgresql`` package puts them in
``/usr/lib/postgresql/<version>/bin``, outside PATH); the driver is ``psycopg`` 3 (the
``postgres`` extra; SQLAlchemy 2.1 opens ``postgresql://`` with it). PostgreSQL refuses to run as root, so under root the cluster belongs to
``nobody``, in a temp dir it owns. ``start()`` raises ``Unavailable`` with the reason when any
of that is missing; the fixture turns it into a visible skip (or a failure where
``KRUISING_REQUIRE_POSTGRES=1``, which ``.ci/run`` sets once it has the server).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "kruising"


class Unavailable(Exception):
    """No PostgreSQL server can be started here (the message says why)."""


def find_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: PATH first, then Debian's versioned folders."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = glob.glob("/usr/lib/postgresql/*/bin/initdb") + glob.glob("/usr/pgsql-*/bin/initdb")
    versions.sort(key=lambda p: [int(x) for x in p.split("/") if x.isdigit()] or [0])
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A running cluster; ``database(name)`` makes a fresh database and returns its URL."""

    def __init__(self) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Unavailable(
                "the psycopg driver is missing: pip install -e '.[postgres]'"
            ) from None
        bindir = find_bindir()
        if bindir is None:
            raise Unavailable("no PostgreSQL server (initdb, pg_ctl): apt-get install postgresql")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="kruising-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user: dict = {}
        if os.geteuid() == 0:  # postgres will not run as root
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            self.user = dict(user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
        self.port = 0
        self.running = False
        try:
            self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                      "--no-sync", "-E", "UTF8", "--locale=C")  # fmt: skip
            self._start()
        except Unavailable:
            self.stop()
            raise

    def _run(self, tool: str, *args: str) -> str:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        proc = subprocess.run(
            [str(self.bindir / tool), *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            **self.user,
        )
        if proc.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.is_file() else ""
            raise Unavailable(f"{tool} failed: {(proc.stderr or proc.stdout).strip()} {log}")
        return proc.stdout

    def _start(self) -> None:
        last = None
        for _ in range(3):  # the port may be taken between probing and binding it
            port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -k {self.root} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
            )
            try:
                self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data),
                          "-l", str(self.log), "-o", options)  # fmt: skip
            except Unavailable as exc:
                last = exc
                continue
            self.port, self.running = port, True
            return
        raise last or Unavailable("pg_ctl start failed")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def database(self, name: str) -> str:
        """Create database ``name`` (dropped first if it exists); its URL."""
        import psycopg

        conn = psycopg.connect(self.url(), autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        if self.running:
            try:
                self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", str(self.data))
            except Unavailable:
                pass
            self.running = False
        shutil.rmtree(self.root, ignore_errors=True)
