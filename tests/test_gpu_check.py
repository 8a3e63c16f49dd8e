"""bench/gpu_check.sh, the one-call GPU check, run with --dry-run: its argument handling, results folder and
step bookkeeping, the budget arithmetic (the plan fits 8 minutes even if every step used its whole limit), and
what a CPU machine can check of each step (the benchmark options parse with iws-engine's own parser, the GPU
tests collect). The real run needs the H100 (README, Development)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["setup", "gpu-tests", "sarcnn-model", "e2e-loaders", "pipeline-a-tiny", "pipeline-a-large", "xgboost-parity"]
ONE_CALL_S = 480  # the budget: one device call of 8 minutes, installs included


def run(*args: str, out: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "OUT"}  # OUT: the device tool's
    environment.update(PYTHON=sys.executable, **(env or {}))
    command = ["bash", str(SCRIPT), *args, *(["--out", str(out)] if out is not None else [])]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=environment)


def results_folder(out: Path) -> Path:
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def status_rows(folder: Path) -> dict[str, list[str]]:
    lines = (folder / "status.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", "status", "exit", "seconds", "limit"]
    return {row[0]: row[1:] for row in (line.split("\t") for line in lines[1:])}


def test_dry_run_plans_every_step_within_one_call(tmp_path: Path) -> None:
    result = run("--dry-run", out=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = results_folder(tmp_path)
    assert folder.name.startswith("gpu-") and folder.name.endswith("-dry-run")
    rows = status_rows(folder)
    assert list(rows) == STEPS
    assert all(status == "planned (dry run)" for status, *_ in rows.values())
    seconds = [int(r[2]) for r in rows.values()]
    assert seconds == sorted(seconds) and seconds[-1] <= ONE_CALL_S  # worst case: every step uses its whole limit
    summary = (folder / "SUMMARY.txt").read_text()
    assert "DRY RUN" in summary and "RESULT: every selected step planned" in summary
    for step in STEPS:
        assert f"{step}.log" in summary and (folder / f"{step}.log").is_file()
    commands = (folder / "commands.txt").read_text()
    assert "pytest -m gpu" not in commands  # steps are functions: their bodies are in the logs
    assert "pytest -m gpu" in (folder / "gpu-tests.log").read_text()
    assert "tests collected" in (folder / "gpu-tests.log").read_text()  # the GPU tests collect here
    model = (folder / "sarcnn-model.log").read_text()
    assert "options parse: torch:fp32:cuda, torch:fp16:cuda, inductor:fp16:cuda, inductor:bf16:cuda" in model
    assert "options parse: torch:fp16:cuda@gpu, torch:fp16:cuda@cpu" in (folder / "e2e-loaders.log").read_text()
    assert "--eva-config large" in (folder / "pipeline-a-large.log").read_text()
    assert "XGBoostStage" in (folder / "xgboost-parity.log").read_text()


def test_a_short_budget_skips_what_does_not_fit_and_fails(tmp_path: Path) -> None:
    result = run("--dry-run", "--budget", "60", "--steps", "setup xgboost-parity", out=tmp_path)
    assert result.returncode == 1
    rows = status_rows(results_folder(tmp_path))
    assert rows["setup"][0] == "planned (dry run)" and int(rows["setup"][3]) <= 50  # trimmed to the budget left
    assert rows["xgboost-parity"][0].startswith("not run (out of time")
    assert [s for s, r in rows.items() if r[0] == "not selected"] == [s for s in STEPS if s not in ("setup",
                                                                                                  "xgboost-parity")]
    assert "RESULT: 1 step(s) did not pass" in result.stdout


@pytest.mark.parametrize("args, message", [(["--steps", "tests"], "unknown step: tests"),
                                           (["--budget", "8min"], "--budget needs whole seconds"),
                                           (["--frobnicate"], "unknown argument"), (["--out"], "--out needs")])
def test_bad_arguments_exit_2_with_the_usage(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2 and message in result.stderr and "--dry-run" in result.stderr


def test_list_gives_each_step_and_its_limit() -> None:
    result = run("--list")
    assert result.returncode == 0
    limits = dict(line.split("\t") for line in result.stdout.splitlines())
    assert list(limits) == STEPS and sum(int(v.rstrip(" s")) for v in limits.values()) <= ONE_CALL_S


def test_under_the_device_tool_the_folder_is_packed(tmp_path: Path) -> None:
    """$OUT set (the device tool returns at most 8 files): a .tar.gz of the folder and SUMMARY.txt beside it."""
    result = run("--dry-run", "--steps", "setup", env={"OUT": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    archives = list(tmp_path.glob("*.tar.gz"))
    assert len(archives) == 1 and (tmp_path / "SUMMARY.txt").is_file()
    with tarfile.open(archives[0]) as tar:
        names = tar.getnames()
    assert any(n.endswith("/status.tsv") for n in names) and any(n.endswith("/setup.log") for n in names)
