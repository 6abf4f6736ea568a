"""The wheel carries what an installed `sd35trt` needs at run time (calibration prompts included)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


def test_wheel_has_the_import_layout_and_the_calibration_prompts(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", reason="builds the wheel without network (--no-build-isolation)")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(root)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("sd35trt-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    for name in ("sd35trt/cli.py", "sd35trt/export/calibrate.py", "sd35trt/runtime/pipeline.py",
                 "sd35trt/calib_prompts/prompts.txt", "sd35trt/calib_prompts/negative.txt"):
        assert name in names, name
    code = ("from sd35trt.export.calibrate import read_prompts; p, n = read_prompts(5); "
            "import sd35trt.export.calibrate as c; print(c.__file__); print(len(p), len(n))")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(tmp_path / "site")}, cwd=tmp_path,
                         check=True, capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith(str(tmp_path / "site")), out  # the wheel's copy, not the repository's
    assert out[1].split()[0] == "5"
