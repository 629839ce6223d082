"""What an oversized or lying upload costs the server, uvicorn against Daphne, side by side.

    .venv/bin/python bench/body_limit_bench.py [--megabytes 400]

Starts each server on the same application (SQLite in a temporary directory, one user and key),
then: streams a chunked upload of `--megabytes` and reports how much the server read and how its
peak RSS grew; sends `Content-Length: 10^10` with a one-byte body and reports how long until an
answer (or that none came in 20 s).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import free_port, wait_http  # noqa: E402

SERVERS = {
    "uvicorn": ["-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--lifespan", "on"],
    "daphne": ["-m", "daphne", "-b", "127.0.0.1", "-p", "{port}"],
}


def peak_rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM")


def prepare_database(directory: str) -> tuple[dict[str, str], str]:
    env = {**os.environ, "DEBUG": "1", "DATABASE_URL": f"sqlite:///{directory}/db.sqlite3",
           "SGLANG_URL": "http://127.0.0.1:9", "EMBEDDED_BEAT": "0"}  # fmt: skip
    python = [sys.executable, "manage.py"]
    subprocess.run([*python, "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    script = (
        "from accounts.services import create_api_key, get_or_create_user\n"
        "user, _ = get_or_create_user('bench')\n"
        "print(create_api_key(user, actor=None)[1])\n"
    )
    key = subprocess.run(
        [*python, "shell", "-c", script], cwd=ROOT, env=env, check=True, capture_output=True,
        text=True,
    ).stdout.split()[-1]  # fmt: skip
    return env, key


def upload(port: int, key: str, megabytes: int) -> tuple[int, bytes]:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"100000\r\n" + b"a" * 0x100000 + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        sock.settimeout(3)
        try:
            while sent < megabytes * 2**20:
                sock.sendall(chunk)
                sent += 2**20
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server stopped reading
        sock.settimeout(30)
        try:
            return sent, sock.recv(200)
        except OSError as exc:
            return sent, repr(exc).encode()


def lying_length(port: int, key: str) -> tuple[float, bytes]:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: 10000000000\r\n\r\n{{"
    ).encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        sock.settimeout(20)
        try:
            answer = sock.recv(200)
        except OSError:
            answer = b"(no answer)"
    return time.monotonic() - started, answer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        env, key = prepare_database(directory)
        print("| server | body read | peak RSS | answer | Content-Length 10^10, 1 byte sent |")
        print("| --- | --- | --- | --- | --- |")
        for name, template in SERVERS.items():
            port = free_port()
            command = [a.format(port=port) for a in template] + ["limiter_site.asgi:application"]
            proc = subprocess.Popen(
                [sys.executable, *command], cwd=ROOT, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                wait_http(f"http://127.0.0.1:{port}/health", proc)
                before = peak_rss_mib(proc.pid)
                sent, answer = upload(port, key, args.megabytes)
                grown = peak_rss_mib(proc.pid) - before
                waited, lying = lying_length(port, key)
            finally:
                proc.terminate()
                proc.wait()
            status = answer.split(b"\r\n")[0].decode(errors="replace")
            late = lying.split(b"\r\n")[0].decode(errors="replace")
            print(
                f"| {name} | {sent / 2**20:.0f} of {args.megabytes} MiB | +{grown} MiB "
                f"| {status} | {late} after {waited:.1f} s |"
            )


if __name__ == "__main__":
    main()
