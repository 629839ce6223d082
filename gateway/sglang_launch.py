"""The SGLang command line for the server configuration (`config/sglang_korean.yaml`).

The original design kept SGLang's launch arguments under `sglang_server.sglang_args`, with
names from SGLang releases of its time. `launch_command` translates them to the flags of
current SGLang (`python -m sglang.launch_server --help`; `python/sglang/srt/server_args.py`):

- known arguments become their flag, checked for type and, where SGLang has a fixed set, value;
- renamed ones are translated: `disable_flashinfer` became `--attention-backend triton
  --sampling-backend pytorch`, `disable_flashinfer_sampling` `--sampling-backend pytorch`;
- removed ones (`disable_regex_jump_forward`, `disable_disk_cache`, …) and unknown names are
  left out and reported, never passed on to fail SGLang's parser at start;
- what the gateway needs is always there: `--enable-metrics` (the scraper and the console),
  `--enable-cache-report` (cached tokens in usage), the served model name the gateway sends,
  the host and port the gateway's SGLANG_URL points at.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

# name → (flag, kind): "int", "float", "str", "bool" (a store_true flag), or a tuple of choices.
Kind = str | tuple[str, ...]
KNOWN: dict[str, tuple[str, Kind]] = {
    "tp_size": ("--tp-size", "int"),
    "dp_size": ("--dp-size", "int"),
    "pp_size": ("--pp-size", "int"),
    "mem_fraction_static": ("--mem-fraction-static", "float"),
    "max_running_requests": ("--max-running-requests", "int"),
    "max_queued_requests": ("--max-queued-requests", "int"),
    "max_total_tokens": ("--max-total-tokens", "int"),
    "max_prefill_tokens": ("--max-prefill-tokens", "int"),
    "chunked_prefill_size": ("--chunked-prefill-size", "int"),
    "context_length": ("--context-length", "int"),
    "schedule_policy": ("--schedule-policy", ("lpm", "random", "fcfs", "dfs-weight", "lof")),
    "schedule_conservativeness": ("--schedule-conservativeness", "float"),
    "kv_cache_dtype": ("--kv-cache-dtype", ("auto", "fp8_e5m2", "fp8_e4m3")),
    "dtype": ("--dtype", ("auto", "half", "float16", "bfloat16", "float", "float32")),
    "quantization": ("--quantization", "str"),
    "attention_backend": ("--attention-backend", "str"),
    "sampling_backend": ("--sampling-backend", ("flashinfer", "pytorch")),
    "enable_torch_compile": ("--enable-torch-compile", "bool"),
    "torch_compile_max_bs": ("--torch-compile-max-bs", "int"),
    "cuda_graph_max_bs": ("--cuda-graph-max-bs", "int"),
    "disable_cuda_graph": ("--disable-cuda-graph", "bool"),
    "disable_radix_cache": ("--disable-radix-cache", "bool"),
    "enable_mixed_chunk": ("--enable-mixed-chunk", "bool"),
    "enable_priority_scheduling": ("--enable-priority-scheduling", "bool"),
    "trust_remote_code": ("--trust-remote-code", "bool"),
    "chat_template": ("--chat-template", "str"),
    "tokenizer_path": ("--tokenizer-path", "str"),
    "stream_interval": ("--stream-interval", "int"),
    "log_level": ("--log-level", ("debug", "info", "warning", "error", "critical")),
    "api_key": ("--api-key", "str"),
}
# Gone from SGLang, with the flags that do the same now.
RENAMED: dict[str, list[str]] = {
    "disable_flashinfer": ["--attention-backend", "triton", "--sampling-backend", "pytorch"],
    "disable_flashinfer_sampling": ["--sampling-backend", "pytorch"],
}
REMOVED = frozenset(
    {
        "disable_regex_jump_forward",
        "disable_disk_cache",
        "enable_p2p_check",
        "disable_custom_all_reduce_check",
    }
)
# Always added; in the file they can only be on.
REQUIRED = ("enable_metrics", "enable_cache_report")
# Set from the file's other keys (the served model name) or the command's options.
OWN = frozenset({"served_model_name", "model_path", "host", "port"})


@dataclass
class LaunchCommand:
    args: list[str]
    notes: list[str] = field(default_factory=list)  # what was translated, dropped or refused


def launch_command(
    server: Mapping[str, Any],
    *,
    python: str = "python3",
    host: str | None = None,
    port: int | None = None,
    _: Callable[[str], str] = str,
) -> LaunchCommand:
    """The command for a configuration's `sglang_server` section. Values of the wrong type or
    outside SGLang's choices raise ValueError (the server would refuse to start with them).
    `_` translates the notes (the command passes gettext; written as `_("…")` so that
    makemessages finds them, as in sglang_sim/cli.py)."""
    sglang_args: Mapping[str, Any] = server.get("sglang_args") or {}
    name = str(sglang_args.get("served_model_name") or server["model_path"])
    command = [
        python, "-m", "sglang.launch_server",
        "--model-path", str(server["model_path"]),
        "--served-model-name", name,
        "--host", str(host or server.get("host") or "127.0.0.1"),
        "--port", str(port or server.get("port") or 30000),
    ]  # fmt: skip
    notes: list[str] = []
    for key, value in sglang_args.items():
        if key in OWN:
            continue
        if key in REQUIRED:
            if value is False:
                notes.append(_("%(key)s: always on (the gateway needs it)") % {"key": key})
            continue
        if key in RENAMED:
            if value:
                command += RENAMED[key]
                notes.append(
                    _("%(key)s: now %(flags)s") % {"key": key, "flags": " ".join(RENAMED[key])}
                )
            continue
        if key in REMOVED:
            notes.append(_("%(key)s: removed from SGLang, left out") % {"key": key})
            continue
        if key not in KNOWN:
            notes.append(_("%(key)s: unknown to this launcher, left out") % {"key": key})
            continue
        command += _flag(key, value, _)
    command += ["--enable-metrics", "--enable-cache-report"]
    return LaunchCommand(command, notes)


def _flag(key: str, value: Any, _: Callable[[str], str]) -> list[str]:
    flag, kind = KNOWN[key]
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(_("%(key)s: expected true or false") % {"key": key})
        return [flag] if value else []
    if isinstance(kind, tuple):
        if value not in kind:
            raise ValueError(
                _("%(key)s: expected one of %(choices)s") % {"key": key, "choices": ", ".join(kind)}
            )
        return [flag, str(value)]
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(_("%(key)s: expected a whole number") % {"key": key})
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(_("%(key)s: expected a number") % {"key": key})
    if kind == "str" and not isinstance(value, str):
        raise ValueError(_("%(key)s: expected text") % {"key": key})
    return [flag, str(value)]


def add_arguments(parser: argparse.ArgumentParser, _: Callable[[str], str] = str) -> None:
    """The launcher's options, for `manage.py launch_sglang` and `python -m` alike."""
    parser.add_argument("--config", default="config/sglang_korean.yaml")
    parser.add_argument("--host", default=None, help=_("Default: sglang_server.host."))
    parser.add_argument("--port", type=int, default=None, help=_("Default: sglang_server.port."))
    parser.add_argument(
        "--python", default=sys.executable, help=_("The Python that has SGLang installed.")
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help=_("Print the command (default)."))
    mode.add_argument("--exec", action="store_true", help=_("Replace this process by SGLang."))
    mode.add_argument(
        "--json",
        action="store_true",
        help=_("Print the command as a JSON list (a container's command in compose or Helm)."),
    )


class Writer(Protocol):
    def write(self, text: str, /) -> Any: ...


def emit(launch: LaunchCommand, options: Mapping[str, Any], out: Writer) -> None:
    """Exec SGLang, or print its command (JSON: the arguments after the Python, as a container
    command takes them)."""
    if options.get("exec"):
        os.execvp(launch.args[0], launch.args)
    if options.get("json"):
        out.write(json.dumps(launch.args[1:], ensure_ascii=False) + "\n")
        return
    out.write(shlex.join(launch.args) + "\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m gateway.sglang_launch`: the launcher without Django, for an image built on
    SGLang's own (its Python has PyYAML, not the gateway's packages: deploy/docker/Dockerfile)."""
    parser = argparse.ArgumentParser(prog="python -m gateway.sglang_launch")
    add_arguments(parser)
    options = vars(parser.parse_args(argv))
    try:
        with Path(options["config"]).open(encoding="utf-8") as file:
            data = yaml.safe_load(file)
    except (OSError, yaml.YAMLError) as exc:
        print(f"{options['config']}: {exc}", file=sys.stderr)
        return 2
    server = data.get("sglang_server") if isinstance(data, dict) else None
    if not isinstance(server, dict) or "model_path" not in server:
        print(f"{options['config']} has no sglang_server.model_path", file=sys.stderr)
        return 2
    try:
        launch = launch_command(
            server, python=options["python"], host=options["host"], port=options["port"]
        )
    except ValueError as exc:
        print(f"{options['config']}: sglang_args.{exc}", file=sys.stderr)
        return 2
    for note in launch.notes:
        print(f"sglang_args.{note}", file=sys.stderr)
    emit(launch, options, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
