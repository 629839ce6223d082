"""Loading a tokenizer from a GGUF file, against the same tokenizer from a directory.

    DEBUG=1 .venv/bin/python -m bench.gguf_tokenizer_bench [--runs 3]

Writes a GGUF carrying the bundled Qwen tokenizer (151,669 tokens, 151,387 merges, no tensors:
a model file's tensors are memory-mapped and never read), then loads it the way the gateway
does (tokenlimit.tokenizer_sources.load_gguf_tokenizer) in a fresh process each run, beside
the directory load. Prints seconds per step and checks that both count alike.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP = """
import time, sys
started = time.perf_counter()
from tokenlimit.tokens import get_counter, qwen_tokenizer_dir
imported = time.perf_counter()
counter = get_counter("bench", sys.argv[1])
loaded = time.perf_counter()
assert counter.exact, counter.source
count = counter.count_chat([{"role": "user", "content": "대한민국의 수도는?"}])
print(f"{imported - started:.3f} {loaded - imported:.3f} {count}")
"""


def run(location: str) -> tuple[float, float, int]:
    out = subprocess.run(
        [sys.executable, "-c", STEP, location], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), float(out[1]), int(out[2])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    from tests.tokenlimit.test_tokenizer_sources import write_qwen_gguf
    from tokenlimit.tokens import qwen_tokenizer_dir

    with tempfile.TemporaryDirectory() as folder:
        gguf = Path(folder) / "qwen.gguf"
        write_qwen_gguf(gguf)
        print(f"GGUF file: {gguf.stat().st_size / 1e6:.1f} MB")
        for name, location in (("directory", str(qwen_tokenizer_dir())), ("gguf", str(gguf))):
            results = [run(location) for _ in range(runs)]
            load = statistics.median(r[1] for r in results)
            print(f"{name:9s} load (median of {runs}): {load:.2f} s; chat count {results[0][2]}")


if __name__ == "__main__":
    main()
