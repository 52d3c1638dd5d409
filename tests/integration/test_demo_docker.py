"""The container stack, built and run for real with podman (`make test-docker`).

Builds docker/Dockerfile, then runs (1) the entry point alone and (2) the services of
docker/compose.yaml as a podman pod with the same ports, volumes, commands and security options,
and checks the jailed demo page on 127.0.0.1 and a clean stop on TERM. Slow: minutes on a cold
cache. Images are kept (they are the build cache); containers, pods and volumes are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from apache_server import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
IMAGE = "localhost/chrootwsgi:test"
BASE = "docker.io/library/debian:12-slim"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Within this kind of host's hard limits; containers get the same from containers.conf below.
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
READY_TIMEOUT = 180.0
BUILD_TIMEOUT = 1800


def podman(
    *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="module", autouse=True)
def podman_settings(tmp_path_factory) -> Iterator[None]:
    """runc and cgroupfs (crun fails on hybrid cgroups) and ulimits within this host's hard limits
    (also for a pod's infra container), through a containers.conf of our own."""
    if shutil.which("podman") is None:
        pytest.fail(
            "podman is not installed: "
            "apt-get install podman runc catatonit debootstrap (.ci/run does)"
        )
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(
        '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
    )
    old = os.environ.get("CONTAINERS_CONF")
    os.environ["CONTAINERS_CONF"] = str(conf)
    yield
    if old is None:
        del os.environ["CONTAINERS_CONF"]
    else:
        os.environ["CONTAINERS_CONF"] = old


def debian_mirror() -> str:
    """The Debian mirror of this machine's apt sources, for debootstrap."""
    sources = [*Path("/etc/apt/sources.list.d").glob("*.sources"), Path("/etc/apt/sources.list")]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text()
        match = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+bookworm\b", text, re.M
        )
        if match:
            return match[1]
    return "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def image(podman_settings, tmp_path_factory) -> str:
    if podman("image", "exists", BASE, check=False).returncode != 0:
        root = tmp_path_factory.mktemp("bookworm")
        bootstrap = subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(root), debian_mirror()],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        assert bootstrap.returncode == 0, bootstrap.stdout[-3000:] + bootstrap.stderr
        with subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE) as tar:
            imported = subprocess.run(
                ["podman", "import", "-", "localhost/chrootwsgi-debian-base:12"],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        assert tar.returncode == 0, "tar of the debootstrap tree failed"
        assert imported.returncode == 0, imported.stderr
        podman("tag", "localhost/chrootwsgi-debian-base:12", BASE)
        shutil.rmtree(root)
    build = ["build", "--network=host", *ULIMITS, "-f", str(DOCKER / "Dockerfile"), "-t", IMAGE]
    if os.path.exists(CA_BUNDLE):
        build += ["--secret", f"id=ca-bundle,src={CA_BUNDLE}"]
    podman(*build, str(REPO), timeout=BUILD_TIMEOUT)
    return IMAGE


def wait_for_page(url: str, containers: list[str]) -> requests.Response:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            return requests.get(url, timeout=15)
        except requests.RequestException:
            time.sleep(0.5)
    logs = "\n".join(podman("logs", name, check=False).stderr for name in containers)
    raise AssertionError(
        f"nothing answered {url} within {READY_TIMEOUT} s (raise READY_TIMEOUT on a slow "
        f"machine); container logs:\n{logs}"
    )


def assert_jailed_page(page: requests.Response) -> None:
    assert page.status_code == 200, page.text
    text = page.text
    assert "<h1>Served from an empty jail</h1>" in text
    listing = text.split("ls / (the jail&#x27;s root)</th><td><pre>")[1].split("</pre>")[0]
    assert not set(listing.split()) & {"bin/", "home/", "root/", "var/", "proc/", "srv/"}
    assert "<pre>33 / 33 / " in text
    assert "<pre>effective 0x0, permitted 0x0</pre>" in text
    assert "demo.chrootwsgi.test -&gt; 192.0.2.80 (asked of 127.0.0.1)" in text
    assert "<pre>www-data:x:33:33::/var/www:/usr/sbin/nologin</pre>" in text
    assert "command through the helper (exec)</th><td><pre>uname -sr -&gt; Linux " in text
    assert "mail through the helper</th><td><pre>queued as " in text


def exit_code(name: str) -> int:
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert not state["Running"], f"{name} still runs"
    return int(state["ExitCode"])


def start_demo_container(name: str, port: int, *security_opts: str) -> None:
    """The image with its default command (helper and Apache), published on 127.0.0.1:port."""
    options = [arg for opt in security_opts for arg in ("--security-opt", opt)]
    podman("run", "-d", "--name", name, *options, "-p", f"127.0.0.1:{port}:8080", IMAGE)


def test_entrypoint_serves_on_the_host_and_stops_on_term(image):
    name, port = f"chrootwsgi-test-{os.getpid()}", free_port()
    start_demo_container(name, port, f"seccomp={DOCKER / 'seccomp.json'}", "no-new-privileges")
    try:
        assert_jailed_page(wait_for_page(f"http://127.0.0.1:{port}/", [name]))
        podman("stop", "--time", "30", name, timeout=120)
        assert exit_code(name) == 0
        logs = podman("logs", name).stderr
        assert "caught SIGTERM, shutting down" in logs
        assert "chroot_helper.server: stopped" in logs  # the helper closed its services
        assert "chrootwsgi-entrypoint: stopped (status 0)" in logs
    finally:
        podman("rm", "-f", "-v", name, check=False)  # -v: its anonymous volumes


def compose_run_args(service: dict, project: str, pod: str) -> list[str]:
    args = ["run", "-d", "--pod", pod]
    for volume in service.get("volumes", []):
        args += ["-v", f"{project}_{volume}"]
    for option in service.get("security_opt", []):
        option = option.removesuffix(":true")
        if option.startswith("seccomp="):
            option = f"seccomp={DOCKER / option.removeprefix('seccomp=')}"
        args += ["--security-opt", option]
    grace = service.get("stop_grace_period", "10s")
    args += ["--stop-timeout", grace.removesuffix("s")]
    return args


def test_compose_services_as_a_pod(image):
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    project, port = f"{compose['name']}-test-{os.getpid()}", free_port()
    services = compose["services"]
    assert services["apache"]["network_mode"] == "service:helper"
    published = [p.replace("${PORT:-8080}", str(port)) for p in services["helper"]["ports"]]
    assert published == [f"127.0.0.1:{port}:8080"]
    names = []
    podman("pod", "create", "--name", project, "-p", published[0])
    try:
        for volume in compose["volumes"]:
            podman("volume", "create", f"{project}_{volume}")
        for service_name in ("helper", "apache"):  # depends_on order
            service = services[service_name]
            name = f"{project}_{service_name}"
            names.append(name)
            podman(
                *compose_run_args(service, project, project),
                "--name",
                name,
                image,
                *service["command"],
            )
        assert_jailed_page(wait_for_page(f"http://127.0.0.1:{port}/", names))
        for name in reversed(names):
            podman("stop", "--time", "30", name, timeout=120)
            assert exit_code(name) == 0, podman("logs", name).stderr
    finally:
        podman("pod", "rm", "-f", project, check=False)
        for volume in compose["volumes"]:
            podman("volume", "rm", "-f", f"{project}_{volume}", check=False)


def test_docker_style_seccomp_fails_closed(image, tmp_path):
    """Why docker/seccomp.json exists: unshare and mount gated on CAP_SYS_ADMIN, as Docker's
    default profile does, leave the worker unjailed, and it answers 503."""
    profile = json.loads((DOCKER / "seccomp.json").read_text())
    profile["syscalls"] = [
        rule
        for rule in profile["syscalls"]
        if not (set(rule["names"]) & {"unshare", "mount"} and not rule.get("includes"))
    ] + [
        {
            "names": ["unshare", "mount"],
            "action": "SCMP_ACT_ALLOW",
            "includes": {"caps": ["CAP_SYS_ADMIN"]},
        }
    ]
    gated = tmp_path / "docker-style.json"
    gated.write_text(json.dumps(profile))
    name, port = f"chrootwsgi-test-gated-{os.getpid()}", free_port()
    start_demo_container(name, port, f"seccomp={gated}")
    try:
        page = wait_for_page(f"http://127.0.0.1:{port}/", [name])
        assert page.status_code == 503
        logs = podman("logs", name).stderr
        assert "not jailed, answering 503 to every request: unshare of a user and mount" in logs
    finally:
        podman("rm", "-f", "-v", name, check=False)  # -v: its anonymous volumes
