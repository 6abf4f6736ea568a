"""`sd35trt tiny-model --layout single-file` then `generate` on the model file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from sd35trt.cli import main


def test_tiny_model_single_file_layout_generates(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiny"
    assert main(["tiny-model", str(out), "--family", "large", "--layout", "single-file"]) == 0
    assert "single-file layout" in capsys.readouterr().out
    assert (out / "sd3.5_large.safetensors").is_file() and (out / "t5xxl_fp16.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # the temporary folder is gone
    png = tmp_path / "x.png"
    rc = main(["generate", "--model", str(out / "sd3.5_large.safetensors"), "--prompt", "a red boat", "--steps", "2",
               "--seed", "1", "--height", "64", "--width", "64", "--device", "cpu", "--quiet", "--out", str(png)])
    assert rc == 0 and Image.open(png).size == (64, 64)
    assert main(["tiny-model", str(out), "--layout", "single-file"]) == 2  # not empty
