"""`iws-engine reprocess`: the archive pass — every input classified exactly once into a Parquet dataset,
resumable after any crash, on every core of one machine (this module) or on a Ray cluster (reprocess_ray).

OUT_DIR layout (names starting with `_` or `.` are skipped by pyarrow.dataset, DuckDB, Spark and Ray readers):

    _run.json             the run record: model identity, sources, inventory checksum, shards, counts, timings
    _inventory.parquet    image_id, path, shard for every input; row group k holds shard k
    _lock                 held (flock) by the one pass that may write here
    part-000000.parquet   one file per shard: image_id, path, score, decision, threshold, model_id, error
    .part-000000.parquet.tmp-<pid>   a shard being written (renamed to part-… once complete and fsynced)

`image_id` is the input's index in the sorted, de-duplicated inventory and shard = image_id // shard_size: ids are
collision-free (a path hash is not) and a shard is a run of neighbouring paths (directory locality). Stability comes
from the inventory itself: it is written once and reused by every rerun (a rerun must name the same SOURCEs), so a
rerun splits the same inputs into the same shards without listing 17 M files again.

Commit rule: a shard's rows are serialised in memory, written to `.part-K.parquet.tmp-<pid>`, fsynced, renamed to
`part-K.parquet`, and the directory fsynced. A file named part-K is therefore complete; a rerun redoes exactly the
shards without one. Two writers of one shard (an orphaned worker of a killed pass) write identical bytes to
different temporary names, so whichever rename lands last changes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from iws_engine.argtypes import positive_int, probability

INVENTORY = "_inventory.parquet"
RUN_RECORD = "_run.json"
LOCK = "_lock"
PART_RE = re.compile(r"^part-(\d{6,})\.parquet$")
TMP_RE = re.compile(r"^\.(part-\d{6,}\.parquet|_inventory\.parquet|_run\.json)\.tmp-\d+$")
DEFAULT_SHARD_SIZE = 2000  # ~40 s of one core: small enough to lose little to a crash, large enough to amortise
MIN_SHARDS = 64  # smaller passes get smaller shards (not below 16 inputs), so that every worker has work
MAX_ATTEMPTS = 3  # a shard whose worker died this many times is reported failed
RECORD_FORMAT = 1
EXIT_OK, EXIT_INPUT_ERRORS, EXIT_USAGE, EXIT_OUTPUT = 0, 1, 2, 3
LIST_CHUNK = 65_536  # paths per Arrow chunk while listing sources
#: options of the `model` and `loading` groups a worker needs to build its classifier (classify's meaning)
MODEL_OPTIONS = ("model", "weights", "xgboost", "eva_config", "backend", "device", "precision", "artifacts",
                 "batch_size", "workers", "max_pixels", "loader", "threshold")


class OutputError(RuntimeError):
    """An output-side fault (disk full, unwritable OUT_DIR): the pass stops; nothing partial is visible."""


class UsageError(ValueError):
    """The command cannot run as given (a different model in OUT_DIR, other sources, no inputs ...)."""


# ----------------------------------------------------------------------------- files

def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_bytes(data: bytes, directory: Path, name: str) -> None:
    """Write `data` as directory/name so that the name only ever holds complete data: temporary hidden name,
    fsync, rename, fsync of the directory. An OSError becomes an OutputError and leaves no temporary file."""
    tmp = directory / f".{name}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)
        _fsync_dir(directory)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise OutputError(f"cannot write {directory / name}: {e.strerror or e}") from e


def _parquet_bytes(table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_json(directory: Path, name: str, document: dict) -> None:
    commit_bytes((json.dumps(document, indent=2, sort_keys=True) + "\n").encode(), directory, name)


def read_record(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / RUN_RECORD).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"{out_dir / RUN_RECORD}: unreadable run record ({e})") from None


def committed_shards(out_dir: Path) -> set[int]:
    return {int(m.group(1)) for name in os.listdir(out_dir) if (m := PART_RE.match(name))}


def sha256_path(path: Path) -> str:
    from iws_engine.export.weights import sha256_file

    return sha256_file(path)


# ----------------------------------------------------------------------------- inventory

def _chunks_of(strings: Iterable[str], size: int = LIST_CHUNK):
    """Arrow string chunks of `size` paths: at most one chunk is Python objects at a time."""
    import pyarrow as pa

    chunk: list[str] = []
    for s in strings:
        chunk.append(s)
        if len(chunk) >= size:
            yield pa.array(chunk, pa.large_string())
            chunk = []
    if chunk:
        yield pa.array(chunk, pa.large_string())


def _text_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", newline=None) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def source_chunks(sources: Iterable[str | Path]):
    """The inputs SOURCEs name, as Arrow string chunks: directories walked as classify does (PNG files, sorted),
    a .parquet list file's `path` column, a .png file itself, any other file a text list (one path per line;
    blank and #-lines skipped). A path that does not exist is kept: its row will say so."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from iws_engine.pipeline import PNG_SUFFIXES, expand_inputs

    for source in sources:
        p = Path(source)
        if p.is_dir() or not p.is_file() or p.suffix.lower() in PNG_SUFFIXES:
            yield from _chunks_of(expand_inputs([p]))
        elif p.suffix.lower() == ".parquet":
            f = pq.ParquetFile(p)
            if "path" not in f.schema_arrow.names:
                raise UsageError(f"{p}: a Parquet list needs a 'path' column (has {', '.join(f.schema_arrow.names)})")
            for batch in f.iter_batches(batch_size=LIST_CHUNK, columns=["path"]):
                column = batch.column(0).cast(pa.large_string())
                yield column.filter(column.is_valid())
        else:
            try:
                yield from _chunks_of(_text_lines(p))
            except UnicodeDecodeError:
                raise UsageError(f"{p}: not a text list of paths (not UTF-8); give directories, PNG files, "
                                 "text lists or Parquet lists with a 'path' column") from None


def default_shard_size(images: int) -> int:
    """DEFAULT_SHARD_SIZE, or less for a pass too small to give MIN_SHARDS shards of that size."""
    return min(DEFAULT_SHARD_SIZE, max(16, -(-images // MIN_SHARDS)))


def build_inventory(sources: list[str], shard_size: int | None = None):
    """(image_id, path, shard) of every distinct input, sorted by path; returns (table, duplicates dropped,
    shard size); `shard_size` None: default_shard_size."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    paths = pa.chunked_array(list(source_chunks(sources)), pa.large_string())
    if len(paths) == 0:
        raise UsageError("no inputs: the SOURCEs name no PNG files")
    paths = pc.take(paths, pc.array_sort_indices(paths)).combine_chunks()
    n = len(paths)
    if n > 1:  # drop repeated paths (each input is classified once): equal neighbours after the sort
        differs = pc.not_equal(paths.slice(1), paths.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        paths = paths.filter(pa.array(np.concatenate([[True], differs])))
    image_id = np.arange(len(paths), dtype=np.int64)
    shard_size = shard_size or default_shard_size(len(paths))
    table = pa.table({"image_id": image_id, "path": paths.cast(pa.string()) if paths.nbytes < 2**31 - 1 else paths,
                      "shard": (image_id // shard_size).astype(np.int32)})
    return table, n - len(paths), shard_size


def write_inventory(out_dir: Path, table, shard_size: int) -> None:
    """The inventory with row group k = shard k, committed like a shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema) as writer:
        for start in range(0, len(table), shard_size):
            writer.write_table(table.slice(start, shard_size), row_group_size=shard_size)
    commit_bytes(sink.getvalue().to_pybytes(), out_dir, INVENTORY)


def inventory_shard(out_dir: Path, shard: int):
    """Shard `shard`'s (image_id, path) rows from the inventory."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(out_dir / INVENTORY).read_row_group(shard, columns=["image_id", "path"])


# ----------------------------------------------------------------------------- model identity

def worker_options(args) -> dict[str, Any]:
    """The model and loading options, as plain values a worker process (or Ray actor) can receive."""
    return {k: getattr(args, k, None) for k in MODEL_OPTIONS}


def model_identity(args) -> dict[str, Any]:
    """What makes a dataset version one model: weights sha256 (+ XGBoost sha256), preprocessing, threshold,
    precision. Read from the files without loading a backend."""
    from iws_engine.cli import resolve_pipeline

    pipeline, weights = resolve_pipeline(args)
    if args.artifacts is not None:
        from iws_engine.export.build import read_manifest

        fields = read_manifest(args.artifacts)
        precision = fields.get("precision", args.precision)
    elif pipeline == "eva02xgb":
        from iws_engine.export.targets import Eva02XgbTarget

        fields = Eva02XgbTarget(weights, args.xgboost, eva_config=args.eva_config).manifest_fields()
        precision = args.precision
    else:
        from iws_engine.export.targets import SarcnnTarget

        fields = SarcnnTarget(weights).manifest_fields()
        precision = args.precision
    identity = {"model": fields.get("model", "sarcnn"), "model_id": fields.get("model_id"),
                "model_sha256": fields.get("model_sha256"), "preprocess": fields.get("preprocess"),
                "threshold": float(args.threshold if args.threshold is not None else fields.get("threshold")),
                "precision": precision}
    if identity["model"] == "eva02xgb":
        identity.update(xgboost_sha256=fields.get("xgboost_sha256"), eva_config=fields.get("eva_config"))
    return identity


def identity_difference(recorded: dict, current: dict) -> list[str]:
    """What differs between the model that made OUT_DIR and this run's, in words."""
    why = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if a != b:
            if key == "preprocess" and isinstance(a, dict) and isinstance(b, dict):
                keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                why.append("preprocessing differs (" + ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys)
                           + ")")
            else:
                why.append(f"{key}: {a!r} in OUT_DIR, {b!r} now")
    return why


def library_versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version()}
    for pkg in ("iws-engine", "numpy", "pyarrow", "onnxruntime", "openvino", "torch", "xgboost", "xgboost-cpu", "ray"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return versions


# ----------------------------------------------------------------------------- one shard (in a worker)

def result_table(inventory_rows, rows):
    """A shard's output table: classify's columns (outputs.COLUMNS, its Parquet types) plus image_id."""
    import pyarrow as pa

    from iws_engine.outputs import COLUMNS, _parquet_schema

    schema = pa.schema([pa.field("image_id", pa.int64()), *_parquet_schema()])
    columns = {"image_id": inventory_rows.column("image_id").combine_chunks()}
    columns.update({c: pa.array([getattr(r, c) for r in rows], schema.field(c).type) for c in COLUMNS})
    return pa.table(columns, schema=schema)


def process_shard(clf, out_dir: Path, shard: int, progress: Callable[[int], None] | None = None) -> dict:
    """Classify shard `shard` of the inventory with `clf` and commit its part file; returns its counts."""
    t0 = time.perf_counter()
    inventory_rows = inventory_shard(out_dir, shard)
    paths = inventory_rows.column("path").to_pylist()
    rows, since = [], 0
    for row in clf.classify(paths):
        rows.append(row)
        since += 1
        if progress is not None and since >= 64:
            progress(since)
            since = 0
    if progress is not None and since:
        progress(since)
    if len(rows) != len(paths) or any(r.path != p for r, p in zip(rows, paths)):
        raise RuntimeError(f"shard {shard}: {len(rows)} rows for {len(paths)} inputs (a listed input is a "
                           "directory?); list files name files")
    commit_bytes(_parquet_bytes(result_table(inventory_rows, rows)), out_dir, part_name(shard))
    return {"shard": shard, "images": len(rows), "failed": sum(not r.ok for r in rows),
            "seconds": time.perf_counter() - t0}


def load_worker_classifier(options: dict, threads: int):
    """A worker's classifier: the options' model with `threads` backend threads (and as many decoder threads
    unless --workers says otherwise)."""
    from iws_engine.cli import make_classifier

    options = dict(options)
    options["workers"] = options.get("workers") or threads
    return make_classifier(argparse.Namespace(**options), threads=threads)


# ----------------------------------------------------------------------------- local engine

def _limit_threads(threads: int) -> None:
    """Size every thread pool of this process before torch/ORT/BLAS read these variables."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def _worker_main(conn, out_dir: str, options: dict, threads: int) -> None:
    """A local worker process: load the model once, then classify the shards it is sent until None or EOF."""
    _limit_threads(threads)
    try:
        clf = load_worker_classifier(options, threads)
    except Exception as e:  # the model cannot load: the pass cannot run (usage), say why once
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    out = Path(out_dir)
    while True:
        try:
            shard = conn.recv()
        except (EOFError, OSError):  # the pass ended or was killed
            return
        if shard is None:
            return
        try:
            result = process_shard(clf, out, shard, progress=lambda k: conn.send(("progress", k)))
            conn.send(("done", result))
        except OutputError as e:
            conn.send(("output", str(e)))
        except (EOFError, OSError, BrokenPipeError):
            return
        except Exception as e:
            conn.send(("shard_error", f"{type(e).__name__}: {e}"))


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: Any
    shard: int | None = None
    reported: int = 0  # images of `shard` already counted by "progress" events


def run_local(out_dir: Path, todo: list[int], options: dict, *, processes: int, threads: int,
              max_attempts: int = MAX_ATTEMPTS) -> Iterator[tuple]:
    """Shards over `processes` spawned worker processes, one model each. Yields ("progress", images),
    ("done", result), ("retry", shard, why), ("failed", shard, why). A worker that dies (SIGKILL, OOM) is
    replaced and its shard retried up to `max_attempts` times; raises OutputError on an output fault and
    UsageError when the model cannot load."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")  # fork after torch/ORT thread pools start is unsafe
    pending = deque(todo)
    attempts: dict[int, int] = {}
    workers: list[_Worker] = []
    deaths_without_progress = 0

    def spawn() -> _Worker:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child, str(out_dir), options, threads), daemon=True,
                           name="iws-reprocess-worker")
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def stop_all() -> None:
        for w in workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()

    try:
        while pending or any(w.shard is not None for w in workers):
            idle = sum(w.shard is None for w in workers)
            while len(workers) < processes and idle < len(pending):  # (re)start workers while there is work
                workers.append(spawn())
                idle += 1
            for w in workers:
                if w.shard is None and pending:
                    w.shard = pending.popleft()
                    try:
                        w.conn.send(w.shard)
                    except OSError:  # it died already: handled with its shard below, once it can be joined
                        pass
            wait([w.conn for w in workers] + [w.process.sentinel for w in workers], timeout=1.0)
            for w in list(workers):
                while w.conn.poll():
                    try:
                        kind, *payload = w.conn.recv()
                    except (EOFError, OSError):
                        break
                    if kind == "progress":
                        w.reported += payload[0]
                        yield ("progress", payload[0])
                    elif kind == "done":
                        deaths_without_progress = 0
                        w.shard, w.reported = None, 0
                        yield ("done", payload[0])
                    elif kind == "output":
                        raise OutputError(payload[0])
                    elif kind == "fatal":
                        raise UsageError(f"the model cannot load in a worker: {payload[0]}")
                    elif kind == "shard_error":
                        shard, w.shard = w.shard, None
                        yield ("failed", shard, payload[0])
                if w.process.is_alive():  # (a dying worker's pipe reads EOF before it can be joined)
                    continue
                w.process.join()
                why = f"worker process {w.process.pid} died (exit {w.process.exitcode})"
                deaths_without_progress += 1
                if w.reported:  # its shard's images will be counted again when it is redone
                    yield ("progress", -w.reported)
                if w.shard is not None:
                    attempts[w.shard] = attempts.get(w.shard, 0) + 1
                    if attempts[w.shard] >= max_attempts:
                        yield ("failed", w.shard, f"{why}; tried {attempts[w.shard]} times")
                    else:  # retried first: a shard that kills its worker every time is known failed soon
                        pending.appendleft(w.shard)
                        yield ("retry", w.shard, why)
                if deaths_without_progress > max_attempts * max(processes, 1) + 2:
                    raise UsageError(f"worker processes keep dying before finishing any shard ({why})")
                w.conn.close()
                workers.remove(w)
    finally:
        stop_all()


# ----------------------------------------------------------------------------- the pass

@dataclasses.dataclass
class PassResult:
    images: int
    failed_inputs: int
    failed_shards: list[int]
    processed: int
    wall: float
    cores: int
    already_done: bool
    record: dict

    @property
    def exit_code(self) -> int:
        return EXIT_INPUT_ERRORS if self.failed_inputs or self.failed_shards else EXIT_OK


def verify(out_dir: Path, shards: int, counts: list[int]) -> tuple[int, int, list[str]]:
    """(rows, error rows, problems): each committed shard holds its inventory rows, every image_id once."""
    import numpy as np
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    problems = []
    for shard in sorted(committed_shards(out_dir)):
        if shard >= shards:
            problems.append(f"{part_name(shard)}: no such shard in the inventory ({shards} shards)")
            continue
        rows = pq.ParquetFile(out_dir / part_name(shard)).metadata.num_rows
        if rows != counts[shard]:
            problems.append(f"{part_name(shard)}: {rows} rows, the inventory has {counts[shard]}")
    files = [str(out_dir / part_name(k)) for k in sorted(committed_shards(out_dir))]
    if not files:
        return 0, 0, problems
    table = ds.dataset(files, format="parquet").to_table(columns=["image_id", "error"])
    ids = np.sort(table.column("image_id").to_numpy())
    if np.any(ids[1:] == ids[:-1]):
        problems.append(f"{int(np.sum(ids[1:] == ids[:-1]))} image_id values occur more than once")
    if ids[0] < 0 or ids[-1] >= sum(counts):
        problems.append("image_id values outside the inventory")
    return len(ids), len(ids) - table.column("error").null_count, problems


def shard_counts(out_dir: Path) -> list[int]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(out_dir / INVENTORY).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _lock(out_dir: Path):
    import fcntl

    f = open(out_dir / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UsageError(f"{out_dir}: another reprocess pass is writing here") from None
    return f


class Progress:
    """A tqdm bar on a terminal, a plain line every `every` seconds otherwise."""

    def __init__(self, total: int, done: int, enabled_bar: bool, every: float = 30.0):
        self.total, self.done, self.failed, self.every = total, done, 0, every
        self.start = self.last = time.perf_counter()
        self.start_done = done
        self.bar = None
        if enabled_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc="reprocess", unit="img", file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, images: int = 0, failed: int = 0) -> None:
        self.done += images
        self.failed += failed
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(images)
            if failed:
                self.bar.set_postfix(failed=self.failed)
        elif now - self.last >= self.every:
            self.last = now
            rate = (self.done - self.start_done) / (now - self.start)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"reprocess: {self.done}/{self.total} images, {rate:.1f} img/s, ETA {_duration(eta)}, "
                  f"{self.failed} failed", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def plan_processes(processes: int | None, cores: int, device: str = "cpu") -> tuple[int, int]:
    """(processes, threads each) so that processes x threads = cores: on the CPU one single-threaded process per
    core by default (one GIL and one decoder pool per core); on a GPU one process, every core decoding for it."""
    processes = processes or (1 if str(device).startswith("cuda") else cores)
    return processes, max(1, cores // processes)


def run_pass(sources: list[str], args, out_dir: Path, *, engine: str = "local", processes: int | None = None,
             shard_size: int | None = None, progress_bar: bool = False, ray_address: str | None = None,
             on_commit: Callable[[dict], None] | None = None, log=print) -> PassResult:
    """The archive pass (see the module docstring); `on_commit(result)` is called after each shard commits."""
    from iws_engine.backends.base import cpu_cores

    say = (lambda msg: log(msg, file=sys.stderr)) if log is print else log
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(out_dir)
    except PermissionError as e:
        raise OutputError(f"{out_dir}: cannot write here ({e.strerror})") from None
    except OSError as e:
        raise OutputError(f"{out_dir}: {e.strerror or e}") from None
    try:
        return _run_locked(sources, args, out_dir, engine, processes, shard_size, progress_bar, ray_address,
                           on_commit, say, cpu_cores())
    finally:
        lock.close()


def _run_locked(sources, args, out_dir, engine, processes, shard_size, progress_bar, ray_address, on_commit, say,
                cores) -> PassResult:
    t_start = time.perf_counter()
    identity = model_identity(args)
    sources = [str(s) for s in sources]
    record = read_record(out_dir)
    if record is None:
        visible = [n for n in os.listdir(out_dir) if not n.startswith((".", "_"))]
        if visible:
            raise UsageError(f"{out_dir}: not empty and not a reprocess output ({', '.join(sorted(visible)[:3])} ...)"
                             "; give an empty or new OUT_DIR")
        record = {"format": RECORD_FORMAT, "model": identity, "sources": sources, "shard_size": shard_size,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": []}
    else:
        why = identity_difference(record.get("model", {}), identity)
        if why:
            raise UsageError(f"{out_dir} holds a dataset version made with another model: " + "; ".join(why)
                             + ". One dataset version is one model: give a new OUT_DIR")
        if record.get("sources") != sources:
            raise UsageError(f"{out_dir} was made from SOURCEs {record.get('sources')}, not {sources}: rerun with "
                             "the same SOURCEs to resume, or give a new OUT_DIR")
        if shard_size is not None and shard_size != record["shard_size"]:
            raise UsageError(f"{out_dir} is split into shards of {record['shard_size']} inputs, not {shard_size}: "
                             "leave --shard-size out to resume")
        shard_size = record["shard_size"]
    for name in os.listdir(out_dir):  # temporary files of a killed pass: never visible, now garbage
        if TMP_RE.match(name):
            try:
                (out_dir / name).unlink()
            except FileNotFoundError:
                pass
    inventory = out_dir / INVENTORY
    if "inventory" not in record or not inventory.is_file():
        t0 = time.perf_counter()
        table, duplicates, shard_size = build_inventory(sources, record.get("shard_size"))
        record["shard_size"] = shard_size
        write_inventory(out_dir, table, shard_size)
        if "inventory" in record and sha256_path(inventory) != record["inventory"]["sha256"]:
            inventory.unlink()
            raise UsageError(f"{inventory} was missing, and the SOURCEs now list other inputs than when the pass "
                             "began: give a new OUT_DIR")
        record["inventory"] = {"images": len(table), "shards": math.ceil(len(table) / shard_size),
                               "duplicates_dropped": duplicates, "sha256": sha256_path(inventory),
                               "seconds": time.perf_counter() - t0}
        del table
        write_json(out_dir, RUN_RECORD, record)
        say(f"inventory: {record['inventory']['images']} inputs in {record['inventory']['shards']} shards"
            + (f" ({duplicates} repeated paths dropped)" if duplicates else "")
            + f", {record['inventory']['seconds']:.1f} s")
    elif sha256_path(inventory) != record["inventory"]["sha256"]:
        raise UsageError(f"{inventory} changed since the pass began (sha256 differs from {RUN_RECORD})")
    n_images, n_shards = record["inventory"]["images"], record["inventory"]["shards"]
    counts = shard_counts(out_dir)
    if len(counts) != n_shards:
        raise UsageError(f"{inventory}: {len(counts)} row groups, the run record says {n_shards} shards")
    done = committed_shards(out_dir)
    todo = [k for k in range(n_shards) if k not in done]
    if not todo and record.get("status") == "complete":
        say(f"{out_dir}: all {n_shards} shards are done ({n_images} images); nothing to do")
        return PassResult(n_images, record["counts"]["failed_inputs"], [], 0, time.perf_counter() - t_start,
                          record["runs"][-1]["cores"] if record["runs"] else cores, True, record)

    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "engine": engine,
           "backend": args.backend or ("torch" if identity["model"] == "eva02xgb" else "onnxruntime"),
           "device": args.device, "versions": library_versions(), "shards_todo": len(todo)}
    options = worker_options(args)
    progress = Progress(n_images, sum(counts[k] for k in done), progress_bar)
    failed_shards: dict[int, str] = {}
    retries = processed = 0
    t0 = time.perf_counter()
    if engine == "ray":
        from iws_engine.reprocess_ray import run_ray

        events, n_proc, threads = run_ray(out_dir, todo, options, address=ray_address, processes=processes,
                                          device=args.device)
        cores_used = n_proc * threads
        run.update(ray_address=ray_address, processes=n_proc, threads=threads)
    else:
        n_proc, threads = plan_processes(processes, cores, args.device)
        cores_used = n_proc * threads
        run.update(processes=n_proc, threads=threads)
        events = run_local(out_dir, todo, options, processes=n_proc, threads=threads)
    run["cores"] = cores_used
    say(f"reprocess: {len(todo)} of {n_shards} shards to do ({sum(counts[k] for k in todo)} images), engine "
        f"{engine}, {cores_used} cores, {run['processes']} " + ("processes" if engine == "local" else "actors")
        + f" x {run['threads']} threads")
    output_error = None
    try:
        for event in events:
            kind = event[0]
            if kind == "progress":
                progress.update(event[1])
            elif kind == "done":
                result = event[1]
                processed += result["images"]
                if engine == "ray":
                    progress.update(result["images"], result["failed"])
                else:
                    progress.update(0, result["failed"])
                if on_commit is not None:
                    on_commit(result)
            elif kind == "retry":
                retries += 1
                say(f"reprocess: shard {event[1]} will be retried: {event[2]}")
            elif kind == "failed":
                failed_shards[event[1]] = event[2]
                say(f"reprocess: shard {event[1]} failed: {event[2]}")
    except OutputError as e:
        output_error = e
    finally:
        progress.close()
    wall = time.perf_counter() - t0
    run.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), wall_s=wall, images=processed, retries=retries,
               failed_shards={str(k): v for k, v in sorted(failed_shards.items())},
               throughput_img_s=processed / wall if wall > 0 else 0.0)
    run["per_core_img_s"] = run["throughput_img_s"] / cores_used
    record["runs"].append(run)
    if output_error is not None:
        record["status"] = "stopped"
        try:
            write_json(out_dir, RUN_RECORD, record)
        except OutputError:
            pass
        raise output_error
    rows, failed_inputs, problems = verify(out_dir, n_shards, counts)
    done = committed_shards(out_dir)
    missing = [k for k in range(n_shards) if k not in done]
    if problems:
        raise UsageError(f"{out_dir}: verification failed: " + "; ".join(problems[:5]))
    complete = not missing and rows == n_images
    record["status"] = "complete" if complete else "incomplete"
    record["counts"] = {"images": n_images, "rows": rows, "failed_inputs": failed_inputs,
                        "shards": n_shards, "shards_done": len(done), "failed_shards": missing}
    if processed and wall > 0:  # the rate `iws-engine project --from OUT_DIR --cores N` scales
        record["throughput_img_s"] = run["throughput_img_s"]
        record["per_core_img_s"] = run["per_core_img_s"]
    write_json(out_dir, RUN_RECORD, record)
    return PassResult(n_images, failed_inputs, missing, processed, wall, cores_used, False, record)


def summary(result: PassResult, out_dir: Path) -> str:
    from iws_engine.bench.projection import DEFAULT_ARCHIVE_IMAGES

    lines = [f"reprocess: {out_dir}"]
    c = result.record.get("counts", {})
    lines.append(f"  images      {result.images} in {c.get('shards', '?')} shards; {c.get('rows', '?')} rows, every "
                 "image_id once (verified)")
    lines.append(f"  failed      {result.failed_inputs} inputs (error rows)"
                 + (f"; {len(result.failed_shards)} shards not done: {result.failed_shards[:10]}"
                    if result.failed_shards else ""))
    if result.processed and result.wall > 0:
        rate = result.processed / result.wall
        lines.append(f"  this run    {result.processed} images in {result.wall:.1f} s: {rate:.2f} img/s, "
                     f"{rate / result.cores:.2f} img/s per core ({result.cores} cores)")
        lines.append(f"  projection  a {DEFAULT_ARCHIVE_IMAGES / 1e6:g} M pass at this rate: "
                     f"{_duration(DEFAULT_ARCHIVE_IMAGES / rate)}; on 56 cores at this per-core rate: "
                     f"{_duration(DEFAULT_ARCHIVE_IMAGES / (rate / result.cores * 56))} "
                     f"(iws-engine project --from {out_dir} --cores N)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    """reprocess's own options (the model and loading groups come from cli.py, shared with classify)."""
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="directories (searched recursively), PNG files, or list files: text (one path per line) "
                        "or Parquet with a 'path' column")
    p.add_argument("-o", "--output", dest="out_dir", type=Path, required=True, metavar="OUT_DIR",
                   help="the Parquet dataset (one file per shard); rerun the same command to resume")
    g = p.add_argument_group("pass")
    g.add_argument("--processes", type=positive_int, metavar="N",
                   help="worker processes, each with its own model (local default: one per core, single-threaded; "
                        "with --device cuda one; "
                        "ray default: one per cluster CPU, or one per GPU with --device cuda)")
    g.add_argument("--shard-size", type=positive_int, metavar="N",
                   help=f"inputs per shard, fixed when OUT_DIR is created (default: {DEFAULT_SHARD_SIZE}, less for "
                        f"passes under {MIN_SHARDS} x {DEFAULT_SHARD_SIZE} inputs, so that there are {MIN_SHARDS} "
                        "shards)")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local process pool (default) or a Ray cluster (pip install 'iws-engine[ray]')")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="with --engine ray: the cluster to join (default: start a local Ray)")
    p.add_argument("--threshold", type=probability,
                   help="decision threshold (default: the model's, 0.47 for IWS; 0.48 for eva02xgb, the paper's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_reprocess(args) -> int:
    if args.ray_address and args.engine != "ray":
        print("iws-engine reprocess: --ray-address needs --engine ray", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_pass(args.sources, args, args.out_dir, engine=args.engine, processes=args.processes,
                          shard_size=args.shard_size, ray_address=args.ray_address,
                          progress_bar=not args.no_progress and sys.stderr.isatty())
    except OutputError as e:
        print(f"iws-engine reprocess: output fault, pass stopped: {e} (committed shards are kept; free space or "
              "fix permissions and rerun the same command)", file=sys.stderr)
        return EXIT_OUTPUT
    except (UsageError, ValueError, RuntimeError) as e:
        print(f"iws-engine reprocess: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(summary(result, args.out_dir), file=sys.stderr)
    if result.failed_shards:
        print(f"reprocess: {len(result.failed_shards)} shards failed; rerun the same command to retry them",
              file=sys.stderr)
    return result.exit_code
