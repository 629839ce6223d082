"""An SGLang SIMULATOR: it stands in for the GPU on machines without one. It is NOT SGLang.

It serves SGLang's HTTP API (OpenAI-compatible routes, flat errors, native routes, Prometheus
metrics under SGLang's names) and answers every request with the same canned Korean paragraph at
a configurable speed; it loads no model and infers nothing. The tests, the benchmarks and the
quick start use it; production talks to a real SGLang server.

A development and test tool, not part of the gateway: it imports no Django, and its only
dependency on the project is the token counter (`tokenlimit.tokens`), so `usage.prompt_tokens`
is what the gateway itself counts. It is not shipped in the product wheel (pyproject.toml).

Modules, each importing only those after it:
- `sglang_sim.cli` (`python -m sglang_sim`, and the options of `manage.py simulate_sglang`);
- `sglang_sim.server`: the engine, the test hooks and the aiohttp app;
- `sglang_sim.wire` (SGLang's bodies, chunks and errors) and `sglang_sim.metrics`;
- `sglang_sim.jobs`: the configuration, a request in flight and what the others read of the
  running engine.
"""
