"""The image, the entrypoint and the compose file, checked with the real tools that exist
without a container engine: hadolint (with ShellCheck inside) for the Dockerfile, ShellCheck
for the scripts, Docker Compose's own loader (compose-go, which validates against the Compose
specification's schema) for deploy/compose.yaml; and what a build would copy is checked
against what the project imports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ROOT

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
COMPOSE = DEPLOY / "compose.yaml"
ROLES = {"migrate", "gateway", "worker", "beat", "simulator", "launch-sglang", "preflight"}


def tool(name: str) -> str:
    """A linter installed with the dev extra, next to this Python (never skipped)."""
    found = Path(sys.executable).parent / name
    if not found.exists():
        found_on_path = shutil.which(name)
        if found_on_path is None:
            pytest.fail(f"{name} is missing: install the dev extra (bash deploy/bootstrap.sh)")
        return found_on_path
    return str(found)


def docker_compose() -> str:
    """Docker Compose's own binary from the compose-go package (its Python wrapper drops the
    exit status, so the binary is called directly)."""
    try:
        import compose
    except ImportError:
        pytest.fail("compose-go is missing: install the dev extra (bash deploy/bootstrap.sh)")
    return str(Path(compose.__file__).parent / "docker-compose")


def run(*command: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                          cwd=ROOT, **kwargs)  # fmt: skip


def test_the_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_passes_checkov() -> None:
    checkov = ROOT / ".venv-checkov" / "bin" / "checkov"
    if not checkov.exists():
        pytest.fail("checkov is missing: bash deploy/test.sh installs it in .venv-checkov/")
    result = run(str(checkov), "-f", str(DOCKERFILE), "--framework", "dockerfile", "--quiet",
                 "--compact", "--skip-download")  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_shell_scripts_pass_shellcheck() -> None:
    scripts = sorted(str(p) for p in DEPLOY.rglob("*.sh"))
    assert str(ENTRYPOINT) in scripts
    result = run(tool("shellcheck"), *scripts)
    assert result.returncode == 0, result.stdout + result.stderr


def stages(text: str) -> dict[str, list[str]]:
    """Dockerfile instructions by stage name (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = found.setdefault(match.group(1), [])
        current.append(line)
    return found


def test_the_runtime_image_runs_unprivileged_with_a_health_check_and_the_entrypoint() -> None:
    runtime = stages(DOCKERFILE.read_text())["runtime"]
    users = [line for line in runtime if line.startswith("USER ")]
    assert users == ["USER 10001:10001"]
    assert any(line.startswith("HEALTHCHECK ") and "probe.sh" in line for line in runtime)
    assert 'ENTRYPOINT ["/app/deploy/docker/entrypoint.sh"]' in runtime
    # Nothing compiles or downloads in the final stage: the venv comes from the build stage.
    assert not any(re.match(r"RUN .*pip install", line) for line in runtime)


def test_the_image_copies_every_package_the_project_imports() -> None:
    """A new app or template folder forgotten in the Dockerfile (or its .dockerignore) would
    give an image that fails at start; this compares with the repository's own folders."""
    text = DOCKERFILE.read_text()
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", text, re.MULTILINE))
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages - copied == set(), "packages not copied into the image"
    assert {"templates", "locale", "config"} <= copied
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert copied - allowed == set(), "copied but excluded from the build context"


def test_the_entrypoint_refuses_an_unknown_role() -> None:
    result = run("sh", str(ENTRYPOINT), "webserver", env={"LIMITER_HOME": str(ROOT)})
    assert result.returncode == 64
    assert "unknown role" in result.stderr


def test_the_launch_sglang_role_execs_the_translated_command_without_django() -> None:
    """The role as the SGLang image runs it: the launcher reads the configuration and execs
    SGLang (here /bin/echo stands in for SGLang's Python, so the command line is printed)."""
    result = run(
        "sh", str(ENTRYPOINT), "launch-sglang", "--python", "/bin/echo",
        env={"LIMITER_HOME": str(ROOT), "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    args = result.stdout.split()
    assert args[:2] == ["-m", "sglang.launch_server"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == "30000"
    assert {"--enable-metrics", "--enable-cache-report"} <= set(args)
    # The SGLang image has PyYAML but none of the gateway's packages.
    probe = run(sys.executable, "-c", (
        "import sys; from gateway import sglang_launch; "
        "code = sglang_launch.main(['--json']); "
        "assert 'django' not in sys.modules, 'the launcher imported Django'; sys.exit(code)"
    ))  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout)[:2] == ["-m", "sglang.launch_server"]


def compose_config(env_file: Path, *extra: str) -> dict[str, Any]:
    result = run(
        docker_compose(), "-f", str(COMPOSE), "--env-file", str(env_file), *extra,
        "config", "--format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    text = (DEPLOY / "compose.env.example").read_text()
    text = text.replace("SECRET_KEY=\n", "SECRET_KEY=" + "s" * 60 + "\n")
    text = text.replace("GATEWAY_MONITORING_TOKEN=\n", "GATEWAY_MONITORING_TOKEN=t0ken\n")
    path = tmp_path / ".env"
    path.write_text(text)
    return path


def test_compose_gives_the_production_topology(env_file: Path) -> None:
    services = compose_config(env_file)["services"]
    assert set(services) == {
        "postgres", "redis", "migrate", "gateway", "worker", "beat", "proxy", "simulator"
    }  # fmt: skip
    limiter = {n: s for n, s in services.items() if "deploy/docker/Dockerfile" in
               str(s.get("build", {}).get("dockerfile", ""))}  # fmt: skip
    assert set(limiter) == {"migrate", "gateway", "worker", "beat", "simulator"}
    for name, service in limiter.items():
        assert service["command"][0] in ROLES, name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
    assert services["gateway"]["deploy"]["replicas"] == 2
    assert services["beat"]["deploy"]["replicas"] == 1
    assert services["gateway"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    # The ledger's stream needs Redis's append-only file.
    assert "--appendonly" in services["redis"]["command"]
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    # The public quick-start keys are never imported by the production topology.
    assert "korean_users" not in services["migrate"]["environment"]["LIMITER_IMPORT_CONFIG"]
    # Only the proxy is published, and on loopback unless the operator opens it.
    published = {n for n, s in services.items() if s.get("ports")}
    assert published == {"proxy"}
    assert services["proxy"]["ports"][0]["host_ip"] == "127.0.0.1"
    assert services["gateway"]["environment"]["SGLANG_URL"] == "http://simulator:8000"


def test_the_gpu_profile_runs_sglang_on_the_gpu_instead_of_the_simulator(
    env_file: Path,
) -> None:
    text = env_file.read_text().replace("COMPOSE_PROFILES=simulator", "COMPOSE_PROFILES=gpu")
    text = text.replace("SGLANG_URL=http://simulator:8000", "SGLANG_URL=http://sglang:30000")
    env_file.write_text(text)
    services = compose_config(env_file)["services"]
    assert "simulator" not in services and "sglang" in services
    sglang = services["sglang"]
    assert sglang["build"]["target"] == "sglang"
    devices = sglang["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert services["gateway"]["environment"]["SGLANG_URL"] == "http://sglang:30000"


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    example = (DEPLOY / "compose.env.example").read_text()
    for missing, given in (("SECRET_KEY", "GATEWAY_MONITORING_TOKEN"),
                           ("GATEWAY_MONITORING_TOKEN", "SECRET_KEY")):  # fmt: skip
        env = tmp_path / ".env"
        env.write_text(example.replace(f"{given}=\n", f"{given}=set\n"))
        result = run(docker_compose(), "-f", str(COMPOSE), "--env-file", str(env), "config")
        assert result.returncode != 0
        assert f"required variable {missing} is missing" in result.stderr


def test_the_yaml_files_pass_yamllint() -> None:
    result = run(tool("yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY))
    assert result.returncode == 0, result.stdout + result.stderr
