"""Train tiny, real-format SD3.5 tokenizers (CLIP BPE and T5 sentencepiece) from a prompt corpus.

The folders mirror the layout of the ``tokenizer``/``tokenizer_2``/``tokenizer_3`` folders of the
SD3.5 diffusers repositories, so transformers 4.44+ and 5.x load them with the usual classes.
Everything is deterministic: building twice from the same corpus gives byte-identical files.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

_LOG = logging.getLogger(__name__)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
_EOW = "</w>"
# The pre-tokenisation regex of OpenAI CLIP (and of transformers' CLIPTokenizer/-Fast).
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table, in the canonical order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_word_counts(corpus: Sequence[str]) -> collections.Counter[str]:
    """Byte-level words of the corpus, normalised and split exactly like CLIPTokenizerFast does."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    counts: collections.Counter[str] = collections.Counter()
    for text in corpus:
        counts.update(word for word, _ in split.pre_tokenize_str(norm.normalize_str(text)))
    return counts


def _pairs(symbols: Sequence[str]) -> collections.Counter[tuple[str, str]]:
    return collections.Counter(zip(symbols, symbols[1:]))


def _merge_word(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Merge every occurrence of ``pair`` in ``symbols``, left to right (as CLIP's ``bpe`` does)."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _learn_bpe(words: collections.Counter[str], n_merges: int, known: set[str]) -> list[tuple[str, str]]:
    """Greedy BPE merge learning (most frequent pair, ties -> smallest pair); one new token per merge.

    ``known`` holds the tokens already in the vocab; a pair whose merge result is already known is
    banned, so that every merge adds exactly one vocab entry (as in OpenAI CLIP's vocab).
    """
    entries = [(list(w[:-1]) + [w[-1] + _EOW], c) for w, c in sorted(words.items())]
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for idx, (symbols, freq) in enumerate(entries):
        for pair, k in _pairs(symbols).items():
            counts[pair] += k * freq
            where[pair].add(idx)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    known, banned, merges = set(known), set(), []
    while len(merges) < n_merges and heap:
        neg, best = heapq.heappop(heap)
        if counts.get(best) != -neg:
            continue  # stale heap entry
        if -neg < 2:
            break
        del counts[best]
        banned.add(best)  # merged away (or refused): never counted again
        if best[0] + best[1] in known:
            continue
        merges.append(best)
        known.add(best[0] + best[1])
        changed = set()
        for idx in sorted(where.pop(best, ())):
            symbols, freq = entries[idx]
            merged = _merge_word(symbols, best)
            entries[idx] = (merged, freq)
            for sign, word in ((-1, symbols), (1, merged)):
                for pair, k in _pairs(word).items():
                    if pair not in banned:
                        counts[pair] += sign * k * freq
                        where[pair].add(idx)
                        changed.add(pair)
        for pair in sorted(changed):
            if counts[pair] > 0:
                heapq.heappush(heap, (-counts[pair], pair))
            else:
                del counts[pair]
    return merges


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``out_dir``; on success rename it to ``out_dir`` (must be absent/empty)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _added_token(content: str, normalized: bool = False) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": True}


def build_clip_tokenizer(
    corpus: Sequence[str], out_dir: Path, *, vocab_size: int = 1000, pad_token: str = CLIP_EOS
) -> None:
    """Write an OpenAI-CLIP-format BPE tokenizer (vocab.json, merges.txt, configs) to ``out_dir``.

    Vocab order: 256 byte characters, the same with ``</w>``, one token per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>``. The vocab has at most ``vocab_size`` entries
    (fewer if the corpus runs out of pairs seen at least twice).
    """
    base = list(bytes_to_unicode().values())
    vocab = base + [c + _EOW for c in base]
    if vocab_size < len(vocab) + 2:
        raise ValueError(f"vocab_size must be >= {len(vocab) + 2}, got {vocab_size}")
    merges = _learn_bpe(_clip_word_counts(corpus), vocab_size - len(vocab) - 2, set(vocab))
    vocab += [a + b for a, b in merges] + [CLIP_BOS, CLIP_EOS]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    if pad_token not in encoder:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocab")
    # Configs are written in the layout transformers 4.x save_pretrained produces (as SD3.5 ships);
    # 5.x's own output ("backend", list-valued "extra_special_tokens") does not load in 4.x.
    specials = {encoder[CLIP_BOS]: _added_token(CLIP_BOS, True), encoder[CLIP_EOS]: _added_token(CLIP_EOS, True)}
    specials.setdefault(encoder[pad_token], _added_token(pad_token))
    config = {
        "added_tokens_decoder": {str(i): specials[i] for i in sorted(specials)},
        "bos_token": CLIP_BOS, "clean_up_tokenization_spaces": True, "do_lower_case": True,
        "eos_token": CLIP_EOS, "errors": "replace", "model_max_length": CLIP_MAX_LENGTH,
        "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer", "unk_token": CLIP_EOS,
    }
    with _staging(out_dir) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(encoder, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
        (tmp / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json", config)
        _write_json(tmp / "special_tokens_map.json",
                    {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": pad_token, "unk_token": CLIP_EOS})
    _LOG.info("CLIP tokenizer: %d tokens (%d merges) -> %s", len(vocab), len(merges), out_dir)


def _train_spm(corpus: Sequence[str], vocab_size: int) -> bytes:
    """Train a T5-style sentencepiece unigram model in memory and return the serialized proto."""
    import sentencepiece as spm

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([s for s in corpus if s.strip()]), model_writer=buf,
            model_type="unigram", vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            byte_fallback=False, num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
            minloglevel=2,  # silences the C++ trainer log; this level is process-global ...
        )
    finally:
        spm.set_min_log_level(0)  # ... and has no getter, so restore sentencepiece's default
    return buf.getvalue()


def build_t5_tokenizer(corpus: Sequence[str], out_dir: Path, *, vocab_size: int = 600, extra_ids: int = 100) -> None:
    """Write a T5 sentencepiece tokenizer (spiece.model, tokenizer.json, configs) to ``out_dir``.

    Ids: <pad>=0, </s>=1, <unk>=2, then the learned pieces, then ``extra_ids`` sentinels with
    ``<extra_id_0>`` as the last id. ``vocab_size`` is a soft limit on the sentencepiece vocab.
    """
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    model = _train_spm(corpus, vocab_size)
    n_pieces = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    decoder = {0: _added_token("<pad>"), 1: _added_token("</s>"), 2: _added_token("<unk>")}
    decoder.update({n_pieces + extra_ids - 1 - i: _added_token(tok) for i, tok in enumerate(sentinels)})
    config = {
        "added_tokens_decoder": {str(i): decoder[i] for i in sorted(decoder)},
        "additional_special_tokens": sentinels, "clean_up_tokenization_spaces": True,
        "eos_token": "</s>", "extra_ids": extra_ids, "legacy": True, "model_max_length": T5_MAX_LENGTH,
        "pad_token": "<pad>", "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>",
    }
    with _staging(out_dir) as tmp:
        (tmp / "spiece.model").write_bytes(model)
        _write_json(tmp / "tokenizer_config.json", config)
        _write_json(tmp / "special_tokens_map.json", {"additional_special_tokens": sentinels,
                    "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
        # The fast tokenizer's own save_pretrained produces tokenizer.json; its configs are not
        # kept because their format differs between transformers 4.x and 5.x.
        scratch = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=f".{tmp.name}.fast."))
        try:
            T5TokenizerFast.from_pretrained(str(tmp)).save_pretrained(str(scratch))
            if (scratch / "tokenizer.json").is_file():
                shutil.copyfile(scratch / "tokenizer.json", tmp / "tokenizer.json")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    _LOG.info("T5 tokenizer: %d pieces + %d sentinels -> %s", n_pieces, extra_ids, out_dir)


def tokenizer_vocab_size(folder: Path) -> int:
    """Number of ids the tokenizer in ``folder`` can emit (``len(tokenizer)``)."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(folder)))
