"""What import_config may change on a re-import, field by field.

Each object an import writes (the default plan's limits, the served model, each user's plan,
limits and description, each API key's owner and name) has a ConfigImport row: the file and
the values that file set last time. On the next import, for every field the file sets:

- the database holds the file's value already: nothing to do;
- the database still holds what the file set last time (nobody touched it): the file's new
  value is applied;
- the database holds something else (an operator changed it in the admin, or it existed before
  any import): a **conflict**. The operator's value is kept and the conflict is reported with
  both values; `import_config --file-wins` applies the file's value instead.

The row then records the file's values, so a kept conflict is reported again on every import
until the file or the admin agrees (a reminder, never a silent override). `--dry-run` runs the
whole import in a transaction that is rolled back and prints every change it would make.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.models import ConfigImport


@dataclass(frozen=True)
class FieldChange:
    kind: str
    name: str
    field: str
    old: Any
    new: Any
    conflict: bool = False  # the admin's value differs from the file's last one: kept


@dataclass
class ConfigState:
    """The managed objects' last imported values, read once per import, and what changed."""

    file_wins: bool = False
    rows: dict[tuple[str, str], ConfigImport] = field(default_factory=dict)
    changes: list[FieldChange] = field(default_factory=list)

    @classmethod
    def load(cls, *, file_wins: bool = False) -> ConfigState:
        rows = {(row.kind, row.name): row for row in ConfigImport.objects.all()}
        return cls(file_wins=file_wins, rows=rows)

    @property
    def conflicts(self) -> list[FieldChange]:
        return [c for c in self.changes if c.conflict]

    def to_apply(
        self, kind: str, name: str, current: Mapping[str, Any] | None, wanted: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The fields of `wanted` (the file's values) to write; `current`: the database's
        values of the same fields, None for an object that does not exist yet."""
        if current is None:
            self.changes.extend(FieldChange(kind, name, f, None, v) for f, v in wanted.items())
            return dict(wanted)
        row = self.rows.get((kind, name))
        before = row.values if row is not None else None
        applied: dict[str, Any] = {}
        for name_, value in wanted.items():
            now = current.get(name_)
            if _same(now, value):
                continue
            untouched = before is not None and name_ in before and _same(now, before[name_])
            if untouched or self.file_wins:
                applied[name_] = value
                self.changes.append(FieldChange(kind, name, name_, now, value, not untouched))
            else:
                self.changes.append(FieldChange(kind, name, name_, now, value, conflict=True))
        return applied

    def remember(self, kind: str, name: str, file: str, wanted: Mapping[str, Any]) -> None:
        """Record what the file set (one upsert per object)."""
        values = {k: _jsonable(v) for k, v in wanted.items()}
        row = self.rows.get((kind, name))
        if row is not None and row.file == file and row.values == values:
            return
        row, _ = ConfigImport.objects.update_or_create(
            kind=kind, name=name, defaults={"file": file[:500], "values": values}
        )
        self.rows[(kind, name)] = row


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _same(a: Any, b: Any) -> bool:
    return bool(_jsonable(a) == _jsonable(b))
