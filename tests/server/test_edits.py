"""POST /v1/images/edits on a real server (127.0.0.1, ONNX Runtime, tiny medium): an edit equals
the pipeline's image for the seed (the expected image from a direct `pipe(...)` call with its own
`torch.Generator().manual_seed(seed)`), the mask conventions (alpha wins over colour), 4 concurrent
edits in one batch equal to their twins, malformed edits answered 400 naming the field, and the
official `openai` client's images.edit."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from harness import metric, settings
from PIL import Image

from sd35trt.runtime import Pipeline
from sd35trt.server import BackgroundServer, Limits, create_app

EDITS = "/v1/images/edits"
FORM = {"size": "64x64", "steps": "4", "response_format": "png"}  # strength 0.6 (default): 2 of 4 steps run
LIMITS = Limits(max_size=256, max_steps=500, max_prompt_chars=300, timeout_s=60, max_image_bytes=60_000,
                max_image_pixels=128 * 128)


def _picture(seed: int, h: int = 64, w: int = 64) -> np.ndarray:
    """A smooth deterministic RGB picture [h, w, 3] uint8 (gradients + a disc)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a, b = g.uniform(0.5, 3.0, 2)
    disc = ((yy - g.uniform(0.3, 0.7)) ** 2 + (xx - 0.4) ** 2 < 0.06).astype(np.float64)
    rgb = np.stack([0.5 + 0.4 * np.sin(a * 6 * xx), 0.5 + 0.4 * np.cos(b * 5 * yy), 0.2 + 0.6 * disc], -1)
    return (rgb.clip(0, 1) * 255).round().astype(np.uint8)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _box(h: int, w: int, top: int, left: int, size: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[top:top + size, left:left + size] = True
    return m


def _alpha_mask(picture: np.ndarray, hole: np.ndarray, white: np.ndarray | None = None) -> bytes:
    """OpenAI's mask: the picture, opaque, transparent (alpha 0) in `hole`; optionally painted white
    in `white` (a colour mask that the alpha must win over)."""
    rgba = np.concatenate([picture, np.full(picture.shape[:2] + (1,), 255, np.uint8)], -1)
    if white is not None:
        rgba[white, :3] = 255
    rgba[hole, 3] = 0
    return _png(Image.fromarray(rgba, "RGBA"))


def _bw_mask(edit: np.ndarray) -> bytes:
    """A black/white mask without alpha: white = edit."""
    return _png(Image.fromarray(np.where(edit, 255, 0).astype(np.uint8), "L"))


def _want(pipe: Pipeline, prompt: str, image: bytes, seed: int, edit: np.ndarray | None = None,
          strength: float = 0.6, steps: int = 4) -> np.ndarray:
    """The pipeline's own image for the edit: direct call, its own generator."""
    kw = {} if edit is None else {"mask_image": Image.fromarray(np.where(edit, 255, 0).astype(np.uint8), "L")}
    out = pipe(prompt, image=Image.open(io.BytesIO(image)).convert("RGB"), strength=strength, height=64, width=64,
               num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), progress=False, **kw)
    return np.asarray(out.images[0])


def _got(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def _files(image: bytes, mask: bytes | None = None) -> list:
    files = [("image", ("in.png", image, "image/png"))]
    return files + ([("mask", ("mask.png", mask, "image/png"))] if mask is not None else [])


@pytest.fixture(scope="module")
def edit_server(onnx_fp32: Path, ort_pipe: Pipeline):
    with BackgroundServer(create_app(settings(onnx_fp32, limits=LIMITS), pipeline=ort_pipe)) as srv:
        yield srv


@pytest.fixture()
def client(edit_server: BackgroundServer):
    with httpx.Client(base_url=edit_server.url, timeout=60) as c:
        yield c


HOLE, WHITE = _box(64, 64, 8, 8, 24), _box(64, 64, 36, 30, 24)


def test_an_edit_equals_the_pipeline_image_for_the_seed(client: httpx.Client, ort_pipe: Pipeline) -> None:
    pic = _png(Image.fromarray(_picture(1)))
    img2img = client.post(EDITS, data={"prompt": "a watercolor fox", "seed": "5", **FORM}, files=_files(pic))
    assert np.array_equal(_got(img2img), _want(ort_pipe, "a watercolor fox", pic, 5))
    meta = Image.open(io.BytesIO(img2img.content)).text
    assert (meta["sd35trt:mode"], meta["sd35trt:strength"], meta["sd35trt:slg"]) == ("image-to-image", "0.6", "off")
    assert meta["sd35trt:seed"] == "5" and meta["sd35trt:size"] == "64x64"

    bw = client.post(EDITS, data={"prompt": "a red hat", "seed": "6", "strength": "0.8", **FORM},
                     files=_files(pic, _bw_mask(WHITE)))
    want_bw = _want(ort_pipe, "a red hat", pic, 6, WHITE, strength=0.8)
    assert np.array_equal(_got(bw), want_bw)
    assert Image.open(io.BytesIO(bw.content)).text["sd35trt:mode"] == "inpainting"
    # an OpenAI mask: transparent HOLE, colour white in WHITE: the alpha wins
    alpha = client.post(EDITS, data={"prompt": "a red hat", "seed": "6", "strength": "0.8", **FORM},
                        files=_files(pic, _alpha_mask(_picture(1), HOLE, white=WHITE)))
    assert np.array_equal(_got(alpha), _want(ort_pipe, "a red hat", pic, 6, HOLE, strength=0.8))
    assert np.abs(_got(alpha).astype(int) - want_bw).max() > 10  # the other mask gives another image


def test_size_auto_is_the_image_size_and_json_answers_carry_the_mode(client: httpx.Client) -> None:
    pic = _png(Image.fromarray(_picture(2, 80, 100)))  # 100x80: rounded down to 96x80
    r = client.post(EDITS, data={"prompt": "a boat", "steps": "2", "seed": "1", "n": "2"}, files=_files(pic))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == "96x80" and body["info"]["mode"] == "image-to-image" and body["info"]["strength"] == "0.6"
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in body["data"]]
    assert [i.size for i in images] == [(96, 80)] * 2 and [d["seed"] for d in body["data"]] == [1, 2]


def _post_many(url: str, forms: list[tuple[dict, list]]) -> list[httpx.Response]:
    out: list = [None] * len(forms)
    barrier = threading.Barrier(len(forms))

    def post(i: int) -> None:
        barrier.wait()
        out[i] = httpx.post(url + EDITS, data=forms[i][0], files=forms[i][1], timeout=60)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(forms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return out


def test_four_concurrent_edits_run_as_one_batch(onnx_fp32: Path, ort_pipe: Pipeline) -> None:
    """Different images, masks (two OpenAI alpha masks, two black/white), prompts and seeds; the
    same size, steps and strength: one pipeline call of 4, each image equal to its twin."""
    cases = []
    for i, prompt in enumerate(["a hat", "a cat", "a red door", "snow"]):
        pic, edit = _picture(10 + i), _box(64, 64, 4 + 8 * i, 30 - 6 * i, 20)
        mask = _alpha_mask(pic, edit) if i % 2 else _bw_mask(edit)
        cases.append((prompt, _png(Image.fromarray(pic)), edit, mask, 200 + i))
    app = create_app(settings(onnx_fp32, max_batch=4, batch_window_ms=2000), pipeline=ort_pipe)
    with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url) as c:
        forms = [({"prompt": p, "seed": str(s), "strength": "0.75", **FORM}, _files(pic, mask))
                 for p, pic, _, mask, s in cases]
        responses = _post_many(srv.url, forms)
        assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
        assert all(r.headers["x-batch-images"] == "4" for r in responses)
        assert metric(c, "sd35trt_batches_total") == 1
        assert metric(c, "sd35trt_mode_batches_total", mode="inpainting", slg="off") == 1
        assert metric(c, "sd35trt_mode_images_total", mode="inpainting", slg="off") == 4
        assert metric(c, "sd35trt_mode_images_total", mode="text-to-image", slg="off") == 0
        assert metric(c, "sd35trt_requests_total", status="200") == 4
    got = [_got(r) for r in responses]
    for (prompt, pic, edit, _, seed), image in zip(cases, got):
        assert np.array_equal(image, _want(ort_pipe, prompt, pic, seed, edit, strength=0.75))
    assert np.abs(got[0].astype(int) - got[1]).max() > 10  # distinct images: a mix-up would show


PIC = _png(Image.fromarray(_picture(3)))
RGB_64 = _picture(3)
GIF = io.BytesIO()
Image.fromarray(RGB_64).save(GIF, format="GIF")
# (case, form fields, files, field named, code, fragment of the message); all answer 400
BAD = [
    ("no image", {}, [], "image", "missing_required_parameter", "missing"),
    ("no prompt", {"prompt": None}, _files(PIC), "prompt", "missing_required_parameter", "Field required"),
    ("mask of another size", {}, _files(PIC, _bw_mask(_box(48, 64, 0, 0, 20))), "mask",
     "invalid_value", "64x48 but the image is 64x64"),
    ("strength 0", {"strength": "0"}, _files(PIC), "strength", "invalid_value", "greater than 0"),
    ("strength 1.5", {"strength": "1.5"}, _files(PIC), "strength", "invalid_value", "less than or equal to 1"),
    ("strength leaving no step", {"strength": "1e-17"}, _files(PIC), "strength", "invalid_value", "leaves 0 of 4"),
    ("image not an image", {}, [("image", ("in.png", b"hello, not a picture", "image/png"))], "image",
     "invalid_value", "not a readable PNG, JPEG or WebP"),
    ("mask not an image", {}, _files(PIC, b"\x89PNG\r\n\x1a\n broken"), "mask", "invalid_value", "not a readable"),
    ("image a GIF", {}, [("image", ("in.gif", GIF.getvalue(), "image/gif"))], "image", "invalid_value",
     "PNG, JPEG or WebP"),
    ("image too many pixels", {}, _files(_png(Image.fromarray(_picture(4, 160, 160)))), "image", "invalid_value",
     "160x160 = 25600 pixels, over the limit of 16384"),
    ("image file too large", {}, [("image", ("big.png", b"\x89PNG" + bytes(70_000), "image/png"))], "image",
     "invalid_value", "larger than the limit of 60000 bytes"),
    ("image as text", {"image": "in.png"}, [], "image", "invalid_value", "must be a file part"),
    ("two images", {}, [("image[]", ("a.png", PIC, "image/png")), ("image[]", ("b.png", PIC, "image/png"))],
     "image", "unsupported_value", "one image per request"),
    ("mask marks nothing", {}, _files(PIC, _bw_mask(np.zeros((64, 64), bool))), "mask", "invalid_value",
     "marks nothing to edit"),
    ("opaque alpha mask, black", {}, _files(PIC, _png(Image.new("RGBA", (64, 64), (0, 0, 0, 255)))), "mask",
     "invalid_value", "marks nothing to edit"),
    ("markup file", {}, _files(PIC) + [("markup", ("m.png", PIC, "image/png"))], "markup", "unsupported_value",
     "not supported"),
    ("steps not a number", {"steps": "many"}, _files(PIC), "steps", "invalid_type", "valid integer"),
    ("unknown field", {"unicorns": "3"}, _files(PIC), "unicorns", "unknown_parameter", "unknown field"),
    ("size not a multiple of 16", {"size": "72x64"}, _files(PIC), "size", "invalid_value", "multiple of 16"),
    ("n > 1 as png", {"n": "2"}, _files(PIC), "n", "invalid_value", "b64_json"),
    ("skip layer out of range", {"skip_guidance_layers": "1,9", "guidance": "3"}, _files(PIC),
     "skip_guidance_layers", "invalid_value", "[9] outside [0, 3]"),
    ("field sent twice", {"seed": ["1", "2"]}, _files(PIC), "seed", "invalid_value", "more than once"),
]


@pytest.mark.parametrize("case,fields,files,field,code,fragment", BAD, ids=[b[0] for b in BAD])
def test_malformed_edits_get_400_naming_the_field(client: httpx.Client, case, fields, files, field, code,
                                                   fragment) -> None:
    data = {k: v for k, v in {"prompt": "a fox", **FORM, **fields}.items() if v is not None}
    r = client.post(EDITS, data=data, files=files or None)  # no files: a urlencoded form
    err = r.json()["error"]
    assert r.status_code == 400, err
    assert err["param"] == field and err["code"] == code and err["type"] == "invalid_request_error", err
    assert fragment in err["message"], err["message"]
    assert err["message"].startswith(f"{field}:"), err["message"]


def test_a_json_body_is_told_to_send_a_form(client: httpx.Client) -> None:
    r = client.post(EDITS, json={"prompt": "a fox", "image": "in.png"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    assert "multipart/form-data" in r.json()["error"]["message"]
    ok = client.post(EDITS, data={"prompt": "still serving", **FORM}, files=_files(PIC))  # the server keeps serving
    assert ok.status_code == 200


def test_the_openai_client_edits(edit_server: BackgroundServer, ort_pipe: Pipeline) -> None:
    openai = pytest.importorskip("openai", reason="pip install 'sd35trt[test]' brings the official openai client")
    client = openai.OpenAI(base_url=edit_server.url + "/v1", api_key="sk-local-test", max_retries=0, timeout=60)
    pic = _png(Image.fromarray(_picture(7)))
    r = client.images.edit(model="gpt-image-1.5", image=("in.png", pic, "image/png"),
                           mask=("mask.png", _alpha_mask(_picture(7), HOLE), "image/png"), prompt="a blue bird",
                           size="64x64", extra_body={"seed": 9, "steps": 4, "strength": 0.9})
    assert r.output_format == "png" and r.size == "64x64" and len(r.data) == 1
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB"))
    assert np.array_equal(got, _want(ort_pipe, "a blue bird", pic, 9, HOLE, strength=0.9))
    with pytest.raises(openai.BadRequestError) as bad:  # a list of two: image[] twice
        client.images.edit(image=[("a.png", pic, "image/png"), ("b.png", pic, "image/png")], prompt="x")
    assert bad.value.status_code == 400 and bad.value.param == "image"
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.edit(image=("in.png", pic, "image/png"), prompt="x", extra_body={"strength": 0})
    assert bad.value.param == "strength"
