"""Tokenizers and SD3 prompt assembly (shared by every backend).

SD3 conditioning: CLIP-L and CLIP-G penultimate hidden states concatenated on channels (768+1280
= 2048), zero-padded to the T5 width (4096), then T5 tokens appended on the sequence axis ->
[B, 77+T, 4096]; pooled = pooled CLIP-L ++ pooled CLIP-G -> [B, 2048]. Without T5 the T5 part is
zeros, as diffusers does.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .backends.base import Backend
from .checkpoint import Checkpoint
from .config import VariantConfig
from .errors import CheckpointError

log = logging.getLogger(__name__)

# Tokenizer classes a model_index.json may name; anything else is refused.
_ALLOWED = {"CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast"}


class Tokenizer:
    """A transformers tokenizer behind a lock (Rust tokenizers are not re-entrant)."""

    def __init__(self, folder: Path, cls_name: str) -> None:
        import transformers

        if cls_name not in _ALLOWED:
            raise CheckpointError(f"{folder}: tokenizer class {cls_name!r} is not one of {sorted(_ALLOWED)}")
        if not folder.is_dir():
            raise CheckpointError(f"tokenizer folder {folder} is missing")
        self.folder = folder
        self._tok = getattr(transformers, cls_name).from_pretrained(folder)
        self._lock = threading.Lock()

    def __call__(self, texts: list[str], max_length: int) -> torch.Tensor:
        """input_ids [B, max_length]: padded, truncated (with a warning), special tokens added."""
        with self._lock:
            ids = self._tok(
                texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            ).input_ids
            full = self._tok(texts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            log.warning("%s: prompt truncated to %d tokens", self.folder.name, max_length)
        return ids


def load_tokenizers(source: Checkpoint | str | Path) -> tuple[Tokenizer, Tokenizer, Tokenizer | None]:
    """The CLIP-L, CLIP-G and T5 tokenizers of a `Checkpoint` (or of the model at a path: a
    diffusers folder or a single file); T5's is None when the checkpoint has none."""
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint.open(source)
    dirs, classes = ckpt.tokenizer_dirs(), ckpt.tokenizer_classes()
    tl, tg, t5 = (Tokenizer(d, c) if d is not None else None for d, c in zip(dirs, classes))
    return tl, tg, t5


class PromptEncoder:
    """Turns prompt lists into (context [B, 77+T, 4096], pooled [B, 2048]) with a backend."""

    def __init__(self, config: VariantConfig, tokenizers: tuple, backend: Backend) -> None:
        self.config = config
        self.tok_l, self.tok_g, self.tok_t5 = tokenizers
        self.backend = backend

    def __call__(
        self, prompts: Sequence[str], prompts_2: Sequence[str], prompts_3: Sequence[str], max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dev, n_clip = self.backend.device, self.config.clip_tokens
        hidden_l, pooled_l = self.backend.clip_l(self.tok_l(list(prompts), n_clip).to(dev))
        hidden_g, pooled_g = self.backend.clip_g(self.tok_g(list(prompts_2), n_clip).to(dev))
        clip = torch.cat([hidden_l.float(), hidden_g.float()], dim=-1)  # [B, 77, 2048]
        joint = self.config.joint_dim
        if self.backend.t5 is not None and self.tok_t5 is not None:
            t5 = self.backend.t5(self.tok_t5(list(prompts_3), max_sequence_length).to(dev)).float()
        else:
            t5 = torch.zeros(len(prompts), max_sequence_length, joint, device=dev)  # [B, T, 4096]
        clip = F.pad(clip, (0, joint - clip.shape[-1]))  # [B, 77, 4096]
        context = torch.cat([clip, t5], dim=-2)  # [B, 77+T, 4096]
        pooled = torch.cat([pooled_l.float(), pooled_g.float()], dim=-1)  # [B, 2048]
        return context, pooled
