"""Request ids for Django's pages and the REST API, as the gateway has for `/v1/…`."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

from tokenlimit import log_context


class RequestIdMiddleware:
    """Gives each request a fresh id, in its log lines and its `X-Request-ID` answer header.

    A client's own X-Request-ID is not taken: it would let anyone put arbitrary text in the
    operators' logs under an id of their choosing."""

    async_capable = True
    sync_capable = True

    def __init__(
        self, get_response: Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]
    ) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.async_mode:
            return self._acall(request)
        request_id = uuid.uuid4().hex
        token = log_context.request_id.set(request_id)
        try:
            response = self.get_response(request)
        finally:
            log_context.request_id.reset(token)
        assert isinstance(response, HttpResponseBase)
        response["X-Request-ID"] = request_id
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        request_id = uuid.uuid4().hex
        token = log_context.request_id.set(request_id)
        try:
            response = await self.get_response(request)  # type: ignore[misc]
        finally:
            log_context.request_id.reset(token)
        response["X-Request-ID"] = request_id
        return response
