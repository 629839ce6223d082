"""Cursor pagination for every list: stable under inserts (the ledger grows while a client
pages through it) and without a COUNT(*) over a million rows."""

from __future__ import annotations

from typing import Any

from django.utils.translation import gettext
from rest_framework import exceptions
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request


class NewestFirst(CursorPagination):
    ordering: tuple[str, ...] = ("-created_at", "-id")
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 500

    def decode_cursor(self, request: Request) -> Any:
        # DRF answers a cursor it cannot read with 404; it is a bad parameter (400), and a 404
        # on a list would read as "this list does not exist".
        try:
            return super().decode_cursor(request)
        except exceptions.NotFound:
            raise exceptions.ValidationError({"cursor": [gettext("Invalid cursor.")]}) from None


class NewestRequestsFirst(NewestFirst):
    ordering = ("-started_at", "-id")


class ByName(NewestFirst):
    ordering = ("name", "id")


class ById(NewestFirst):
    ordering = ("id",)
