"""Result rows and their writers (CSV, JSON Lines, Parquet), streamed so archives fit in memory."""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

COLUMNS = ("path", "score", "decision", "threshold", "model_id", "error")


@dataclass(frozen=True)
class Row:
    """One input's result: a score and decision, or an error saying why there is none."""

    path: str
    score: float | None
    decision: int | None
    threshold: float
    model_id: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class RowWriter:
    """Writes rows to .csv, .jsonl or .parquet (by suffix), or CSV to stdout for '-'."""

    def __init__(self, target: str | Path):
        self.target = str(target)
        suffix = Path(self.target).suffix.lower()
        self.kind = {"": "csv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}.get(suffix)
        if self.target == "-":
            self.kind = "csv"
        if self.kind is None:
            raise ValueError(f"{self.target}: unknown output format {suffix!r} (use .csv, .jsonl or .parquet)")
        self._file: IO[str] | None = None
        self._csv = None
        self._parquet = None
        self._buffer: list[Row] = []
        if self.kind == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ValueError("Parquet output needs pyarrow: pip install 'iws-engine[parquet]'") from None
        else:
            self._file = sys.stdout if self.target == "-" else open(self.target, "w", newline="", encoding="utf-8")
            if self.kind == "csv":
                self._csv = csv.writer(self._file)
                self._csv.writerow(COLUMNS)

    def write(self, row: Row) -> None:
        if self.kind == "csv":
            self._csv.writerow([
                row.path,
                "" if row.score is None else f"{row.score:.9g}",
                "" if row.decision is None else row.decision,
                f"{row.threshold:g}",
                row.model_id,
                row.error or "",
            ])
        elif self.kind == "jsonl":
            self._file.write(json.dumps(asdict(row)) + "\n")
        else:
            self._buffer.append(row)
            if len(self._buffer) >= 65536:
                self._flush_parquet()

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buffer and self._parquet is not None:
            return
        table = pa.table({c: [getattr(r, c) for r in self._buffer] for c in COLUMNS}, schema=_parquet_schema())
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.target, table.schema)
        self._parquet.write_table(table)
        self._buffer.clear()

    def close(self) -> None:
        if self.kind == "parquet":
            self._flush_parquet()
            if self._parquet is not None:
                self._parquet.close()
        elif self._file is not None and self._file is not sys.stdout:
            self._file.close()
        elif self._file is sys.stdout:
            self._file.flush()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parquet_schema():
    import pyarrow as pa

    return pa.schema([
        ("path", pa.string()), ("score", pa.float64()), ("decision", pa.int8()),
        ("threshold", pa.float64()), ("model_id", pa.string()), ("error", pa.string()),
    ])


def read_rows(path: str | Path) -> list[Row]:
    """Read back a classify output (.csv, .jsonl or .parquet)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    elif suffix in (".jsonl", ".ndjson"):
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        with open(path, newline="", encoding="utf-8") as f:
            records = list(csv.DictReader(f))
    rows = []
    for r in records:
        score = r.get("score")
        score = None if score in ("", None) or (isinstance(score, float) and math.isnan(score)) else float(score)
        decision = r.get("decision")
        rows.append(Row(
            path=r["path"], score=score,
            decision=None if decision in ("", None) else int(decision),
            threshold=float(r["threshold"]), model_id=r["model_id"], error=r.get("error") or None,
        ))
    return rows
