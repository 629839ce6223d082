"""`python -m sglang_sim --port 8000 [--model NAME] …`: run the SGLang simulator without Django."""

from __future__ import annotations

from sglang_sim.cli import main

if __name__ == "__main__":
    main()
