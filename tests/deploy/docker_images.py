"""The images the Docker tests need, built here and cached, since Docker Hub is out of reach.

- **Stand-ins for the official base images** (`python:3.11-slim-bookworm`, `redis:7.4-bookworm`,
  `mher/flower:2.0.1`): one Debian bookworm root file system made with `debootstrap` (Debian's
  own python3, its venv module and redis-server) and imported twice, each with the command,
  working directory and entrypoint of the image it stands in for. The Redis stand-in's
  entrypoint does what the official image's does: without a configuration file, it turns
  protected mode off so that the other containers may connect. Flower's is the Python stand-in
  with Flower installed. They are tagged `cnnserve-standin/...:<key>`, where the key is a hash
  of the recipe, and kept in the engine: a later run reuses them.
- **A wheelhouse**: every wheel the image installs, fetched once by this machine's pip (its own
  indexes and certificates) into `~/.cache/cnnserve/wheelhouse/<key>` (the key: a hash of the
  requirements), and served as a package index on 127.0.0.1 while a build runs with
  `--network host`. Only the current key's wheelhouse is kept.
- **The cnnserve image** from the project's own Dockerfile, with the stand-in base image and the
  wheelhouse as its build arguments (the same arguments a user behind a firewall passes).

`python -m tests.deploy.docker_images` builds all of them ahead of a test run.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("CNNSERVE_DOCKER_CACHE", Path.home() / ".cache" / "cnnserve"))
MIRROR = os.environ.get("CNNSERVE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
STANDIN_PACKAGES = ("python3", "python3-venv", "ca-certificates", "redis-server")
FLOWER_REQUIREMENT = "flower==2.0.1"
#: Labels the images these tests make, so that cleaning up touches nothing else.
LABEL = "org.cnnserve.test=1"

# The official redis image's entrypoint, in the part that matters to compose: an option as the
# first argument means redis-server; without a config file that sets it, protected mode is off
# (Debian's redis-server otherwise refuses connections from other containers).
REDIS_ENTRYPOINT = """#!/bin/sh
# Stand-in for the official redis image's docker-entrypoint.sh (cnnserve's Docker tests).
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
  set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
  protected=1
  if [ -f "${2:-}" ] && grep -q '^protected-mode' "$2"; then
    protected=
  fi
  if [ -n "$protected" ]; then
    set -- "$@" --protected-mode no
  fi
fi
exec "$@"
"""

FLOWER_DOCKERFILE = """ARG BASE
FROM ${BASE}
ARG PIP_INDEX_URL
# as the official image: Flower, and the Redis client its broker URL needs
RUN python3 -m venv /opt/flower \\
    && /opt/flower/bin/pip install --no-cache-dir REQUIREMENT redis packaging \\
    && useradd --system --uid 10002 flower && mkdir -p /data && chown flower /data
ENV PATH=/opt/flower/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /data
USER flower
EXPOSE 5555
CMD ["celery", "flower"]
"""


class ImageBuildError(RuntimeError):
    """A stand-in, the wheelhouse or the image could not be made; the message says why."""


@dataclass(frozen=True)
class Images:
    """Tags of the images a compose run uses, and what building the cnnserve image cost."""

    python: str
    redis: str
    flower: str
    cnnserve: str
    build_seconds: float


def docker(
    *args: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the docker client; on failure raise with its output."""
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise ImageBuildError(
            f"docker {' '.join(args[:3])} ... failed ({done.returncode}):\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False, timeout=60).returncode == 0


def _key(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def requirements() -> list[str]:
    """What the image installs: pyproject's dependencies and build requirements, and wheel."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [
        *project["project"]["dependencies"],
        *project["build-system"]["requires"],
        "wheel",
    ]


# --- stand-in base images ---------------------------------------------------------------------


def standin_key() -> str:
    return _key(SUITE, MIRROR, " ".join(STANDIN_PACKAGES), REDIS_ENTRYPOINT, "v1")


def standin_tags() -> tuple[str, str]:
    key = standin_key()
    return f"cnnserve-standin/python:{SUITE}-{key}", f"cnnserve-standin/redis:{SUITE}-{key}"


def ensure_standin_bases() -> tuple[str, str]:
    """The Python and Redis stand-ins, made with debootstrap unless the engine has them."""
    python, redis = standin_tags()
    if image_exists(python) and image_exists(redis):
        return python, redis
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is not installed (apt-get install debootstrap)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cnnserve-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(STANDIN_PACKAGES)}",
             SUITE, str(rootfs), MIRROR],
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            output = done.stdout[-3000:] + done.stderr[-2000:]
            raise ImageBuildError(f"debootstrap failed:\n{output}")
        # what the slim images leave out: apt lists and caches, docs
        for junk in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
        entrypoint = rootfs / "usr/local/bin/docker-entrypoint.sh"
        entrypoint.write_text(REDIS_ENTRYPOINT)
        entrypoint.chmod(0o755)
        (rootfs / "data").mkdir(exist_ok=True)
        tarball = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        common = ["--change", "ENV LANG=C.UTF-8", "--change", f"ENV PATH={path}"]
        docker("import", *common, "--change", 'CMD ["python3"]',
               "--change", f"LABEL {LABEL}", str(tarball), python)  # fmt: skip
        docker("import", *common, "--change", "WORKDIR /data",
               "--change", 'ENTRYPOINT ["docker-entrypoint.sh"]',
               "--change", 'CMD ["redis-server"]', "--change", "EXPOSE 6379",
               "--change", f"LABEL {LABEL}", str(tarball), redis)  # fmt: skip
    log.info("stand-in base images made in %.0f s", time.monotonic() - started)
    return python, redis


# --- the wheelhouse -----------------------------------------------------------------------------


def python_version(image: str) -> str:
    """The full version of the Python in `image` (markers such as redis-py's depend on it)."""
    done = docker("run", "--rm", "--network", "none", image, "python3", "-c",
                  "import platform; print(platform.python_version())")  # fmt: skip
    return done.stdout.strip()


def ensure_wheelhouse(version: str) -> Path:
    """Every wheel the images install for Python `version`, as a PEP 503 index (`simple/`)."""
    home = CACHE / "wheelhouse"
    here = home / _key(*requirements(), FLOWER_REQUIREMENT, version)
    if (here / "simple" / "index.html").exists():
        return here
    # one wheelhouse at a time: the old ones are gigabytes
    if home.exists():
        for old in home.iterdir():
            shutil.rmtree(old, ignore_errors=True)
    files = here / "files"
    files.mkdir(parents=True)
    req = here / "requirements.txt"
    req.write_text("\n".join([*requirements(), FLOWER_REQUIREMENT]) + "\n")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
         "--python-version", version, "--dest", str(files), "-r", str(req)],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        shutil.rmtree(here, ignore_errors=True)
        raise ImageBuildError(f"pip download failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    # pip evaluates environment markers with this interpreter, whatever --python-version says:
    # fetch what the image's Python needs beyond that (e.g. redis-py's async-timeout, below
    # Python 3.11.3), and what those need, until nothing is missing
    for _ in range(5):
        missing = missing_for(files, version)
        if not missing:
            break
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
             "--python-version", version, "--dest", str(files), *missing],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            shutil.rmtree(here, ignore_errors=True)
            raise ImageBuildError(f"pip download {missing} failed:\n{done.stderr[-3000:]}")
    write_simple_index(files, here / "simple")
    log.info("wheelhouse of %s made in %.0f s", files, time.monotonic() - started)
    return here


def missing_for(files: Path, version: str) -> list[str]:
    """Requirements of the wheels in `files` that hold for Python `version` (not for this
    interpreter, whose markers pip used) and that no wheel there satisfies."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    host = default_environment()
    target = dict(host, python_full_version=version, python_version=version.rpartition(".")[0])
    have = {_project_name(w.name) for w in files.glob("*.whl")}
    missing = set()
    for wheel in files.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = archive.read(name).decode(errors="replace")
        for line in metadata.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.partition(":")[2].strip())
            if req.marker is None or "extra" in str(req.marker):
                continue
            there = req.marker.evaluate(dict(target, extra=""))
            here = req.marker.evaluate(dict(host, extra=""))
            if there and not here and _project_name(req.name) not in have:
                missing.add(f"{req.name}{req.specifier}")
    return sorted(missing)


def _project_name(wheel: str) -> str:
    return re.sub(r"[-_.]+", "-", wheel.split("-", 1)[0]).lower()


def write_simple_index(files: Path, simple: Path) -> None:
    """A PEP 503 simple index over the wheels in `files` (links relative, hashes included)."""
    projects: dict[str, list[Path]] = {}
    for wheel in sorted(files.glob("*.whl")):
        projects.setdefault(_project_name(wheel.name), []).append(wheel)
    for name, wheels in projects.items():
        page = simple / name
        page.mkdir(parents=True, exist_ok=True)
        links = []
        for wheel in wheels:
            sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
            links.append(f'<a href="../../files/{wheel.name}#sha256={sha}">{wheel.name}</a>')
        page.joinpath("index.html").write_text(_page(links))
    (simple / "index.html").write_text(
        _page([f'<a href="{name}/">{name}</a>' for name in sorted(projects)])
    )


def _page(links: list[str]) -> str:
    return "<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


#: The wheelhouse's port, when free: its URL is a build argument, and a build argument that
#: changed rebuilds the dependency layer (minutes), so it should be the same every time.
WHEELHOUSE_PORTS = range(38623, 38643)


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve `directory` on 127.0.0.1 (the first free port of `WHEELHOUSE_PORTS`, else any)
    while the block runs; yields its URL."""
    handler = partial(_QuietHandler, directory=str(directory))
    server = None
    for port in [*WHEELHOUSE_PORTS, 0]:
        try:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
            break
        except OSError:
            continue
    assert server is not None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- the images -----------------------------------------------------------------------------------


def build(tag: str, context: Path, *args: str, log_path: Path | None = None) -> float:
    """`docker build --network host` (the bridge cannot reach the registries here); seconds."""
    started = time.monotonic()
    cmd = ["docker", "build", "--network", "host", "--force-rm", "--label", LABEL, "-t", tag,
           *args, str(context)]  # fmt: skip
    env = dict(os.environ, DOCKER_BUILDKIT="0")  # the classic builder: no frontend to pull
    with open(log_path or os.devnull, "w") as out:
        done = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=1800, check=False
        )
    if done.returncode != 0:
        tail = log_path.read_text()[-4000:] if log_path else ""
        raise ImageBuildError(f"docker build of {tag} failed ({done.returncode}):\n{tail}")
    return time.monotonic() - started


def flower_tag(python: str) -> str:
    return f"cnnserve-standin/flower:{_key(python, FLOWER_REQUIREMENT, FLOWER_DOCKERFILE)}"


def ensure_flower(python: str, index: str, log_dir: Path) -> str:
    tag = flower_tag(python)
    if image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="cnnserve-flower-") as tmp:
        dockerfile = FLOWER_DOCKERFILE.replace("REQUIREMENT", FLOWER_REQUIREMENT)
        Path(tmp, "Dockerfile").write_text(dockerfile)
        build(tag, Path(tmp), "--build-arg", f"BASE={python}",
              "--build-arg", f"PIP_INDEX_URL={index}/simple/",
              log_path=log_dir / "flower-build.log")  # fmt: skip
    return tag


def ensure_images(tag: str = "cnnserve-e2e:latest", log_dir: Path | None = None) -> Images:
    """Every image the compose test runs, built (or found cached) here."""
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="cnnserve-docker-logs-"))
    python, redis = ensure_standin_bases()
    wheels = ensure_wheelhouse(python_version(python))
    with serve(wheels) as url:
        flower = ensure_flower(python, url, log_dir)
        seconds = build(tag, ROOT, "--build-arg", f"PYTHON_IMAGE={python}",
                        "--build-arg", f"PIP_INDEX_URL={url}/simple/",
                        log_path=log_dir / "cnnserve-build.log")  # fmt: skip
    return Images(python=python, redis=redis, flower=flower, cnnserve=tag, build_seconds=seconds)


def prune() -> None:
    """Remove this suite's untagged images (old builds) and stand-ins of another recipe."""
    keep = {*standin_tags(), flower_tag(standin_tags()[0])}
    listed = docker(
        "image", "ls", "--filter", f"label={LABEL}", "--format", "{{.Repository}}:{{.Tag}}"
    )
    for tag in listed.stdout.split():
        if tag.startswith("cnnserve-standin/") and tag not in keep:
            docker("image", "rm", tag, check=False)
    docker("image", "prune", "-f", "--filter", f"label={LABEL}", check=False)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    images = ensure_images(log_dir=Path(tempfile.mkdtemp(prefix="cnnserve-docker-logs-")))
    prune()
    print(images)
