"""Tests for export/tiny_tokenizers.py: real-format tiny CLIP / T5 tokenizers."""

from __future__ import annotations

import json
import time
import unicodedata
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

import pytest
import regex
import sentencepiece as spm
import transformers

_PATH = Path(__file__).parents[2] / "export" / "tiny_tokenizers.py"
_SPEC = spec_from_file_location("tiny_tokenizers_under_test", _PATH)
tt = module_from_spec(_SPEC)
_SPEC.loader.exec_module(tt)

SENTENCES = [
    "A photo of a cat sitting on a café table, 4k, highly detailed.",
    "An astronaut riding a horse on Mars, digital art!",
    'A neon sign that says "OPEN 24/7" in a rainy alley.',
    "Portrait of an old man, oil painting by Rembrandt (1669).",
    "It's a beautiful day; the sun's shining & birds are singing.",
    "Don't forget: 3 apples, 12 oranges and 1.5 kg of bananas.",
    "A crème brûlée on a porcelain plate, macro shot, f/2.8.",
    "The Eiffel Tower at night -- long exposure, city lights.",
    "A cozy cabin in the snowy mountains at dusk.",
    "Cyberpunk street market, Tokyo, 2077, volumetric fog.",
    "A watercolor painting of a fox in an autumn forest.",
    "Isometric 3D render of a tiny island with a lighthouse.",
    "Close-up of a hummingbird drinking nectar, 1/4000s shutter.",
    "A bowl of ramen with a soft-boiled egg, studio lighting.",
    "Vintage car parked outside a diner, Route 66, 1950s style.",
    "A dragon made of glass, glowing from within, fantasy art.",
    "Minimalist poster: a red circle on a beige background.",
    "A robot reading a book in a library; warm, soft light.",
    "Children's book illustration of a bear having a picnic.",
    "The café's menu lists piñata cake, jalapeño bread, and açaí.",
    "Aerial view of a river delta, satellite image, 10m/pixel.",
    "A samurai standing in a bamboo forest, cinematic, 35mm.",
    "A jellyfish floating in deep blue water, bioluminescent.",
    "Pixel art of a castle on a hill, 16-bit, retro game.",
    "We'll meet at the museum -- they've got a Monet exhibit.",
    "A steaming cup of coffee next to a laptop, 8:30 a.m.",
    "Snow-capped peaks reflected in a lake at sunrise.",
    "Art nouveau poster of a woman with flowers in her hair.",
    "A chess board mid-game, shallow depth of field, bokeh.",
    "Underwater photo of a coral reef with clownfish & turtles.",
    "A golden retriever puppy playing in fallen leaves.",
    "Blueprint of a steam engine, technical drawing, 1890.",
    "A futuristic city floating above the clouds, utopia.",
    "Still life: three pears, a jug and a knife (Cézanne style).",
    "Street photography, Paris, rainy day, umbrellas, b&w.",
    "A knight's helmet on a wooden table, dramatic lighting.",
    "Macro photo of a snowflake, 100x magnification!",
    "A hot air balloon over the desert at golden hour.",
    "Naïve art of a village festival with lanterns.",
    "An infographic about the water cycle, flat design, v2.0.",
]


def _corpus(n: int = 400) -> list[str]:
    """~n varied prompts built deterministically from SENTENCES."""
    out = list(SENTENCES)
    i = 0
    while len(out) < n:
        a, b = SENTENCES[i % len(SENTENCES)], SENTENCES[(7 * i + 3) % len(SENTENCES)]
        out.append(f"{a.rstrip('.!')}, {b[0].lower()}{b[1:]} #{i}")
        i += 1
    return out


CORPUS = _corpus()
UNSEEN = [
    "A cat 🐱 wearing sunglasses 😎 on the beach 🏖️",
    "猫 in 东 and 京 with ü, ß, ø, Ωμέγα and Привет мир",
    "Zürich, São Paulo & Kraków — em dash … ellipsis, 99% done",
    "ALL CAPS TEXT WITH NUMBERS 0123456789 AND SYMBOLS ~`@$^*_+={}[]|\\<>",
    "   leading and    multiple   spaces\tand\ttabs\nnewline   ",
    "x" * 400,
    "",
]
# transformers 4.x slow CLIPTokenizer differs from the fast one on these by design: without ftfy its
# BasicTokenizer splits CJK runs per character, with ftfy it uncurls quotes. Only validity is checked.
SLOW_4X_DIFFS = ["一只猫坐在桌子上", "東京タワーの夜景、シネマティック", "“curly” ‘quotes’"]
LONG = " ".join(SENTENCES)


def _classes(*names: str) -> list[type]:
    return [getattr(transformers, n) for n in names if hasattr(transformers, n)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("tok")
    times = {}
    for name, fn, kwargs in [
        ("clip_l", tt.build_clip_tokenizer, {}),
        ("clip_g", tt.build_clip_tokenizer, {"pad_token": "!"}),
        ("t5", tt.build_t5_tokenizer, {}),
    ]:
        start = time.perf_counter()
        fn(CORPUS, root / name, **kwargs)
        times[name] = time.perf_counter() - start
    return {"root": root, "times": times}


def _clip_reference_ids(folder: Path, text: str) -> list[int]:
    """Stand-alone OpenAI/transformers-4.x-slow CLIP BPE on vocab.json + merges.txt (no ftfy)."""
    enc = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:]
    ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = sorted({v["content"] for v in cfg["added_tokens_decoder"].values()}, key=len, reverse=True)
    b2u = tt.bytes_to_unicode()
    pat = regex.compile(tt._CLIP_PATTERN, regex.IGNORECASE)
    ids = [enc[tt.CLIP_BOS]]
    for part in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if part in specials:
            ids.append(enc[part])
            continue
        clean = "".join(
            " " if c.isspace() else c
            for c in part
            if not (unicodedata.category(c).startswith("C") and c not in "\t\n\r")
        )
        words = " ".join(w.lower() for w in unicodedata.normalize("NFC", clean).split())
        for tok in pat.findall(words):
            word = [b2u[b] for b in tok.encode("utf-8")]
            word[-1] += "</w>"
            while len(word) > 1:
                pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(word, word[1:]))]
                rank, _ = min(pairs)
                if rank == 1 << 30:
                    break
                best, out, i = lines[rank].split(), [], 0
                while i < len(word):
                    if i + 1 < len(word) and [word[i], word[i + 1]] == best:
                        out.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        out.append(word[i])
                        i += 1
                word = out
            ids.extend(enc.get(w, enc[tt.CLIP_EOS]) for w in word)
    return ids + [enc[tt.CLIP_EOS]]


def _encode(tok: object, text: str, max_length: int) -> list[int]:
    return tok(text, padding="max_length", max_length=max_length, truncation=True)["input_ids"]


@pytest.mark.parametrize("name", ["clip_l", "clip_g", "t5"])
def test_build_time(built: dict, name: str) -> None:
    assert built["times"][name] < 5.0, built["times"]


@pytest.mark.parametrize("name,pad", [("clip_l", "<|endoftext|>"), ("clip_g", "!")])
def test_clip_layout_and_encoding(built: dict, name: str, pad: str) -> None:
    folder = built["root"] / name
    assert sorted(p.name for p in folder.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    order = sorted(vocab, key=vocab.get)
    base = list(tt.bytes_to_unicode().values())
    assert merges[0] == "#version: 0.2" and vocab["!"] == 0
    assert order[:512] == base + [c + "</w>" for c in base]
    assert order[512:-2] == ["".join(m.split()) for m in merges[1:]]
    assert order[-2:] == ["<|startoftext|>", "<|endoftext|>"] and len(order) <= 1000
    assert sorted(vocab.values()) == list(range(len(vocab)))
    classes = _classes("CLIPTokenizer", "CLIPTokenizerFast")
    toks = [cls.from_pretrained(folder) for cls in classes]
    assert len(toks) == 2
    for tok in toks:
        assert len(tok) == len(vocab) == tt.tokenizer_vocab_size(folder)
        assert tok.model_max_length == 77 and tok.pad_token == pad
        assert tok.bos_token == "<|startoftext|>" and tok.eos_token == tok.unk_token == "<|endoftext|>"
    bos, eos, pad_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab[pad]
    assert (pad_id == 0) == (pad == "!")
    for text in CORPUS + UNSEEN + SLOW_4X_DIFFS + [LONG]:
        all_ids = [_encode(tok, text, 77) for tok in toks]
        ids = all_ids[0]
        assert len(ids) == 77 and all(0 <= i < len(vocab) for i in ids), text
        n = len(toks[0](text, truncation=True, max_length=77)["input_ids"])
        assert ids[0] == bos and ids[n - 1] == eos and ids[n:] == [pad_id] * (77 - n), text
        if text in SLOW_4X_DIFFS:
            continue
        assert all(other == ids for other in all_ids[1:]), text
        assert toks[0](text)["input_ids"] == _clip_reference_ids(folder, text), text
    assert n == 77  # LONG was truncated, still ends with eos


def test_t5_layout_and_encoding(built: dict) -> None:
    folder = built["root"] / "t5"
    names = {p.name for p in folder.iterdir()}
    assert {"spiece.model", "tokenizer_config.json", "special_tokens_map.json"} <= names
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"] and sp.bos_id() == -1
    toks = [cls.from_pretrained(folder) for cls in _classes("T5TokenizerFast", "T5Tokenizer")]
    assert len(toks) == 2
    size = sp.get_piece_size() + 100
    for tok in toks:
        assert len(tok) == size == tt.tokenizer_vocab_size(folder)
        assert tok.convert_tokens_to_ids("<extra_id_0>") == size - 1
        assert tok.convert_tokens_to_ids("<extra_id_99>") == size - 100
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    for text in CORPUS + UNSEEN + SLOW_4X_DIFFS + [LONG]:
        all_ids = [_encode(tok, text, 128) for tok in toks]
        ids = all_ids[0]
        assert all(other == ids for other in all_ids[1:]), text
        assert len(ids) == 128 and all(0 <= i < size for i in ids), text
        raw = toks[0](text)["input_ids"]
        if len(raw) <= 128:
            assert raw == sp.encode(text) + [1], text
            assert ids == raw + [0] * (128 - len(raw)), text
        else:
            assert ids[-1] == 1
    assert toks[0]("a cat <extra_id_0>")["input_ids"][-2:] == [size - 1, 1]


@pytest.mark.parametrize("name,fn,kwargs", [
    ("clip_g", tt.build_clip_tokenizer, {"pad_token": "!"}),
    ("t5", tt.build_t5_tokenizer, {}),
])
def test_deterministic_rebuild(built: dict, tmp_path: Path, name: str, fn, kwargs: dict) -> None:
    fn(CORPUS, tmp_path / name, **kwargs)
    first, second = built["root"] / name, tmp_path / name
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())
    for path in first.iterdir():
        assert path.read_bytes() == (second / path.name).read_bytes(), path.name


def test_out_dir_must_be_absent_or_empty(tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="busy"):
        tt.build_clip_tokenizer(SENTENCES, target)
    with pytest.raises(FileExistsError, match="busy"):
        tt.build_t5_tokenizer(SENTENCES, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    tt.build_clip_tokenizer(SENTENCES, empty, vocab_size=600)
    assert (empty / "vocab.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]  # no temp dirs left
