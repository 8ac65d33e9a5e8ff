"""Finished cells of an evaluation, kept on disk so that an interrupted run resumes where it stopped.

``cells.jsonl`` in the output folder starts with a header line holding the settings; every finished cell is
appended as one JSON line and flushed to disk before the next starts. On resume, the cells of a file whose
settings equal the run's are reused; a last line cut short by an interruption is dropped. The grid itself
(``defenses``, ``attacks``) may differ: a cell is keyed by its defense setting and attack, so a grid can be
extended or narrowed and the cells it shares with the earlier run are reused. A file written for other
settings (data, model, budgets, seed) is refused; it is never overwritten silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from fedleak.errors import OutputError
from fedleak.evaluation.cells import CELL_TYPES, Cell

FILE = "cells.jsonl"
GRID = ("defenses", "attacks")  # settings a resumed run may change: cells are keyed by them


class CellStore:
    """Append-only store of finished cells for one settings dict (``path``: the cells file)."""

    def __init__(self, path: Path, settings: Mapping[str, object]) -> None:
        self.path = path
        self.settings = json.loads(json.dumps(dict(settings)))
        self.cells: dict[tuple[str, str, str], Cell] = {}
        if path.exists():
            self._read()
        else:
            self._write_line({"settings": self.settings}, mode="w")

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or "settings" not in header:
            raise OutputError(f"{self.path} is not a fedleak evaluation's cells file; remove it or choose another "
                              "output folder")
        changed = sorted(k for k in set(header["settings"]) | set(self.settings)
                         if k not in GRID and header["settings"].get(k) != self.settings.get(k))
        if changed:
            raise OutputError(f"{self.path} holds an evaluation with other settings (they differ in {changed}); "
                              "resume with the same settings (the defenses and attacks may change), or use another "
                              "output folder")
        good = [lines[0]]
        for line in lines[1:]:
            try:
                record = json.loads(line)
                cell = CELL_TYPES[record["kind"]].from_dict(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut short by an interruption
            self.cells[cell.key] = cell
            good.append(line)
        if len(good) != len(lines):  # rewrite without the broken lines, atomically
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("\n".join(good) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)

    def _write_line(self, record: Mapping[str, object], mode: str = "a") -> None:
        try:
            with open(self.path, mode, encoding="utf-8") as fh:
                fh.write(json.dumps(record, allow_nan=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def get(self, key: tuple[str, str, str]) -> Cell | None:
        return self.cells.get(key)

    def add(self, cell: Cell) -> Cell:
        self._write_line(cell.to_dict())
        self.cells[cell.key] = cell
        return cell
