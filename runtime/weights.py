"""Loading weights: safetensors only (never pickle), sharded or not, straight into a module; and
the one name table between Stability AI single files and diffusers, read in both directions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .errors import CheckpointError


def component_files(folder: Path) -> list[Path]:
    """The safetensors files of one diffusers component folder (shards listed by its index)."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files or not all(f.is_file() for f in files):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {pickles}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"no safetensors weights in {folder}{hint}")
    return files


def load_state_dict(folder: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors of a component folder whose name starts with `prefix` (prefix kept)."""
    state: dict[str, torch.Tensor] = {}
    for f in component_files(folder):
        state.update({k: v for k, v in load_file(f).items() if k.startswith(prefix)})
    return state


def load_module(
    module: nn.Module, state: dict[str, torch.Tensor], source: Path, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """Strictly load `state` into `module` and move it; names the file and keys on a mismatch."""
    own = set(module.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match {type(module).__name__} "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); is this an SD3.5 checkpoint "
            f"whose config (config.json, or the shapes of a single file) matches its weights?"
        )
    for name, tensor in module.state_dict().items():
        if tensor.shape != state[name].shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(state[name].shape)}, the config implies "
                f"{tuple(tensor.shape)}; config.json and weights disagree"
            )
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


_IGNORED = ("text_model.embeddings.position_ids", "scaled_fp8")  # buffers / markers, not weights


def finish_text_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A text encoder's tensors ready for transformers: FP8 weights upcast to `dtype` (times their
    `scale_weight`, as in ComfyUI's scaled-fp8 files), markers dropped, and T5's tied embedding
    under both of its names."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key in _IGNORED or key.endswith((".scale_weight", ".scale_input")):
            continue
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = state.get(key[: -len("weight")] + "scale_weight") if key.endswith("weight") else None
            t = t.float() * scale.float() if scale is not None else t.float()
            t = t.to(dtype)
        out[key] = t
    if "shared.weight" in out or "encoder.embed_tokens.weight" in out:  # T5: tied embedding
        shared = out.setdefault("shared.weight", out.get("encoder.embed_tokens.weight"))
        out.setdefault("encoder.embed_tokens.weight", shared)
    return out



# --- Reading only part of a file -------------------------------------------------------------
def read_header(file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a safetensors file, without loading any tensor."""
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            return shapes, dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({exc}); re-download it or convert it to "
            f"safetensors"
        ) from exc


def load_prefixed(file: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of `file` whose name starts with `prefix`, with the prefix removed."""
    with safe_open(str(file), framework="pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def read_tensor(files: list[Path], key: str) -> torch.Tensor | None:
    """The tensor `key` of the first of `files` that holds it, read alone; None when none does."""
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    return None


# --- Stability AI (single-file) names <-> diffusers names: ONE table, read both ways ---------
# A row is (SAI template, diffusers template, op). Fields in braces are matched on one side and
# written on the other: {i} {j} block numbers; {r} an LDM decoder level, numbered the other way
# round from diffusers' up_blocks (r <-> n_up - 1 - r, its own inverse); {p} weight|bias;
# {s} encoder|decoder; {m} a resnet part; {n} q|k; {a} q|k|v; {x} the q/k/v of a fused qkv;
# {last} is the number of the final MMDiT block. Ops (each direction derives from the op):
#   qkv  - one fused SAI tensor [3D, ...] <-> diffusers q, k, v [D, ...] (chunk / cat on dim 0)
#   swap - SAI adaLN (shift, scale) halves <-> diffusers (scale, shift) (AdaLayerNormContinuous)
#   conv - LDM 1x1 conv [C, C, 1, 1] <-> diffusers linear [C, C] (VAE mid-block attention)
_FIELDS = {
    "i": r"\d+", "j": r"\d+", "r": r"\d+", "p": "weight|bias", "s": "encoder|decoder",
    "m": "norm1|conv1|norm2|conv2", "n": "q|k", "a": "q|k|v", "x": "q|k|v",
}
_B, _T = "joint_blocks.{i}.", "transformer_blocks.{i}."
MMDIT_SAI_NAMES: tuple[tuple[str, str, str], ...] = (
    ("pos_embed", "pos_embed.pos_embed", ""),
    ("x_embedder.proj.{p}", "pos_embed.proj.{p}", ""),
    ("t_embedder.mlp.0.{p}", "time_text_embed.timestep_embedder.linear_1.{p}", ""),
    ("t_embedder.mlp.2.{p}", "time_text_embed.timestep_embedder.linear_2.{p}", ""),
    ("y_embedder.mlp.0.{p}", "time_text_embed.text_embedder.linear_1.{p}", ""),
    ("y_embedder.mlp.2.{p}", "time_text_embed.text_embedder.linear_2.{p}", ""),
    ("context_embedder.{p}", "context_embedder.{p}", ""),
    ("final_layer.linear.{p}", "proj_out.{p}", ""),
    ("final_layer.adaLN_modulation.1.{p}", "norm_out.linear.{p}", "swap"),
    # the last block is context_pre_only: its context adaLN has only (shift, scale)
    ("joint_blocks.{last}.context_block.adaLN_modulation.1.{p}",
     "transformer_blocks.{last}.norm1_context.linear.{p}", "swap"),
    *((_B + sai, _T + dif, op) for sai, dif, op in (
        ("x_block.adaLN_modulation.1.{p}", "norm1.linear.{p}", ""),
        ("context_block.adaLN_modulation.1.{p}", "norm1_context.linear.{p}", ""),
        ("x_block.attn.qkv.{p}", "attn.to_{x}.{p}", "qkv"),
        ("context_block.attn.qkv.{p}", "attn.add_{x}_proj.{p}", "qkv"),
        ("x_block.attn2.qkv.{p}", "attn2.to_{x}.{p}", "qkv"),  # MMDiT-X (Medium)
        ("x_block.attn.ln_{n}.weight", "attn.norm_{n}.weight", ""),
        ("context_block.attn.ln_{n}.weight", "attn.norm_added_{n}.weight", ""),
        ("x_block.attn2.ln_{n}.weight", "attn2.norm_{n}.weight", ""),
        ("x_block.attn.proj.{p}", "attn.to_out.0.{p}", ""),
        ("context_block.attn.proj.{p}", "attn.to_add_out.{p}", ""),
        ("x_block.attn2.proj.{p}", "attn2.to_out.0.{p}", ""),
        ("x_block.mlp.fc1.{p}", "ff.net.0.proj.{p}", ""),
        ("x_block.mlp.fc2.{p}", "ff.net.2.{p}", ""),
        ("context_block.mlp.fc1.{p}", "ff_context.net.0.proj.{p}", ""),
        ("context_block.mlp.fc2.{p}", "ff_context.net.2.{p}", ""),
    )),
)
_MID = "{s}.mid_block."
VAE_SAI_NAMES: tuple[tuple[str, str, str], ...] = (
    ("{s}.conv_in.{p}", "{s}.conv_in.{p}", ""),
    ("{s}.conv_out.{p}", "{s}.conv_out.{p}", ""),
    ("{s}.norm_out.{p}", "{s}.conv_norm_out.{p}", ""),
    ("{s}.mid.block_1.{m}.{p}", _MID + "resnets.0.{m}.{p}", ""),
    ("{s}.mid.block_2.{m}.{p}", _MID + "resnets.1.{m}.{p}", ""),
    ("{s}.mid.attn_1.norm.{p}", _MID + "attentions.0.group_norm.{p}", ""),
    ("{s}.mid.attn_1.{a}.{p}", _MID + "attentions.0.to_{a}.{p}", "conv"),
    ("{s}.mid.attn_1.proj_out.{p}", _MID + "attentions.0.to_out.0.{p}", "conv"),
    ("encoder.down.{i}.block.{j}.{m}.{p}", "encoder.down_blocks.{i}.resnets.{j}.{m}.{p}", ""),
    ("encoder.down.{i}.block.{j}.nin_shortcut.{p}", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{p}", ""),
    ("encoder.down.{i}.downsample.conv.{p}", "encoder.down_blocks.{i}.downsamplers.0.conv.{p}", ""),
    ("decoder.up.{r}.block.{j}.{m}.{p}", "decoder.up_blocks.{r}.resnets.{j}.{m}.{p}", ""),
    ("decoder.up.{r}.block.{j}.nin_shortcut.{p}", "decoder.up_blocks.{r}.resnets.{j}.conv_shortcut.{p}", ""),
    ("decoder.up.{r}.upsample.conv.{p}", "decoder.up_blocks.{r}.upsamplers.0.conv.{p}", ""),
)


def _pattern(template: str, fixed: dict[str, int]) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    rx = "".join(
        re.escape(part) if k % 2 == 0
        else re.escape(str(fixed[part])) if part in fixed
        else f"(?P<{part}>{_FIELDS[part]})"
        for k, part in enumerate(parts)
    )
    return re.compile(rx + "$")


def _convert(op: str, t: torch.Tensor, to_sai: bool) -> torch.Tensor:
    if op == "swap":
        first, second = t.chunk(2, dim=0)
        return torch.cat([second, first], dim=0)
    if op == "conv":
        return t[:, :, None, None] if to_sai and t.dim() == 2 else t[:, :, 0, 0] if t.dim() == 4 else t
    return t


def rename_state(
    state: dict[str, torch.Tensor], table: tuple[tuple[str, str, str], ...], to: str, source: Path | str,
    last: int = -1, n_up: int = 0,
) -> dict[str, torch.Tensor]:
    """Rename `state` to "diffusers" or to "sai" names with one of the tables above. `last` is the
    final MMDiT block's number, `n_up` the number of VAE decoder levels. Unknown names raise."""
    to_sai = to == "sai"
    fixed = {"last": last}
    rows = [(sai, dif, op) if to_sai else (dif, sai, op) for sai, dif, op in table]  # (dst, src, op)
    rows = [(_pattern(src, fixed), src, dst, op) for dst, src, op in rows]
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, tensor in state.items():
        hit = next(((m, src, dst, op) for rx, src, dst, op in rows if (m := rx.match(key))), None)
        if hit is None or (op := hit[3]) == "qkv" and to_sai and hit[0]["x"] != "q":
            continue  # unknown, or k/v of a fused qkv (gathered at q)
        m, src, dst, _ = hit
        fields = {**m.groupdict(), **fixed}
        if "r" in fields:
            fields["r"] = str(n_up - 1 - int(fields["r"]))
        if op != "qkv":
            out[dst.format(**fields)] = _convert(op, tensor, to_sai)
        elif not to_sai:  # one fused tensor -> q, k, v
            for x, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[dst.format(**{**fields, "x": x})] = part
        else:  # q, k, v -> one fused tensor
            names = [src.format(**{**fields, "x": x}) for x in "qkv"]
            if not all(n in state for n in names):
                continue
            out[dst.format(**fields)] = torch.cat([state[n] for n in names], dim=0)
            used.update(names)
        used.add(key)
    unknown = [k for k in state if k not in used]
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} tensor name(s) are not part of SD3.5 "
            f"({unknown[:5]}{'...' if len(unknown) > 5 else ''}); is this an SD3.5 checkpoint?"
        )
    return out


def read_renamed(file: Path, prefix: str, key: str, table: tuple[tuple[str, str, str], ...],
                 last: int = -1) -> torch.Tensor | None:
    """The tensor `rename_state(…, "diffusers")` names `key`, read alone from the SAI file `file`
    (its names under `prefix`); None when the file lacks it."""
    fixed = {"last": last}
    for sai, dif, op in table:
        m = _pattern(dif, fixed).match(key)
        if m is None:
            continue
        fields = {**m.groupdict(), **fixed}
        t = read_tensor([file], prefix + sai.format(**fields))
        if t is None or op != "qkv":
            return t if t is None else _convert(op, t, False)
        return t.chunk(3, dim=0)["qkv".index(fields["x"])]
    return None
