"""manifest.json of an exported ONNX folder (`sd35trt export`): read, written and checked here only.

The manifest is rewritten atomically after every finished component, so an interrupted export
keeps what it finished; a component is trusted only when its entry exists and its graph and
external-data files have the recorded sha256, so a file that changed after export (a partial
write, a flipped byte, a copy from elsewhere) is never used or kept.

`HashCache` (`.sd35trt-hashes.json` beside the graphs) remembers, per file, a sha256 computed in
full together with the file's stat stamp (size, mtime, ctime, inode, device). While the stamp is
unchanged the file has not been written, renamed or replaced since it was hashed (any write moves
its ctime, which no user call can set back), so loads after the first skip the hashing; a copied
folder (new inodes) or a touched file is hashed again. Decay of the storage itself after a file was
hashed is outside what a stamp sees: `verify="full"` hashes every time.
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .config import VariantConfig
from .errors import CheckpointError
from .files import MANIFEST, file_matches, read_json, sha256_file, write_json_atomic

FORMAT = "sd35trt-onnx/1"
HASH_CACHE = ".sd35trt-hashes.json"


def stamp(path: Path) -> list[int]:
    """What changes whenever a file's content may have: size, mtime, ctime (ns), inode, device."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def hash_stamped(path: Path) -> tuple[str, list[int] | None]:
    """(sha256, the stamp it belongs to), the stamp None when the file changed while being hashed."""
    before = stamp(path)
    digest = sha256_file(path)
    return digest, before if stamp(path) == before else None


class HashCache:
    """Full sha256s of a folder's files, trusted while each file's stamp is unchanged (see above).
    Saving is best effort: a read-only folder just gets hashed on every load."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        doc = read_json(self.folder / HASH_CACHE)
        self.entries: dict[str, Any] = doc if isinstance(doc, dict) else {}
        self._changed = False

    def get(self, name: str) -> str | None:
        """The file's sha256 if it was hashed in full since it last changed, else None."""
        e = self.entries.get(name)
        path = self.folder / name
        if not isinstance(e, dict) or not path.is_file():
            return None
        return e.get("sha256") if e.get("stamp") == stamp(path) else None

    def put(self, name: str, sha256: str, file_stamp: list[int] | None = None) -> None:
        """Record a full hash of `name` (taken with `file_stamp`, default: the file as it is now)."""
        stamped = file_stamp if file_stamp is not None else stamp(self.folder / name)
        self.entries[name] = {"sha256": sha256, "stamp": stamped}
        self._changed = True

    def save(self) -> None:
        if not self._changed:
            return
        try:
            write_json_atomic(self.folder / HASH_CACHE, self.entries)
            self._changed = False
        except OSError:
            pass


def read_document(folder: Path, fmt: str, error: type[Exception], missing: str, foreign: str) -> dict[str, Any]:
    """The JSON of `folder/manifest.json` in format `fmt`; `error` with `missing` / `foreign` (the
    fix) appended when it is absent or of another format."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise error(f"{path} is missing{missing}")
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        got = doc.get("format") if isinstance(doc, dict) else "not JSON"
        raise error(f"{path}: format {got!r}, {foreign}")
    return doc


def entry_from_dict(cls: type, d: Mapping[str, Any], path: Path, error: type[Exception], fix: str):
    """A manifest entry dataclass from its JSON object; a missing key names the file and the fix."""
    names = {f.name for f in fields(cls)}
    missing = sorted(f.name for f in fields(cls) if f.name not in d and f.default is f.default_factory is MISSING)
    if missing:
        raise error(f"{path}: an entry lacks {missing}; the manifest is incomplete or from another version; {fix}")
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class ExportEntry:
    """One exported component: its graph file (and external weights), content hash, what went in."""

    file: str
    sha256: str
    bytes: int
    precision: str  # "fp8" (Q/DQ MMDiT) or the export dtype
    fingerprint: str  # hash of the sources, options and calibration it was made from
    data: str | None = None  # external-data file beside `file`, when the weights exceed 1 GiB
    data_sha256: str | None = None  # of `data`
    qdq_pairs: int = 0
    fp8_weights: int = 0
    quantized_linears: list[str] = field(default_factory=list)

    def hashed_files(self) -> list[tuple[str, str | None]]:
        """(file name, recorded sha256) of the graph and, when it has one, its external data."""
        return [(self.file, self.sha256)] + ([(self.data, self.data_sha256)] if self.data else [])

    def is_fresh(self, folder: Path, fingerprint: str, hashes: HashCache | None = None) -> bool:
        """Made from the same inputs, and its files are still the ones written (`hashes`: full
        hashes known for files unchanged since)."""
        def same(name: str, digest: str | None) -> bool:
            known = hashes.get(name) if hashes is not None else None
            return digest is not None and (known == digest if known else file_matches(Path(folder) / name, digest))

        return self.fingerprint == fingerprint and all(same(n, d) for n, d in self.hashed_files())

    def content_digest(self, folder: Path, fix: str, digests: Mapping[str, str] | None = None) -> str:
        """The content hash of graph + external data (the graph's sha256 when it has none), after
        checking both against the manifest; CheckpointError naming the file and `fix` otherwise.
        `digests` (file name -> sha256) are hashes already computed, e.g. on other threads."""
        got = {}
        for name, want in self.hashed_files():
            path = Path(folder) / name
            if not path.is_file():
                raise CheckpointError(f"{path} is missing; {fix}")
            if want is None:
                raise CheckpointError(f"{path}: the manifest records no content hash for it (an export made "
                                      f"before external data was hashed); {fix}")
            got[name] = digests[name] if digests and name in digests else sha256_file(path)
            if got[name] != want:
                raise CheckpointError(f"{path} does not match {Path(folder) / MANIFEST} (sha256 {got[name][:12]}…, "
                                      f"recorded {want[:12]}…): it changed after export (corrupted, truncated "
                                      f"or replaced); {fix}")
        if not self.data:
            return got[self.file]
        return hashlib.sha256(f"{got[self.file]}:{got[self.data]}".encode()).hexdigest()


@dataclass(frozen=True)
class ExportManifest:
    variant: VariantConfig
    precision: str  # fp8 | bf16 | fp16 | fp32
    dtype: str  # precision of everything not in FP8: fp32 | fp16 | bf16
    source: str  # the checkpoint it was exported from
    components: Mapping[str, ExportEntry]
    format: str = FORMAT
    loras: list = field(default_factory=list)  # [{file, sha256, scale}] fused before calibration (export/loras.py)
    controlnet: dict | None = None  # {source, sha256, residuals, spec} (runtime/control_graph.py)

    @classmethod
    def load(cls, folder: str | Path) -> ExportManifest:
        doc = read_document(folder, FORMAT, CheckpointError,
                            f"; export the model first: sd35trt export --model … --out {folder}",
                            f"this reads {FORMAT!r}; re-export with `sd35trt export --model … --out {folder}`")
        return cls.from_dict(doc, Path(folder) / MANIFEST)

    @classmethod
    def load_existing(cls, folder: Path) -> ExportManifest | None:
        """The folder's manifest if it is a readable one of this format, else None (start afresh)."""
        try:
            return cls.load(folder)
        except CheckpointError:
            return None

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], path: Path) -> ExportManifest:
        fix = f"re-export with `sd35trt export --out {path.parent}`"
        try:
            variant = VariantConfig.from_dict(doc["variant"])
            comps = {c: entry_from_dict(ExportEntry, e, path, CheckpointError, fix) for c, e in doc["components"].items()}
            return cls(variant, doc["precision"], doc["dtype"], doc["source"], comps, loras=list(doc.get("loras", [])),
                       controlnet=doc.get("controlnet") or None)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc}); {fix}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "variant": self.variant.to_dict(), "precision": self.precision,
                "dtype": self.dtype, "source": self.source,
                "components": {c: asdict(e) for c, e in self.components.items()},
                **({"loras": list(self.loras)} if self.loras else {}),
                **({"controlnet": dict(self.controlnet)} if self.controlnet else {})}

    def save(self, folder: Path) -> None:
        write_json_atomic(Path(folder) / MANIFEST, self.to_dict())

    def export_command(self, folder: str | Path, controlnet: str | Path | None = None) -> str:
        """The `sd35trt export` command that (re)makes this export in `folder` (the folder in use,
        wherever it was first written); `controlnet`: with that ControlNet instead of its own."""
        argv = ["sd35trt", "export", "--model", self.source or "MODEL", "--out", str(folder),
                "--precision", self.precision]
        if self.precision == "fp8":
            argv += ["--dtype", self.dtype]
        if "t5" not in self.components:
            argv.append("--no-t5")
        for lora in self.loras:
            argv += ["--lora", f"{lora['file']}:{lora['scale']:g}"]
        controlnet = controlnet or (self.controlnet or {}).get("source")
        if controlnet:
            argv += ["--controlnet", str(controlnet)]
        return shlex.join(argv)
