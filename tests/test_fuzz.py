"""A bounded fuzzing campaign on every CI run: the ASan+UBSan native core under atheris (tests/fuzz/)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from iws_engine.loaders import native

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 45  # with the sanitized build (~30 s on 2 cores) the test stays within about 90 s


def _missing() -> str | None:
    if not native.available():
        return "the native decode core is not built (pip install -e . builds it)"
    if importlib.util.find_spec("atheris") is None:
        return "atheris is not installed (it is in the test extra)"
    if importlib.util.find_spec("nanobind") is None:
        return "nanobind is not installed (it is in the test extra): the sanitized build needs it"
    if shutil.which("cmake") is None:
        return "cmake is not on PATH"
    lib = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("gcc") else ""
    if not Path(lib).is_absolute():
        return "gcc with AddressSanitizer (libasan) is needed for the sanitized build"
    return None


def test_bounded_fuzz_campaign() -> None:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from tests.fuzz import campaign

    r = campaign.run(seconds=SECONDS, runs=None, build=ROOT / "build" / "fuzz-ci")
    assert not r["failed"] and not r["findings"], r["log_tail"]
    assert r["executions"] > 1_000, r
    assert r["new_units"] > 0, "no coverage feedback reached libFuzzer: " + r["log_tail"]
