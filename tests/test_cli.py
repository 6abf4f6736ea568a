"""The console script end to end: tiny-model then generate, PNG metadata, typed errors -> exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from sd35trt.cli import main


def test_generate_writes_png_with_metadata(tiny_medium: Path, tmp_path: Path) -> None:
    out = tmp_path / "img" / "cat.png"
    rc = main(["generate", "--model", str(tiny_medium), "--prompt", "a cat in a hat", "--negative-prompt", "blurry",
               "--steps", "3", "--guidance", "4.0", "--seed", "7", "--height", "64", "--width", "96",
               "--device", "cpu", "--quiet", "--out", str(out)])
    assert rc == 0
    img = Image.open(out)
    assert img.size == (96, 64)
    meta = img.text
    assert meta["sd35trt:prompt"] == "a cat in a hat" and meta["sd35trt:seed"] == "7"
    assert meta["sd35trt:steps"] == "3" and meta["sd35trt:guidance"] == "4.0"
    assert meta["sd35trt:backend"] == "torch" and meta["sd35trt:model"] == str(tiny_medium)
    assert meta["sd35trt:negative_prompt"] == "blurry"
    assert not [p for p in out.parent.iterdir() if p.name != "cat.png"]  # no temp files left


def test_bad_size_exits_2_with_message(tiny_medium: Path, tmp_path: Path, capsys) -> None:
    rc = main(["generate", "--model", str(tiny_medium), "--prompt", "x", "--height", "100",
               "--device", "cpu", "--out", str(tmp_path / "x.png")])
    assert rc == 2
    assert "--height 100 is not a multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_console_script_tiny_model(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("sd35trt")
    res = subprocess.run([str(exe), "tiny-model", str(tmp_path / "t"), "--family", "large-turbo", "--seed", "3"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "wrote tiny SD3.5 large-turbo" in res.stdout
    assert (tmp_path / "t" / "model_index.json").is_file()


def test_serve_refuses_a_busy_port_and_bad_limits_before_loading(tiny_medium: Path, capsys) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc = main(["serve", "--model", str(tiny_medium), "--port", str(port)])
    assert rc == 2 and f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_medium), "--port", "0", "--max-n", "8"]) == 2
    assert "--max-n 8 exceeds --max-batch 4" in capsys.readouterr().err
