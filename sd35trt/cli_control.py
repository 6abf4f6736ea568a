"""`generate` with ControlNets: --controlnet PATH (repeatable) --control-image IMG
[--control-type canny|blur] [--control-scale S].

Checked before torch: the flags go together, the folders hold an SD3ControlNetModel config, the
image opens. With several --controlnet, --control-image and --control-type / --control-scale are
given once per ControlNet (or once for all). --control-type canny makes the canny edges and feeds
them as Stability's canny ControlNet expects; blur blurs the image (runtime/preprocess.py); none:
the image as given (e.g. a depth map). The control images' posterior noise is drawn from --seed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

from . import cli_checks as check
from .cli_checks import UsageError

CONTROL_TYPES = ("canny", "blur")


def add_flags(g: argparse.ArgumentParser) -> None:
    g.add_argument("--controlnet", type=Path, action="append", default=[],
                   help="SD3 / SD3.5 ControlNet: diffusers folder or Stability .safetensors (repeat for several at once)")
    g.add_argument("--control-image", type=Path, action="append", default=[],
                   help="the control image (one, or one per --controlnet)")
    g.add_argument("--control-type", choices=CONTROL_TYPES, action="append", default=[],
                   help="preprocess the control image: canny edges or Gaussian blur (default: use it as given)")
    g.add_argument("--control-scale", type=check.non_negative_float, action="append", default=[],
                   help="controlnet_conditioning_scale (default 1.0; one, or one per --controlnet)")


def _per_net(flag: str, values: list, n: int, default: Any) -> list:
    if not values:
        return [default] * n
    if len(values) not in (1, n):
        raise UsageError(f"{flag} is given {len(values)} times for {n} --controlnet; give it once or once per "
                         f"--controlnet")
    return values * n if len(values) == 1 else values


def check_folder(path: Path) -> None:
    if path.is_file() and path.suffix == ".safetensors":  # Stability's single file: its shapes are read at load
        return
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UsageError(f"--controlnet {path}: no config.json there; pass a diffusers SD3ControlNetModel folder")
    try:
        name = json.loads(cfg.read_text()).get("_class_name", "SD3ControlNetModel")
    except (OSError, ValueError) as exc:
        raise UsageError(f"--controlnet {path}: config.json is not readable JSON ({exc})") from None
    if name != "SD3ControlNetModel":
        raise UsageError(f"--controlnet {path} holds a {name}, not an SD3ControlNetModel; pass an SD3 / SD3.5 ControlNet")


def control_arguments(args: argparse.Namespace) -> dict | None:
    """The ControlNet part of a `generate` (folders, PIL images, types, scales), or None; no torch."""
    from PIL import Image

    nets, images = args.controlnet, args.control_image
    if not nets:
        for flag, given in (("--control-image", images), ("--control-type", args.control_type),
                            ("--control-scale", args.control_scale)):
            if given:
                raise UsageError(f"{flag} needs --controlnet PATH (the ControlNet that reads the control image)")
        return None
    if not images:
        raise UsageError("--controlnet needs --control-image IMG (the edges, depth map or image it follows)")
    for path in nets:
        check_folder(path)
    n = len(nets)
    opened = []
    for path in _per_net("--control-image", images, n, None):
        try:
            with Image.open(path) as im:
                opened.append(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--control-image {path}: not a readable image ({exc}); pass a PNG, JPEG or WebP "
                             f"file") from None
    types = _per_net("--control-type", args.control_type, n, None)
    if any(t is not None for t in types) and importlib.util.find_spec("cv2") is None:
        raise UsageError("--control-type needs OpenCV: pip install 'sd35trt[control]'")
    return {"nets": nets, "images": opened, "types": types, "scales": _per_net("--control-scale", args.control_scale,
                                                                                  n, 1.0)}


def pipeline_option(control: dict | None) -> dict:
    """from_pretrained's controlnet= (a list only for several, as SD3MultiControlNetModel)."""
    if control is None:
        return {}
    nets = [str(p) for p in control["nets"]]
    return {"controlnet": nets if len(nets) > 1 else nets[0]}


def call_arguments(control: dict | None, height: int, width: int, seed: int) -> dict:
    """The Pipeline call's control_image / controlnet_conditioning_scale / control_generator."""
    if control is None:
        return {}
    import torch

    from .runtime.preprocess import control_input

    images = [control_input(im, t, height, width) for im, t in zip(control["images"], control["types"])]
    one = len(images) == 1
    return {"control_image": images[0] if one else images,
            "controlnet_conditioning_scale": control["scales"][0] if one else control["scales"],
            "control_generator": torch.Generator().manual_seed(seed)}


def named_path(text: str) -> tuple[str, str]:
    """argparse type of `serve --controlnet NAME=PATH`."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: pass NAME=PATH, e.g. canny=models/sd3.5-large-controlnet-canny")
    return name, path


def serve_controlnets(pairs: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The served ControlNets, their folders checked before the port is bound."""
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise UsageError(f"--controlnet names {names} repeat; give each ControlNet its own NAME")
    for _, path in pairs:
        check_folder(Path(path))
    return tuple(pairs)
