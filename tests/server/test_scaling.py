"""A `serve` config's `args:` read into the settings of the Ray app (`sd35trt.server.scaling`), the
README's multi-node config included; bad values refused naming them. No Ray instance is started."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sd35trt.runtime.errors import InvalidInputError
from sd35trt.server.scaling import Scaling, parse_autoscale, settings_from_args

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_config_reads_into_settings() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of the ray extra) reads the config")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S) if "build_app" in b)
    (app,) = yaml.safe_load(block)["applications"]
    assert app["import_path"] == "sd35trt.server.ray:build_app"
    settings, scaling = settings_from_args(app["args"])
    assert settings.model == Path(app["args"]["model"]) and settings.max_batch == app["args"]["max_batch"]
    assert settings.limits.timeout_s == app["args"]["timeout_s"]
    assert scaling == Scaling(autoscale=parse_autoscale(app["args"]["autoscale"]), target_queue=4, gpus_per_replica=1)


def test_every_field_reaches_its_dataclass() -> None:
    settings, scaling = settings_from_args({
        "model": "/m", "backend": "onnxruntime", "backend_options": {"intra_op_threads": 1}, "max_batch": 2,
        "workers": 2, "model_aliases": ["sd"], "max_steps": 30, "max_n": 2, "replicas": 3, "gpus_per_replica": 0})
    assert (settings.backend, dict(settings.backend_options), settings.workers) == ("onnxruntime", {"intra_op_threads": 1}, 2)
    assert settings.model_aliases == ("sd",) and (settings.limits.max_steps, settings.limits.max_n) == (30, 2)
    assert (scaling.replicas, scaling.autoscale, scaling.gpus_per_replica) == (3, None, 0)


@pytest.mark.parametrize("args,fragment", [
    ({"model": "/m", "replica": 2}, "unknown argument(s) replica"),
    ({"max_batch": 2}, "args.model"),
    ({"model": "/m", "autoscale": "4-1"}, "autoscale=(4, 1)"),
    ({"model": "/m", "autoscale": "lots"}, "'lots' must be MIN-MAX"),
    ({"model": "/m", "replicas": 0}, "replicas=0"),
    ({"model": "/m", "gpus_per_replica": -1}, "gpus_per_replica=-1"),
    ({"model": "/m", "target_queue": 0}, "target_queue=0"),
    ({"model": "/m", "max_batch": 2, "max_n": 4}, "max_n=4 exceeds max_batch=2"),
])
def test_bad_args_are_refused_naming_them(args: dict, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(fragment)):
        settings_from_args(args)
