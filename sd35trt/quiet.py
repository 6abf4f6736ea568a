"""Quiet commands: third-party warnings, logs and progress bars are silenced while one `sd35trt`
command runs (`--verbose` keeps them), and put back afterwards.

Only the command line uses this: library code never changes process-wide logging or warning
state (DEVELOPERS.md). Our own messages (sd35trt loggers, warnings raised by sd35trt modules, our
progress bars and tables) are untouched. What is silenced, and how:
  * Python warnings from other modules (ModelOpt's version notice, torch.onnx, transformers).
  * transformers / diffusers / huggingface_hub / ModelOpt / polygraphy loggers below ERROR, and the
    Hugging Face progress bars ("Writing model shards"), through their documented environment
    variables for libraries imported later and their loggers for those already imported.
  * ONNX Runtime's native log (graph-optimizer notices) below ERROR (`set_default_logger_severity`).
  * What libraries print on stdout during heavy work (`library_stdout`: ModelOpt's "Inserted N
    quantizers", polygraphy's folding log), where the command itself prints nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import warnings
from typing import Iterator

ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
LOGGERS = ("transformers", "diffusers", "huggingface_hub", "modelopt", "polygraphy", "onnx", "onnxscript",
           "torch.onnx", "PIL")
ORT_ERROR, ORT_WARNING = 3, 2  # onnxruntime log severities (2 is its default)


@contextlib.contextmanager
def third_party_quiet(enabled: bool) -> Iterator[None]:
    """Silence other libraries' warnings and logs while the block runs (nothing when not `enabled`)."""
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ENV}
    for key, value in ENV.items():
        os.environ.setdefault(key, value)  # a user's own setting wins
    loggers = {name: logging.getLogger(name) for name in LOGGERS}
    saved_levels = {name: lg.level for name, lg in loggers.items()}
    for lg in loggers.values():
        lg.setLevel(logging.ERROR)
    hf_bars = _hf_progress_bars(False) if "transformers" in sys.modules else saved_env["HF_HUB_DISABLE_PROGRESS_BARS"] is None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"sd35trt(\.|$)")
        try:
            yield
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _hf_progress_bars(hf_bars)
            for name, lg in loggers.items():
                lg.setLevel(saved_levels[name])
            if "onnxruntime" in sys.modules:
                sys.modules["onnxruntime"].set_default_logger_severity(ORT_WARNING)


def quiet_onnxruntime(enabled: bool) -> None:
    """ONNX Runtime's native log below ERROR for the rest of the command (reset by third_party_quiet
    on the way out). Imports onnxruntime, so a command calls it only when it will use it."""
    if enabled and importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        onnxruntime.set_default_logger_severity(ORT_ERROR)


@contextlib.contextmanager
def library_stdout(enabled: bool) -> Iterator[None]:
    """Drop what libraries print on stdout inside the block (when `enabled`); the command prints
    its own results after it."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _hf_progress_bars(on: bool) -> bool:
    """Turn transformers' progress bars on/off if it is imported (a later import reads
    HF_HUB_DISABLE_PROGRESS_BARS); returns the state before."""
    if "transformers" not in sys.modules:
        return on
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.enable_progress_bar() if on else tlog.disable_progress_bar()
    return was
