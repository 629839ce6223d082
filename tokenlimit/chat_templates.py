"""Chat templates render in a sandbox with a budget: no conversation can make one run away.

Templates are the operator's (the model's tokenizer files); clients cannot send one
(gateway/request_schema.py refuses `chat_template` and every template kwarg but a few flags).
Still, a template runs once per request on the client's messages, so rendering is bounded:
- in time: every attribute, item and call the template makes checks a deadline;
- in size: `*`, `**` and `+` refuse results past the size budget, and so does the output.

transformers compiles every chat template in an `ImmutableSandboxedEnvironment` it builds in
`transformers.utils.chat_template_utils._cached_compile_jinja_template`. `install()` makes that
module build our subclass instead, so the exact rendering SGLang does (it calls the same
`apply_chat_template`) runs under the budget; tests/quotas/test_chat_templates.py fails if a
transformers upgrade stops using it. Outside `budget(...)` (the simulator, the admin) nothing
is limited beyond Jinja's own sandbox.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateBudgetExceeded(SecurityError):
    """Raised inside a render that ran past its time or size budget."""

    def __init__(self, message: str, *, out_of_time: bool = False) -> None:
        super().__init__(message)
        self.out_of_time = out_of_time  # a larger time budget might still finish it


class _Budget(threading.local):
    deadline: float | None = None
    max_chars: int = 0


_budget = _Budget()


@contextmanager
def budget(seconds: float, max_chars: int) -> Iterator[None]:
    """Renders on this thread inside the block stop after `seconds` or `max_chars` characters."""
    previous = (_budget.deadline, _budget.max_chars)
    _budget.deadline, _budget.max_chars = time.monotonic() + seconds, max_chars
    try:
        yield
    finally:
        _budget.deadline, _budget.max_chars = previous


def _tick() -> None:
    deadline = _budget.deadline
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateBudgetExceeded("the chat template ran past its time budget", out_of_time=True)


def _check_size(value: Any) -> Any:
    sized = isinstance(value, str | list | tuple)
    if _budget.deadline is not None and sized and len(value) > _budget.max_chars:
        raise TemplateBudgetExceeded("the chat template built a value past its size budget")
    return value


_sandbox_getattr = ImmutableSandboxedEnvironment.getattr
_sandbox_getitem = ImmutableSandboxedEnvironment.getitem
_sandbox_call = ImmutableSandboxedEnvironment.call


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    # Operators that can grow a value without bound; compiled templates route them through
    # call_binop (the set is read when a template compiles).
    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "+":
            # Templates concatenate with + all the time: the lean path (a Python call adds
            # about 1 µs; with the generic checks below, rendering cost 30 % more).
            result = left + right
            if type(result) is str and _budget.deadline is not None:
                _check_size(result)
            return result
        _tick()
        limited = _budget.deadline is not None
        if limited and operator == "**" and isinstance(right, int | float) and abs(right) > 64:
            raise TemplateBudgetExceeded("the chat template raised a number past 64")
        if limited and operator == "*":
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
                if sized and len(seq) * times > _budget.max_chars:
                    raise TemplateBudgetExceeded(
                        "the chat template built a value past its size budget"
                    )
        return _check_size(super().call_binop(context, operator, left, right))

    # Every attribute, item and call a template makes checks the clock (about 0.1 µs each,
    # docs/benchmarks.md): loops that do anything at all do one of these.
    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return _sandbox_getattr(self, obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return _sandbox_getitem(self, obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        return _sandbox_call(__self, __context, __obj, *args, **kwargs)

    def concat(self, pieces: Iterable[str]) -> str:
        """The whole output; Jinja's own is "".join. Checked chunk by chunk as it is made."""
        if _budget.deadline is None:
            return "".join(pieces)
        out: list[str] = []
        size = 0
        for piece in pieces:
            size += len(piece)
            if size > _budget.max_chars:
                raise TemplateBudgetExceeded("the chat template's output ran past its size budget")
            if time.monotonic() > _budget.deadline:
                raise TemplateBudgetExceeded(
                    "the chat template ran past its time budget", out_of_time=True
                )
            out.append(piece)
        return "".join(out)


def install() -> None:
    """Make transformers compile chat templates in BudgetedEnvironment (idempotent)."""
    from transformers.utils import chat_template_utils

    if chat_template_utils.ImmutableSandboxedEnvironment is not BudgetedEnvironment:
        setattr(chat_template_utils, "ImmutableSandboxedEnvironment", BudgetedEnvironment)  # noqa: B010
        # Templates compiled before this point (none in practice) must compile again.
        chat_template_utils._compile_jinja_template.cache_clear()


def installed_for(template: str) -> bool:
    """Whether `template` renders in BudgetedEnvironment (what the tests assert)."""
    from transformers.utils import chat_template_utils

    compiled = chat_template_utils._compile_jinja_template(template)
    return isinstance(compiled.environment, BudgetedEnvironment)
