"""Cursor pagination for every list: stable under inserts (the ledger grows while a client
pages through it) and without a COUNT(*) over a million rows."""

from __future__ import annotations

from rest_framework.pagination import CursorPagination


class NewestFirst(CursorPagination):
    ordering: tuple[str, ...] = ("-created_at", "-id")
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 500


class NewestRequestsFirst(NewestFirst):
    ordering = ("-started_at", "-id")


class ByName(NewestFirst):
    ordering = ("name", "id")


class ById(NewestFirst):
    ordering = ("id",)
