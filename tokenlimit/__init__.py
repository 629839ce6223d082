"""Django-free core of the limiter: token counting (tokenizers, chat templates, the estimator),
the multi-window limiter (embedded and Redis backends), and the ledger row as it travels.

The gateway, the SGLang simulator and the benchmarks import it without Django; the Django
apps (accounts → quotas → gateway → telemetry) build on it and it imports none of them.
"""
