"""The simulator as a package of its own: `python -m sglang_sim` without Django, its imports one
way only, and `manage.py simulate_sglang` as a wrapper over the same options."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from sglang_sim.jobs import DEFAULT_MODEL
from tests.procs import ROOT, free_port, running

PACKAGE = ROOT / "sglang_sim"
# Each module may import only modules of a lower rank: no cycle, and nothing read by the wire
# format or the metrics depends on the server that uses them.
RANK = {
    "__init__": 0, "jobs": 0, "wire": 1, "metrics": 1, "engine": 2, "server": 3, "cli": 4,
    "__main__": 5,
}  # fmt: skip
# The project packages; of them the simulator may use only the Django-free token counter.
PROJECT = {"accounts", "gateway", "limiter_site", "quotas", "telemetry", "tokenlimit"}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function bodies, TYPE_CHECKING blocks)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names.add(node.module or "")
    return names


def test_modules_import_no_django_and_one_way_only() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    assert {path.stem for path in files} == set(RANK)
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top != "django", f"{path.name} imports {name}"
            if top == "sglang_sim":
                imported = name.split(".")[1]
                assert RANK[imported] < RANK[path.stem], f"{path.name} imports {name}"
            elif top in PROJECT:
                assert name == "tokenlimit.tokens", f"{path.name} imports {name}"


def test_importing_the_package_loads_no_django() -> None:
    # Transitive imports too (tokenlimit, aiohttp, prometheus_client, transformers).
    code = (
        "import sys, sglang_sim.__main__, sglang_sim.server\n"
        "loaded = [m for m in sys.modules if m == 'django' or m.startswith('django.')]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_python_m_refuses_a_bad_option_with_usage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sglang_sim", "--ttft-ms", "-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--ttft-ms must not be negative" in result.stderr
    assert result.stderr.startswith("usage: python -m sglang_sim")


def test_manage_py_command_checks_the_same_options() -> None:
    with pytest.raises(CommandError, match="--answer-tokens"):
        call_command("simulate_sglang", "--answer-tokens", "0")


@pytest.mark.slow
def test_python_m_sglang_sim_serves_without_django() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["-m", "sglang_sim", "--port", str(port), "--tokens-per-second", "0", "--ttft-ms", "0"]
    with running(args, f"{url}/health"):
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        response = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": "안녕하세요"}],
                "max_tokens": 4,
            },
            timeout=10,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == DEFAULT_MODEL
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] == 4
        assert body["usage"]["prompt_tokens"] > 0
