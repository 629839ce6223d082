"""`manage.py launch_sglang`: the original design's sglang_args as current SGLang's flags."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.core.management import CommandError, call_command
from django.utils import translation

from gateway.sglang_launch import launch_command

SEED = Path(__file__).resolve().parents[2] / "config" / "sglang_korean.yaml"
HEAD = ["python3", "-m", "sglang.launch_server"]
NEEDED = ["--enable-metrics", "--enable-cache-report"]


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    with translation.override("en"):  # the assertions read the msgids
        call_command("launch_sglang", "--python", "python3", *args, stdout=out, stderr=err)
    return out.getvalue().strip(), err.getvalue()


def write(tmp_path: Path, server: dict[str, Any]) -> str:
    path = tmp_path / "sglang.yaml"
    path.write_text(yaml.safe_dump({"sglang_server": server}, sort_keys=False), encoding="utf-8")
    return str(path)


def test_the_seed_configuration() -> None:
    out, err = run("--config", str(SEED), "--json")
    assert ["python3", *json.loads(out)] == [
        *HEAD,
        "--model-path", "Qwen/Qwen2.5-7B-Instruct",
        "--served-model-name", "Qwen/Qwen2.5-7B-Instruct",
        "--host", "127.0.0.1", "--port", "8000",
        "--tp-size", "1", "--mem-fraction-static", "0.85", "--max-running-requests", "64",
        "--schedule-policy", "lpm", "--chunked-prefill-size", "4096", "--kv-cache-dtype", "auto",
        *NEEDED,
    ]  # fmt: skip
    assert err == ""
    printed, _ = run("--config", str(SEED), "--port", "30000")
    assert printed.startswith("python3 -m sglang.launch_server --model-path Qwen/Qwen2.5-7B")
    assert "--port 30000" in printed


def test_an_rtx_4060_profile_of_the_original_design(tmp_path: Path) -> None:
    """8 GB: the original design turned FlashInfer off and saved KV memory."""
    server = {
        "model_path": "Qwen/Qwen2.5-3B-Instruct", "host": "0.0.0.0", "port": 8000,
        "sglang_args": {
            "served_model_name": "korean-qwen-3b", "tp_size": 1, "mem_fraction_static": 0.8,
            "max_running_requests": 16, "chunked_prefill_size": 2048, "context_length": 8192,
            "kv_cache_dtype": "fp8_e5m2", "disable_flashinfer": True, "cuda_graph_max_bs": 16,
            "disable_regex_jump_forward": True, "enable_metrics": True,
        },
    }  # fmt: skip
    out, err = run("--config", write(tmp_path, server), "--json")
    assert ["python3", *json.loads(out)] == [
        *HEAD,
        "--model-path", "Qwen/Qwen2.5-3B-Instruct", "--served-model-name", "korean-qwen-3b",
        "--host", "0.0.0.0", "--port", "8000",
        "--tp-size", "1", "--mem-fraction-static", "0.8", "--max-running-requests", "16",
        "--chunked-prefill-size", "2048", "--context-length", "8192",
        "--kv-cache-dtype", "fp8_e5m2",
        "--attention-backend", "triton", "--sampling-backend", "pytorch",
        "--cuda-graph-max-bs", "16",
        *NEEDED,
    ]  # fmt: skip
    assert "disable_flashinfer: now --attention-backend triton --sampling-backend pytorch" in err
    assert "disable_regex_jump_forward: removed from SGLang, left out" in err


def test_an_h100_profile(tmp_path: Path) -> None:
    server = {
        "model_path": "/models/Qwen2.5-72B-Instruct-AWQ", "port": 30000,
        "sglang_args": {
            "served_model_name": "Qwen/Qwen2.5-72B-Instruct", "tp_size": 2,
            "mem_fraction_static": 0.9, "max_running_requests": 256, "attention_backend": "fa3",
            "quantization": "awq_marlin", "enable_torch_compile": True,
            "torch_compile_max_bs": 32, "cuda_graph_max_bs": 256, "schedule_policy": "lpm",
            "enable_priority_scheduling": True, "max_queued_requests": 512,
            "enable_cache_report": False, "speculative_algorithm": "EAGLE",
        },
    }  # fmt: skip
    launch = launch_command(server)
    assert launch.args == [
        *HEAD,
        "--model-path", "/models/Qwen2.5-72B-Instruct-AWQ",
        "--served-model-name", "Qwen/Qwen2.5-72B-Instruct",
        "--host", "127.0.0.1", "--port", "30000",
        "--tp-size", "2", "--mem-fraction-static", "0.9", "--max-running-requests", "256",
        "--attention-backend", "fa3", "--quantization", "awq_marlin", "--enable-torch-compile",
        "--torch-compile-max-bs", "32", "--cuda-graph-max-bs", "256", "--schedule-policy", "lpm",
        "--enable-priority-scheduling", "--max-queued-requests", "512",
        *NEEDED,
    ]  # fmt: skip
    assert launch.notes == [
        "enable_cache_report: always on (the gateway needs it)",
        "speculative_algorithm: unknown to this launcher, left out",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"schedule_policy": "fastest"}, "schedule_policy: expected one of lpm, random"),
        ({"tp_size": "2"}, "tp_size: expected a whole number"),
        ({"enable_torch_compile": "yes"}, "enable_torch_compile: expected true or false"),
    ],
)
def test_values_sglang_would_refuse_stop_the_command(
    tmp_path: Path, args: dict[str, Any], message: str
) -> None:
    config = write(tmp_path, {"model_path": "m", "sglang_args": args})
    with pytest.raises(CommandError, match=message):
        run("--config", config)
