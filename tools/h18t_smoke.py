"""The torch-fp8 backend's text path through `Pipeline` on a tiny checkpoint (issue 18 item 4 smoke):
a calibration folder made here (MMDiT: max calibration on one random step, as the benches do
without ModelOpt; T5: export.calibrate.calibrate_t5 over calib_prompts/, saved with save_t5_amax),
then `Pipeline.from_pretrained(tiny, backend="torch-fp8", calibration=folder, compile=...)`:
compile=True (CLIPs + T5 compiled), compile=False, and compile=True with memory="low" (T5 eager,
streamed), each encoding the same prompts; contexts against the torch backend's bf16 context.
Only the encoders run (compile is lazy: the MMDiT is never compiled here).

    python tools/h18t_smoke.py TINY_CKPT OUT.json [cuda|cpu]
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sd35trt.bench import cosine
from sd35trt.export.calibrate import calibrate_t5
from sd35trt.runtime import Pipeline
from sd35trt.runtime.checkpoint import Checkpoint
from sd35trt.runtime.models.fp8 import HIGH_PRECISION, max_calibrate
from sd35trt.runtime.models.fp8_text import save_t5_amax
from sd35trt.runtime.models.loader import load_modules
from sd35trt.runtime.text import load_tokenizers

PROMPTS = (["a red fox in fresh snow, morning light", "blurry"], 256)


def calibration(path: str, folder: Path, device: str) -> None:
    ckpt = Checkpoint.open(path)
    mods = load_modules(ckpt, ["transformer", "t5"], torch.device(device), torch.bfloat16)
    config, g = ckpt.config, torch.Generator(device=device).manual_seed(0)
    lat = torch.randn(config.latent_shape(2, 64, 64), generator=g, device=device, dtype=torch.bfloat16)  # [2, 16, 8, 8]
    ctx = torch.randn(2, config.text_tokens(), config.joint_dim, generator=g, device=device, dtype=torch.bfloat16)
    pooled = torch.randn(2, config.pooled_dim, generator=g, device=device, dtype=torch.bfloat16)  # [2, pooled]
    t = torch.full((2,), 500.0, device=device)
    with torch.no_grad():
        amax = max_calibrate(mods["transformer"], lambda m: m(lat, t, ctx, pooled), HIGH_PRECISION)
        t5_amax, meta = calibrate_t5(mods["t5"], load_tokenizers(ckpt)[2], config, 16, device)
    save_file({k: torch.tensor([v], dtype=torch.float32) for k, v in amax.items()}, str(folder / "amax.safetensors"))
    save_t5_amax(t5_amax, folder, meta)


def encode(pipe: Pipeline) -> tuple[torch.Tensor, float]:
    prompts, n = PROMPTS
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    ctx = pipe.encode(prompts, prompts, prompts, n)[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return ctx.float().cpu(), round(time.perf_counter() - t, 2)


def main() -> None:
    tiny, out = sys.argv[1], Path(sys.argv[2])
    device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
    rows = []
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        calibration(tiny, folder, device)
        ref, _ = encode(Pipeline.from_pretrained(tiny, device=device, dtype=torch.bfloat16))
        for name, kw in (("torch-fp8 compile=True", dict(compile=True)), ("torch-fp8 eager", dict(compile=False)),
                         ("torch-fp8 compile=True memory=low", dict(compile=True, memory="low"))):
            pipe = Pipeline.from_pretrained(tiny, backend="torch-fp8", device=device, calibration=folder, **kw)
            first, first_s = encode(pipe)
            again, again_s = encode(pipe)
            b = pipe.backend
            rows.append({"name": name, "t5_precision": b.t5_precision, "compiled_text": b.compiled_text,
                         "first_call_s": first_s, "second_call_s": again_s, "cos_vs_bf16": round(cosine(first, ref), 6),
                         "repeat_equal": bool(torch.equal(first, again))})
            print(json.dumps(rows[-1]), flush=True)
            pipe.close()
    out.write_text(json.dumps(rows, indent=1))
    ok = all(r["t5_precision"] == "fp8-gemms" and r["cos_vs_bf16"] > 0.99 for r in rows)
    print(f"smoke {'ok' if ok else 'FAILED'}: {[(r['name'], r['compiled_text'], r['cos_vs_bf16']) for r in rows]}")


if __name__ == "__main__":
    main()
