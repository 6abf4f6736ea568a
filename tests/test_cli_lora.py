"""`generate --lora NAME_OR_FILE[:SCALE]` and `serve --lora-dir`: the image equals the pipeline's
with the same LoRA; bad values exit 2 before any model loads."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd35trt.cli import main
from sd35trt.cli_lora import LoraArg, lora_arg
from sd35trt.runtime import Pipeline
from sd35trt.runtime.image import to_pil

sys.path.insert(0, str(Path(__file__).resolve().parent / "runtime"))
from lora_writers import write_kohya_lora  # noqa: E402

ARGS = ["--prompt", "a cat in a hat", "--steps", "2", "--guidance", "4.0", "--seed", "7", "--height", "64",
        "--width", "64", "--device", "cpu", "--dtype", "fp32", "--quiet"]


def test_lora_arg_parses_file_name_and_scale() -> None:
    assert lora_arg("style.safetensors:0.7") == LoraArg("style.safetensors", 0.7)
    assert lora_arg("detail") == LoraArg("detail", 1.0)
    assert lora_arg("C:/loras/x.safetensors") == LoraArg("C:/loras/x.safetensors", 1.0)
    assert lora_arg("a:b:-1.5") == LoraArg("a:b", -1.5)
    for bad in ("style:nan", "style:99"):
        with pytest.raises(Exception, match="scale"):
            lora_arg(bad)


def test_generate_with_a_lora_file_and_a_name(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_models["large"]
    write_kohya_lora(model, tmp_path / "style.safetensors", seed=1)
    write_kohya_lora(model, tmp_path / "detail.safetensors", seed=2)
    out = tmp_path / "cat.png"
    rc = main(["generate", "--model", str(model), *ARGS, "--lora", f"{tmp_path / 'style.safetensors'}:0.6",
               "--lora", "detail:-0.4", "--lora-dir", str(tmp_path), "--out", str(out)])
    assert rc == 0
    pipe = Pipeline.from_pretrained(model, device="cpu", dtype=torch.float32)
    pipe.load_lora(tmp_path / "style.safetensors"), pipe.load_lora(tmp_path / "detail.safetensors")
    want = pipe("a cat in a hat", num_inference_steps=2, guidance_scale=4.0, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(7), progress=False, loras={"style": 0.6, "detail": -0.4})
    img = Image.open(out)
    assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(to_pil(want.images)[0]))
    assert img.text["sd35trt:loras"] == "style.safetensors:0.6,detail.safetensors:-0.4"


def test_bad_lora_flags_exit_2(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    model = str(tiny_models["large"])
    assert main(["generate", "--model", model, *ARGS, "--lora", "nope", "--out", str(tmp_path / "x.png")]) == 2
    assert "--lora nope: no such LoRA file" in capsys.readouterr().err
    assert main(["serve", "--model", model, "--lora-dir", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "--lora-dir" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
