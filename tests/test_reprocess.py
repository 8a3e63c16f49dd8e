"""The archive pass on the local engine: a real process pool, real SIGKILLs, a real full disk, real Parquet files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow", reason="reprocess writes Parquet: pip install 'iws-engine[parquet]'")
import pyarrow.dataset as ds  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from iws_engine.cli import main  # noqa: E402
from iws_engine.reprocess import INVENTORY, PART_RE, RUN_RECORD, build_inventory, write_inventory  # noqa: E402

N_GOOD, SHARD = 36, 3  # 13 shards with the two bad files: many commits to land a kill on


@pytest.fixture(scope="module")
def vignettes(tmp_path_factory) -> Path:
    """Small synthetic vignettes in two folders, plus a corrupt and an empty PNG (error rows)."""
    from iws_engine.export.synth import generate

    root = tmp_path_factory.mktemp("archive")
    generate(root / "2019", N_GOOD // 2, fmt="rgba16", size=(128, 124), seed=3)
    generate(root / "2020", N_GOOD - N_GOOD // 2, fmt="gray16", size=(120, 128), seed=4)
    (root / "2020" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "2019" / "empty.png").write_bytes(b"")
    return root


def reprocess(*args, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "iws_engine", "reprocess", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=timeout)


def start(*args) -> subprocess.Popen:
    """The pass as its own process group, so that one SIGKILL takes the pass and its workers at once."""
    return subprocess.Popen([sys.executable, "-m", "iws_engine", "reprocess", *map(str, args), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def dataset(out: Path):
    return ds.dataset(out, format="parquet", partitioning="hive").to_table().sort_by("image_id")


def parts(out: Path) -> list[str]:
    return sorted(n for n in os.listdir(out) if PART_RE.match(n))


def assert_visible_files_complete(out: Path) -> None:
    """The commit rule seen from a reader: every visible file is a whole shard of the inventory."""
    visible = [n for n in os.listdir(out) if not n.startswith((".", "_"))]
    assert all(PART_RE.match(n) for n in visible), visible
    if not visible:
        return
    inventory = pq.ParquetFile(out / INVENTORY)
    for name in visible:
        shard = int(PART_RE.match(name).group(1))
        table = pq.read_table(out / name)
        expected = inventory.read_row_group(shard, columns=["image_id", "path"])
        assert table.column("image_id").to_pylist() == expected.column("image_id").to_pylist(), name
        assert table.column("path").to_pylist() == expected.column("path").to_pylist(), name


@pytest.fixture(scope="module")
def reference(vignettes, tmp_path_factory) -> Path:
    """One uninterrupted pass."""
    out = tmp_path_factory.mktemp("ref") / "v1"
    r = reprocess(vignettes, "-o", out, "--shard-size", SHARD, "--processes", 2)
    assert r.returncode == 1, r.stderr  # 1: two inputs are error rows
    assert "2 inputs (error rows)" in r.stderr and "every image_id once (verified)" in r.stderr, r.stderr
    return out


def test_pass_writes_a_parquet_dataset_equal_to_classify(reference, vignettes):
    from iws_engine.api import Classifier
    from iws_engine.pipeline import expand_inputs

    table = dataset(reference)
    paths = sorted(expand_inputs([vignettes]))
    assert table.column("path").to_pylist() == paths  # sorted inventory, every input once
    assert table.column("image_id").to_pylist() == list(range(len(paths)))
    assert {"path", "score", "decision", "threshold", "model_id", "error", "image_id"} <= set(table.column_names)
    assert len(parts(reference)) == -(-len(paths) // SHARD)
    with Classifier() as clf:
        expected = {r.path: r for r in clf.classify(paths)}
    for row in table.to_pylist():
        want = expected[row["path"]]
        assert row["score"] == pytest.approx(want.score, abs=1e-6) if want.ok else row["score"] is None
        assert row["decision"] == want.decision and row["model_id"] == want.model_id
        assert (row["error"] is None) == want.ok
    errors = {Path(r["path"]).name: r["error"] for r in table.to_pylist() if r["error"]}
    assert set(errors) == {"corrupt.png", "empty.png"} and all(name in errors[name] for name in errors)
    record = json.loads((reference / RUN_RECORD).read_text())
    assert record["status"] == "complete" and record["counts"]["failed_inputs"] == 2
    assert record["model"]["model_sha256"] and record["model"]["preprocess"]["size"] == [256, 256]
    assert record["inventory"]["images"] == len(paths) and record["per_core_img_s"] > 0
    assert record["runs"][-1]["processes"] == 2 and "pyarrow" in record["runs"][-1]["versions"]


def test_rerun_of_a_finished_pass_is_a_noop(reference, vignettes):
    before = {n: (reference / n).stat().st_mtime_ns for n in os.listdir(reference)}
    r = reprocess(vignettes, "-o", reference)
    assert r.returncode == 1 and "nothing to do" in r.stderr, r.stderr  # 1: the dataset holds error rows
    assert {n: (reference / n).stat().st_mtime_ns for n in os.listdir(reference) if n != "_lock"} == \
        {n: t for n, t in before.items() if n != "_lock"}


def test_sigkill_of_the_whole_pass_at_random_points_then_resume(reference, vignettes, tmp_path):
    seed = int(os.environ.get("IWS_KILL_SEED", time.time_ns() % 10_000))
    print(f"kill times drawn with IWS_KILL_SEED={seed}")  # shown when the test fails: rerun with it
    rng = random.Random(seed)
    out = tmp_path / "killed"
    shards = len(parts(reference))
    progressed = []
    for attempt in range(4):
        proc = start(vignettes, "-o", out, "--shard-size", SHARD, "--processes", 2)
        if attempt == 0:  # anywhere in start-up, listing or the first shards (a whole pass takes ~3 s here)
            time.sleep(rng.uniform(0.2, 2.0))
        else:  # once some more shards are committed, at a random instant soon after (often inside a commit;
            # soon enough that the last shard is still to do)
            target = min(shards - 1, len(parts(out)) + rng.randint(1, 3))
            deadline = time.monotonic() + 120
            while len(parts(out)) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if out.exists() and (out / INVENTORY).exists():
            assert_visible_files_complete(out)
        progressed.append(len(parts(out)) if out.exists() else 0)
    assert any(0 < k < shards for k in progressed), progressed  # at least one kill landed mid-pass
    r = reprocess(vignettes, "-o", out)
    assert r.returncode == 1, r.stderr
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    assert dataset(out).equals(dataset(reference))  # no row missing, none twice, the same scores


def _worker_pids(pid: int) -> list[int]:
    """The pass's worker processes (multiprocessing spawn children)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
            except OSError:
                pass
    return found


def test_worker_killed_alone_is_replaced_and_its_shard_retried(reference, vignettes, tmp_path):
    out = tmp_path / "one-worker-killed"
    proc = start(vignettes, "-o", out, "--shard-size", SHARD, "--processes", 2)
    try:
        deadline = time.monotonic() + 120
        victims = []
        while len(victims) < 2 and time.monotonic() < deadline:  # each worker is sent its shard as it starts
            time.sleep(0.01)
            victims = _worker_pids(proc.pid)
        assert len(victims) == 2, "the two worker processes did not start"
        time.sleep(random.uniform(0.0, 0.5))  # still loading its model (~2 s), its first shard in hand
        os.kill(victims[0], signal.SIGKILL)
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, log
    assert "will be retried" in log and "died" in log, log
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["runs"][-1]["retries"] >= 1 and record["status"] == "complete"
    assert dataset(out).equals(dataset(reference))


def test_a_shard_whose_worker_keeps_dying_is_reported_failed_and_redone_by_a_rerun(reference, vignettes, tmp_path):
    out = tmp_path / "poisoned"
    proc = start(vignettes, "-o", out, "--shard-size", SHARD, "--processes", 1)
    killed: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(killed) < 3 and time.monotonic() < deadline:  # each worker dies holding shard 0, 3 times
            for pid in set(_worker_pids(proc.pid)) - killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            time.sleep(0.01)
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert len(killed) == 3 and proc.returncode == 1, log
    assert "shard 0 failed" in log and "tried 3 times" in log and "1 shards not done: [0]" in log, log
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["status"] == "incomplete" and record["counts"]["failed_shards"] == [0]
    assert "part-000000.parquet" not in parts(out) and len(parts(out)) == len(parts(reference)) - 1
    r = reprocess(vignettes, "-o", out)  # the rerun redoes the failed shard only
    assert r.returncode == 1 and "1 of 13 shards to do" in r.stderr, r.stderr
    assert dataset(out).equals(dataset(reference))


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 48 KiB tmpfs: room for the inventory, the run record and a few shards, then ENOSPC."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"a full disk is simulated with a tiny tmpfs, and mounting one needs root: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_stops_the_pass_without_a_partial_shard(reference, vignettes, tiny_tmpfs):
    out = tiny_tmpfs / "v1"
    r = reprocess(vignettes, "-o", out, "--shard-size", SHARD, "--processes", 2)
    assert r.returncode == 3, r.stderr
    assert "output fault" in r.stderr and "No space left on device" in r.stderr, r.stderr
    assert 0 < len(parts(out)) < len(parts(reference))
    assert_visible_files_complete(out)
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_tmpfs)], check=True)
    r = reprocess(vignettes, "-o", out)  # space freed: the same command finishes the pass
    assert r.returncode == 1, r.stderr
    assert dataset(out).equals(dataset(reference))


def test_unwritable_out_dir_is_an_output_fault(vignettes, tmp_path, request):
    if os.geteuid() == 0:  # root writes through file modes: a read-only file system refuses it
        parent = request.getfixturevalue("tiny_tmpfs")
        subprocess.run(["mount", "-o", "remount,ro", str(parent)], check=True)
        reason = "Read-only file system"
    else:
        parent = tmp_path / "locked"
        parent.mkdir(mode=0o555)
        reason = "Permission denied"
    r = reprocess(vignettes, "-o", parent / "v1")
    assert r.returncode == 3 and reason in r.stderr and "output fault" in r.stderr, r.stderr


def test_another_model_or_other_sources_are_refused(reference, vignettes, random_weights, capsys):
    assert main(["reprocess", str(vignettes), "-o", str(reference), "--weights", str(random_weights),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "another model" in err and "model_sha256" in err and "preprocessing differs" in err, err
    assert main(["reprocess", str(vignettes), "-o", str(reference), "--threshold", "0.9", "--no-progress"]) == 2
    assert "threshold: 0.41 in OUT_DIR, 0.9 now" in capsys.readouterr().err
    assert main(["reprocess", str(vignettes / "2019"), "-o", str(reference), "--no-progress"]) == 2
    assert "same SOURCEs" in capsys.readouterr().err


def test_project_scales_the_per_core_rate_of_a_pass(reference, capsys):
    record = json.loads((reference / RUN_RECORD).read_text())
    assert main(["project", "--from", str(reference), "--cores", "56", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["throughput_img_s"] == pytest.approx(record["per_core_img_s"] * 56)
    assert result["archive_pass"]["seconds"] == pytest.approx(17_000_000 / result["throughput_img_s"])


def test_list_files_of_100000_paths_inventory_fast_with_bounded_memory(tmp_path):
    """Text and Parquet lists give one sorted, de-duplicated inventory; peak memory stays far below what
    100,000 paths held several times over as Python objects would take."""
    paths = [f"/archive/s1a/{i % 97:02d}/wv_{(i * 7919) % 100_000:06d}.png" for i in range(100_000)]
    (tmp_path / "list.txt").write_text("\n".join(paths[:60_000]) + "\n\n# comment\n")
    pq.write_table(pa.table({"path": paths[50_000:]}), tmp_path / "list.parquet")  # 10,000 repeated
    script = f"""
import resource, sys, time
from pathlib import Path
def peak_kib():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])
from iws_engine.reprocess import build_inventory, write_inventory
import pyarrow, pyarrow.compute, pyarrow.parquet
before = peak_kib(); t0 = time.perf_counter()
table, dropped, _ = build_inventory([{str(tmp_path / 'list.txt')!r}, {str(tmp_path / 'list.parquet')!r}], 2000)
write_inventory(Path({str(tmp_path)!r}), table, 2000)
print(len(table), dropped, time.perf_counter() - t0, peak_kib() - before)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows, dropped, seconds, growth_kib = r.stdout.split()
    distinct = sorted(set(paths))
    assert int(rows) == len(distinct) == 100_000 and int(dropped) == 10_000  # 110,000 listed
    assert float(seconds) < 30  # generous: ~1 s here; a 17 M list is then minutes, not hours
    assert int(growth_kib) < 200 * 1024, f"peak memory grew {int(growth_kib) // 1024} MiB"
    inventory = pq.ParquetFile(tmp_path / INVENTORY)
    assert inventory.metadata.num_row_groups == -(-len(distinct) // 2000)
    table = inventory.read()
    assert table.column("path").to_pylist() == distinct
    assert table.column("shard").to_pylist() == [i // 2000 for i in range(len(distinct))]


def test_inventory_is_the_same_for_the_same_sources(vignettes, tmp_path):
    a, _, _ = build_inventory([str(vignettes)], 4)
    b, _, _ = build_inventory([str(vignettes / "2020"), str(vignettes / "2019")], 4)
    assert a.equals(b)
    write_inventory(tmp_path, a, 4)
    assert pq.ParquetFile(tmp_path / INVENTORY).read_row_group(2).column("image_id").to_pylist() == [8, 9, 10, 11]


def test_default_shard_size_gives_small_passes_enough_shards():
    from iws_engine.reprocess import DEFAULT_SHARD_SIZE, default_shard_size

    assert default_shard_size(17_000_000) == DEFAULT_SHARD_SIZE
    assert default_shard_size(1000) == 16 and default_shard_size(10) == 16
    assert default_shard_size(64 * 100) == 100


@pytest.mark.reference
def test_eva02xgb_pass_equals_its_classifier_and_its_xgboost_file_is_part_of_the_model(vignettes,
                                                                                      tiny_eva02_weights, tmp_path,
                                                                                      capsys):
    import shutil

    from iws_engine.cli import build_parser
    from iws_engine.pipeline import expand_inputs
    from iws_engine.pipeline_a import EvaXgbClassifier
    from iws_engine.reprocess import run_pass
    from tests.conftest import XGBOOST_MODEL, require

    xgb = tmp_path / "xgb.json"
    shutil.copy(require(XGBOOST_MODEL), xgb)
    source, out = vignettes / "2019", tmp_path / "eva"

    def args(*extra):
        return build_parser().parse_args(["reprocess", str(source), "-o", str(out), "--model", "eva02xgb",
                                          "--eva-config", "tiny", "--weights", str(tiny_eva02_weights),
                                          "--xgboost", str(xgb), "--no-progress", *extra])

    result = run_pass([str(source)], args(), out, processes=1, log=lambda message: None)
    assert result.failed_inputs == 1 and not result.failed_shards  # empty.png
    paths = sorted(expand_inputs([source]))
    with EvaXgbClassifier(xgb, tiny_eva02_weights, eva_config="tiny") as clf:
        expected = {r.path: r.score for r in clf.classify(paths)}
    for row in dataset(out).to_pylist():
        assert row["score"] == pytest.approx(expected[row["path"]], abs=1e-5) if row["score"] is not None \
            else expected[row["path"]] is None
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["model"]["model"] == "eva02xgb" and record["model"]["xgboost_sha256"]
    with open(xgb, "a") as f:  # the same trees, another file: another model identity
        f.write("\n")
    assert main(["reprocess", str(source), "-o", str(out), "--model", "eva02xgb", "--eva-config", "tiny",
                 "--weights", str(tiny_eva02_weights), "--xgboost", str(xgb), "--no-progress"]) == 2
    assert "xgboost_sha256" in capsys.readouterr().err
