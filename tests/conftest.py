"""Shared fixtures: tiny SD3.5 checkpoints generated once per test session. Under CI (env `CI` set,
as `.ci/run` does) a skipped test fails the session: a broken extra is a red run, not a quiet one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sd35trt.export.tiny_model import write_tiny_model


# --- CI: no silent skips ------------------------------------------------------------------------
_SKIPPED: list[tuple[str, str]] = []  # (test or module id, reason) of every skip this session


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2] if isinstance(longrepr, tuple) else longrepr).removeprefix("Skipped: ")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a module-level importorskip: the whole file
        _SKIPPED.append((report.nodeid, _skip_reason(report)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append((report.nodeid, _skip_reason(report)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") and _SKIPPED and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if os.environ.get("CI") and _SKIPPED:
        terminalreporter.section(f"CI is set: {len(_SKIPPED)} skipped (a test or a whole file) fail the run", sep="=", red=True)
        for nodeid, reason in _SKIPPED:
            terminalreporter.line(f"SKIPPED {nodeid}: {reason}", red=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    families = {"medium": "medium", "large": "large", "turbo": "large-turbo"}
    return {k: write_tiny_model(root / k, family=f, seed=0) for k, f in families.items()}


@pytest.fixture(scope="session")
def tiny_medium(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["medium"]


# --- exported ONNX folders (tiny medium), built once; need the export extras ------------------
def _exporter():
    pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) runs the exported graphs")
    pytest.importorskip("modelopt", reason="nvidia-modelopt (export extra) calibrates FP8")
    from sd35trt.export.exporter import ExportOptions, export_model

    return ExportOptions, export_model


def _calib():
    from sd35trt.export.calibrate import CalibSettings

    return CalibSettings(num_prompts=3, steps=6, height=64, width=64, seed=0)


@pytest.fixture(scope="session")
def onnx_fp32(tiny_medium: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ExportOptions, export_model = _exporter()
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    export_model(tiny_medium, out, ExportOptions(precision="fp32"), progress=False)
    return out


@pytest.fixture(scope="session")
def onnx_fp8(tiny_medium: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ExportOptions, export_model = _exporter()
    out = tmp_path_factory.mktemp("onnx") / "fp8"
    export_model(tiny_medium, out, ExportOptions(precision="fp8", dtype="fp32", calib=_calib()), progress=False)
    return out


# --- TensorRT-RTX engine sets of the tiny FP8 export, built once on the CPU (AOT) ---------------
ENGINE_TARGETS = ("sm89", "sm120")


@pytest.fixture(scope="session")
def engines_fp8(onnx_fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list]]:
    """{target: (engine folder, build rows)} for sm89 and sm120 (static, the variant's default size)."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="pip install 'sd35trt[trt-rtx]' builds engines on the CPU")
    from sd35trt.export.engines import build_engines

    root = tmp_path_factory.mktemp("engines")
    return {cc: (root / cc, build_engines(onnx_fp8, root / cc, gpu=cc)) for cc in ENGINE_TARGETS}
