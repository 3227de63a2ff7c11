"""Load any checkpoint of the NAFNet family without executing code, infer its configuration from tensor shapes
(NAFNet, Baseline, NAFNetSR, NAFSSR), identify it.

Accepted layouts: the official ``torch.save({'params': sd})``, BasicSR's ``params_ema``, other trainers'
``state_dict`` / ``model`` / ``net`` wrappers, a raw state dict, keys with a ``module.`` (or any other)
prefix, and ``.safetensors`` files (whose ``config`` metadata, when present, supplies arch and train size).
Pickles are opened with ``torch.load(weights_only=True)``: a file that needs code execution is refused.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import numbers
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import torch

from nafnet_edge import defaults
from nafnet_edge.archs import ARCHS, CLASS_NAMES, Arch, local_arch
from nafnet_edge.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NonFiniteWeightsError,
    NotNAFNetError,
    OptionError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    first_sentence,
)
from nafnet_edge.model import NAFNetConfig, RestorationNet, build_model
from nafnet_edge.releases import (
    RELEASE_SHAPES,
    Release,
    release_by_sha256,
    releases_with_shape,
    shapes_like,
)
from nafnet_edge.sniff import looks_like_text

DEFAULT_CHECKPOINT_NAME = defaults.SHIPPED_MODELS["denoise-s"]
WRAPPER_KEYS = ("params", "params_ema", "state_dict", "model_state_dict", "model", "net", "network")
MAX_PARAMS = 2_000_000_000  # refuse configurations beyond this before allocating anything
MAX_CHANNELS = 1 << 16  # the widest feature map a configuration may imply (width x 2**levels); releases: 1024
MAX_WEIGHT = 2.0**64  # float32 squares of this overflow; a trained NAFNet's weights stay far below 1e3

ParamKey = Literal["auto", "params", "params_ema", "state_dict", "model_state_dict", "model", "net", "network"]
ArchSource = Literal["flag", "release", "metadata", "shape", "default"]
FileFormat = Literal["torch-zip", "torch-legacy", "safetensors"]


def default_checkpoint_path() -> Path:
    """The small denoiser shipped inside the package (see docs/model-card.md)."""
    return Path(str(resources.files("nafnet_edge") / "weights" / DEFAULT_CHECKPOINT_NAME))


@dataclass
class RawCheckpoint:
    """A state dict as read from disk, before any NAFNet-specific checks."""

    state_dict: dict[str, torch.Tensor]
    param_key: str | None  # the wrapper key used, None for a bare state dict
    other_param_keys: list[str] = field(default_factory=list)  # other wrapper keys present, not used
    key_prefix: str = ""  # prefix stripped from every key ("module." for DataParallel saves)
    file_format: FileFormat = "torch-zip"
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadedCheckpoint:
    """A model ready for inference plus everything learned about where it came from."""

    model: RestorationNet
    config: NAFNetConfig
    path: Path
    sha256: str
    release: Release | None
    raw_param_key: str | None
    key_prefix: str
    file_format: str
    arch_source: ArchSource
    is_default: bool
    other_param_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def param_key(self) -> str:
        return self.raw_param_key or "(bare state dict)"

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def _is_safetensors(head: bytes, file_size: int) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= file_size - 8 and head[8:9] == b"{"


# What a file that is not a checkpoint usually is, from its first bytes, and what to do about it.
_TEXT_FORMATS = (  # matched case-insensitively after leading whitespace
    (b"version https://git-lfs", "a Git LFS pointer, not the weights: run `git lfs pull` in its repository"),
    (b"<!doctype html", "an HTML page (a download link that returned a web page): download the file itself"),
    (b"<html", "an HTML page (a download link that returned a web page): download the file itself"),
    (b"{", "a JSON or text file, not a checkpoint"),
)
_BINARY_FORMATS = (
    (b"\x89PNG", "a PNG image, not a checkpoint"),
    (b"\xff\xd8\xff", "a JPEG image, not a checkpoint"),
    (b"\x1f\x8b", "gzip-compressed: decompress it first (gunzip)"),
    (b"BZh", "bzip2-compressed: decompress it first (bunzip2)"),
    (b"\xfd7zXZ", "xz-compressed: decompress it first (unxz)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it first (unzstd)"),
    (b"7z\xbc\xaf", "a 7-Zip archive: extract the checkpoint from it"),
    (b"\x89HDF", "an HDF5 file (Keras/TensorFlow weights), not a PyTorch checkpoint"),
    (b"\x93NUMPY", "a NumPy array file, not a state dict"),
    (b"GGUF", "a GGUF file, not a PyTorch checkpoint"),
)


def _foreign_format(head: bytes) -> str | None:
    text = head.lstrip().lower()
    if looks_like_text(head):  # random bytes that merely start with "{" are not text
        for magic, what in _TEXT_FORMATS:
            if text.startswith(magic):
                return what
        return "a text file, not a checkpoint"
    for magic, what in _BINARY_FORMATS:
        if head.startswith(magic):
            return what
    if head[257:262] == b"ustar":
        return "a tar archive: extract the checkpoint from it"
    return None


def read_checkpoint(path: str | Path, *, param_key: ParamKey = "auto") -> RawCheckpoint:
    """Read the tensors of a checkpoint file, never executing code from it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file (.pth, .pt or .safetensors)")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a device, pipe or socket); pass the checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes); the download or save did not complete")
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None

    if _is_safetensors(head, size):
        return _read_safetensors(path)
    if head.startswith(b"PK\x03\x04"):
        file_format: Literal["torch-zip", "torch-legacy"] = "torch-zip"
        _check_torch_zip(path)
    elif head[:1] == b"\x80":  # pickle protocol opcode: torch's legacy (pre-1.6) format
        file_format = "torch-legacy"
    else:
        what = _foreign_format(head)
        raise CorruptCheckpointError(
            f"{path} is {what}"
            if what
            else f"{path} is neither a PyTorch checkpoint nor a safetensors file (starts with {head[:8]!r})"
        )
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing; our message says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=file_format == "torch-zip")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise UnsafeCheckpointError(
                f"{path} contains a pickled object ({found.group(1)}) that can only be loaded by running code "
                "from the file; nafnet-edge never does that. In an environment you trust, re-save just the "
                "weights: torch.save({'params': model.state_dict()}, 'clean.pth') or use safetensors"
            ) from None
        reason = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip() and "file an issue" not in ln), "")
        raise CorruptCheckpointError(
            f"{path} is not a torch.save file nafnet-edge can read safely (a plain pickle or another format"
            f"{': ' + reason if reason else ''}); save the weights with torch.save or safetensors"
        ) from None
    except Exception as e:  # a damaged pickle or zip fails in many ways (TypeError, IndexError, ...); all are ours
        raise CorruptCheckpointError(
            f"{path} is truncated or damaged ({first_sentence(e)}); download or save it again"
        ) from None
    if file_format == "torch-zip":
        _check_data_records(path)
    raw = _unwrap(obj, path, param_key=param_key, file_format=file_format)
    _check_storage(raw.state_dict, path)
    return raw


def _check_torch_zip(path: Path) -> None:
    """A zip that torch.save did not write (a zipped checkpoint, a dataset) gets named as such."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception:  # a damaged zip fails in many ways; torch.load below names it damaged
        return
    if names and not any(n.endswith("data.pkl") for n in names):
        raise CorruptCheckpointError(
            f"{path} is a zip archive, not a torch.save file (it holds {_sample(names, 3)}); extract the "
            "checkpoint from it"
        )


class _StorageType:
    """A storage class named in a torch.save pickle (``torch.FloatStorage``, ...), kept for its element size."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def element_size(self) -> int | None:
        if self.name == "UntypedStorage":
            return 1
        try:
            return torch.serialization.StorageType(self.name).dtype.itemsize
        except (KeyError, AttributeError):
            return None  # torch.load refuses a storage type it does not know


class _Inert:
    """Stands in for every object a torch.save pickle would build: accepts anything, runs nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> _Inert:
        return _Inert()

    def __getattr__(self, name: str) -> _Inert:
        return _Inert()

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass

    def add(self, item: object) -> None:
        pass


class _StorageScanner(pickle.Unpickler):
    """Reads which storage records a torch.save pickle refers to and the bytes each must hold, building nothing."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.record_bytes: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> object:
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        return _Inert

    def persistent_load(self, pid: object) -> object:
        # torch.save's reference to tensor data: ("storage", storage type, key, location, element count)
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage"):
            storage_type, key, numel = pid[1], pid[2], pid[4]
            size = storage_type.element_size if isinstance(storage_type, _StorageType) else None
            if size is not None and isinstance(numel, int):
                name = f"data/{key}"  # as torch.load names the record
                self.record_bytes[name] = max(self.record_bytes.get(name, 0), numel * size)
        return _Inert()


def _check_data_records(path: Path) -> None:
    """Refuse a data record shorter than the tensor data the pickle says it holds, or a compressed one.

    torch.load(mmap=True) maps each record's bytes from the file as they lie, without its size check: a short
    record would silently yield the bytes after it (other tensors, the zip directory, zeros) as weights, and a
    compressed record the compressed bytes. Run after torch.load has read the file (mapping, not copying, its
    data), so that a file torch.load refuses gets torch.load's reason.
    """
    try:
        zf = zipfile.ZipFile(path)
    except Exception as e:  # torch.load's reader is more lenient than zipfile's: the tensor data cannot be checked
        raise CorruptCheckpointError(
            f"{path} is truncated or damaged ({first_sentence(e)}); download or save it again"
        ) from None
    with zf:
        _check_zip_records(path, zf)


def _check_zip_records(path: Path, zf: zipfile.ZipFile) -> None:
    names = zf.namelist()
    if not names or "/" not in names[0]:
        return  # torch.load refuses an archive without its top folder
    prefix = names[0].split("/", 1)[0]  # torch.load reads the archive under its first entry's folder
    try:
        scanner = _StorageScanner(io.BytesIO(zf.read(f"{prefix}/data.pkl")))
        scanner.load()
    except KeyError:
        return  # no data.pkl: torch.load names the file damaged
    except Exception as e:  # a damaged pickle fails in many ways
        raise CorruptCheckpointError(
            f"{path} is truncated or damaged (its data.pkl cannot be read: {first_sentence(e)}); download or save it "
            "again"
        ) from None
    file_size = path.stat().st_size
    by_name: dict[str, list[zipfile.ZipInfo]] = {}
    for info in zf.infolist():
        by_name.setdefault(info.filename, []).append(info)
    with path.open("rb") as f:
        for record, needed in scanner.record_bytes.items():
            name = f"{prefix}/{record}"
            for info in by_name.get(name, []):  # a missing record: torch.load names the file damaged
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CorruptCheckpointError(
                        f"{path}: tensor data record {name!r} is compressed; torch.save stores tensor data "
                        "uncompressed and nafnet-edge reads it in place: unzip the file's contents and zip them "
                        "again without compression (zip -0), or save the weights again with torch.save"
                    )
                f.seek(info.header_offset)
                header = f.read(30)  # the local file header: the data follows its name and extra field
                start = info.header_offset + 30
                if len(header) == 30 and header[:4] == b"PK\x03\x04":
                    start += int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
                stored = max(0, min(info.file_size, file_size - start))
                if stored < needed:
                    raise CorruptCheckpointError(
                        f"{path}: tensor data record {name!r} holds {stored:,} bytes but its tensor needs "
                        f"{needed:,}; the file is truncated or damaged, download or save it again"
                    )


def _check_storage(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse tensors that claim more data than the file stores, alone or together.

    One tensor: stride-0 or overlapping views claiming more elements than its storage holds. Together: several
    keys viewing one storage, or storages overlapping in the file, each of which would be materialised on its
    own. A trained state dict has neither; a crafted file uses them to make a few megabytes cost gigabytes (a
    terabyte-sized width in a few bytes), which every later step would try to allocate.
    """
    claimed = 0
    extents: list[tuple[int, int]] = []
    for key, t in state_dict.items():
        storage = t.untyped_storage()
        if t.numel() > MAX_PARAMS or (t.numel() and t.numel() * t.element_size() > storage.nbytes()):
            raise CorruptCheckpointError(
                f"{path}: {key!r} claims shape {list(t.shape)} ({t.numel():,} values) but the file stores "
                f"{storage.nbytes():,} bytes for it; a crafted or damaged file, refused before allocating it"
            )
        claimed += t.numel() * t.element_size()
        extents.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    stored, end = 0, 0  # bytes covered by the union of the storages
    for lo, hi in sorted(extents):
        stored += max(0, hi - max(lo, end))
        end = max(end, hi)
    if claimed > stored:
        raise CorruptCheckpointError(
            f"{path}: its {len(state_dict)} tensors claim {claimed:,} bytes of data but the file stores "
            f"{stored:,} bytes for them (tensors sharing or overlapping one storage); a crafted or damaged file, "
            "refused before allocating it"
        )


def _read_safetensors(path: Path) -> RawCheckpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path} is a damaged safetensors file ({e}); download or save it again") from None
    if metadata.get("format") == "nafnet-edge-deploy":
        raise NotNAFNetError(
            f"{path} is a deploy graph written by `nafnet-edge reparam`; commands that load a checkpoint need "
            "the original (trained) checkpoint"
        )
    raw = _unwrap(sd, path, param_key="auto", file_format="safetensors")
    raw.metadata = metadata
    return raw


def _unwrap(obj: object, path: Path, *, param_key: ParamKey, file_format: FileFormat) -> RawCheckpoint:
    if not isinstance(obj, dict):
        raise NotNAFNetError(f"{path} holds a {type(obj).__name__}, not a state dict")
    present = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)]
    if param_key != "auto":
        if param_key not in present:
            raise CheckpointError(
                f"--param-key {param_key}: {path} has no {param_key!r} entry; "
                f"wrapper keys present: {present or 'none (a bare state dict)'}"
            )
        chosen: str | None = param_key
    else:
        chosen = present[0] if present else None
    sd = obj[chosen] if chosen else obj
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise NotNAFNetError(f"{path} holds no tensors (top-level keys: {_sample(list(obj))})")
    anchors = sorted((k for k in tensors if k == "intro.weight" or k.endswith(".intro.weight")), key=len)
    if not anchors:
        raise NotNAFNetError(
            f"{path} is not a NAFNet state dict: no 'intro.weight' tensor (keys: {_sample(list(tensors))})"
        )
    prefix = anchors[0][: -len("intro.weight")]
    if len(anchors) > 1 and len(anchors[1]) == len(anchors[0]):
        raise NotNAFNetError(f"{path} holds several NAFNets ({', '.join(anchors)}); save the one you want alone")
    stripped = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in tensors.items()}
    return RawCheckpoint(
        state_dict=stripped,
        param_key=chosen,
        other_param_keys=[k for k in present if k != chosen],
        key_prefix=prefix,
        file_format=file_format,
    )


def _sample(keys: list[str], n: int = 5, total: int | None = None) -> str:
    """The first ``n`` keys quoted, and how many there are in all (``total``, else ``len(keys)``) when more."""
    total = len(keys) if total is None else total
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f", ... ({total:,} in all)" if total > n else "")


_BLOCK = re.compile(r"^(encoders|decoders)\.(\d+)\.(\d+)\.|^middle_blks\.(\d+)\.")
_SR_BLOCK = re.compile(r"^body\.(\d+)\.")
_SR_PART = re.compile(r"^body\.(\d+)\.module\.(blk|fusion)\.")
_DOWN = re.compile(r"downs\.\d+\.weight")
FAMILY_NAMES = {"nafnet": "NAFNet", "baseline": "Baseline", "nafnet-sr": "NAFNetSR"}


def family_label(config: NAFNetConfig) -> str:
    """What a network of ``config``'s tensors is, whatever its TLC setting: NAFNet, Baseline, NAFNetSR or NAFSSR."""
    return "NAFSSR" if config.fusion else FAMILY_NAMES[config.family]


def layout_summary(config: NAFNetConfig) -> str:
    """The layout in a few words, for messages: blocks per U-Net level, or the SR network's blocks and scale."""
    if config.family == "nafnet-sr":
        stereo = "stereo, SCAM fusion" if config.fusion else "single view"
        return f"width {config.width}, {config.middle_blk_num} blocks, x{config.up_scale}, {stereo}"
    return (
        f"width {config.width}, enc {list(config.enc_blk_nums)}, middle {config.middle_blk_num}, "
        f"dec {list(config.dec_blk_nums)}"
    )


def infer_config(state_dict: dict[str, torch.Tensor]) -> NAFNetConfig:
    """The configuration implied by the tensor keys and shapes alone.

    The family comes from the keys: ``downs.*`` make a U-Net (NAFNet with ``sca`` blocks, Baseline with ``se``
    blocks), ``body.{i}.module.blk.*`` with ``up.0.weight`` the super-resolution network (NAFSSR when every
    block has ``fusion``). The arch is the family's class without TLC ("nafnet", "baseline" or "nafnet-sr"):
    :func:`load_checkpoint` decides on TLC.
    """
    intro = state_dict.get("intro.weight")
    if intro is None or intro.dim() != 4 or tuple(intro.shape[2:]) != (3, 3):
        found = None if intro is None else tuple(intro.shape)
        raise NotNAFNetError(f"'intro.weight' should be a [width, channels, 3, 3] conv weight, found {found}")
    width, img_channels = int(intro.shape[0]), int(intro.shape[1])
    if any(_DOWN.fullmatch(k) for k in state_dict):
        return _infer_unet(state_dict, width, img_channels)
    if "up.0.weight" in state_dict or any(_SR_PART.match(k) for k in state_dict):
        return _infer_sr(state_dict, width, img_channels)
    raise NotNAFNetError(
        "not a network of the NAFNet family: it has 'intro.weight' but neither 'downs.{i}.weight' (the encoder of "
        "the NAFNet and Baseline U-Nets) nor 'body.{i}.module.blk.*' blocks with 'up.0.weight' (NAFNetSR and "
        f"NAFSSR super-resolution); keys: {_sample(list(state_dict))}"
    )


def _check_blocks(implied: Iterable[str], implied_count: int, present: set[str]) -> None:
    """Refuse block indices with gaps before building anything: a key like ``encoders.0.99999.x`` must not build
    100000 blocks (``implied`` is lazy: an index of 10**12 costs nothing)."""
    if implied_count == len(present):
        return
    absent = list(itertools.islice((b for b in implied if b not in present), 1000))
    raise StateDictMismatchError(
        f"blocks missing: {implied_count - len(present)} of the {implied_count} blocks the key indices imply "
        f"have no tensors ({_sample([b + '*' for b in absent], 5, implied_count - len(present))}); the file is "
        "incomplete or its keys were renamed",
        missing=absent,
    )


def _infer_unet(state_dict: dict[str, torch.Tensor], width: int, img_channels: int) -> NAFNetConfig:
    levels = sum(1 for k in state_dict if _DOWN.fullmatch(k))
    enc = [0] * levels
    dec = [0] * levels
    middle = 0
    attention: dict[str, set[str]] = {"sca.": set(), "se.": set()}  # blocks by channel-attention kind
    for key in state_dict:
        m = _BLOCK.match(key)
        if not m:
            continue
        for kind, blocks in attention.items():
            if key.startswith(kind, m.end()):
                blocks.add(m.group(0))
        if m.group(4) is not None:
            middle = max(middle, int(m.group(4)) + 1)
            continue
        counts, level, j = (enc if m.group(1) == "encoders" else dec), int(m.group(2)), int(m.group(3))
        if level >= levels:
            raise StateDictMismatchError(
                f"unexpected key {key!r}: {levels} downsampling layers imply levels 0..{levels - 1}",
                unexpected=[key],
            )
        counts[level] = max(counts[level], j + 1)
    present = {m.group(0) for m in map(_BLOCK.match, state_dict) if m}

    def implied() -> Iterator[str]:  # every block, in the order of the forward pass
        for level, n in enumerate(enc):
            yield from (f"encoders.{level}.{j}." for j in range(n))
        yield from (f"middle_blks.{j}." for j in range(middle))
        for level, n in enumerate(dec):
            yield from (f"decoders.{level}.{j}." for j in range(n))

    _check_blocks(implied(), sum(enc) + middle + sum(dec), present)
    if width * 2**levels > MAX_CHANNELS:
        raise CheckpointError(
            f"width {width} with {levels} downsampling levels means {width * 2**levels:,} channels at the "
            f"bottom (more than {MAX_CHANNELS:,}); not a usable NAFNet, refused before building it"
        )
    order = list(implied())
    sca, se = ([b for b in order if b in attention[kind]] for kind in ("sca.", "se."))
    if sca and se:
        raise StateDictMismatchError(
            f"mixed block kinds: {len(sca)} blocks have NAFNet's simplified channel attention ('sca.1.*': "
            f"{_sample([b + 'sca.*' for b in sca], 2)}) and {len(se)} the Baseline's squeeze-excitation ('se.1.*', "
            f"'se.3.*': {_sample([b + 'se.*' for b in se], 2)}); one network has one kind: the file mixes two "
            "checkpoints or its keys were renamed"
        )
    dw_expand, ffn_expand = _expansions(state_dict, order[0] if order else None)
    return NAFNetConfig(
        img_channels=img_channels,
        width=width,
        enc_blk_nums=tuple(enc),
        middle_blk_num=middle,
        dec_blk_nums=tuple(dec),
        dw_expand=dw_expand,
        ffn_expand=ffn_expand,
        arch="baseline" if se else "nafnet",
    )


def _infer_sr(state_dict: dict[str, torch.Tensor], width: int, img_channels: int) -> NAFNetConfig:
    blocks = 0
    with_blk: set[int] = set()
    with_fusion: set[int] = set()
    for key in state_dict:
        if m := _SR_BLOCK.match(key):
            blocks = max(blocks, int(m.group(1)) + 1)
        if m := _SR_PART.match(key):
            (with_blk if m.group(2) == "blk" else with_fusion).add(int(m.group(1)))
    _check_blocks((f"body.{i}.module.blk." for i in range(blocks)), blocks, {f"body.{i}.module.blk." for i in with_blk})
    if width > MAX_CHANNELS:
        raise CheckpointError(
            f"width {width} is more than {MAX_CHANNELS:,} channels; not a usable NAFNetSR, refused before building it"
        )
    up = state_dict.get("up.0.weight")
    if up is None:
        raise StateDictMismatchError(
            f"{blocks} super-resolution blocks ('body.{{i}}.module.blk.*') but no 'up.0.weight' (the conv before "
            "the PixelShuffle of NAFNetSR and NAFSSR); the file is incomplete or its keys were renamed",
            missing=["up.0.weight"],
        )
    up_scale = _pixel_shuffle_scale(up, img_channels)
    if with_fusion and len(with_fusion) < blocks:
        unfused = [i for i in range(blocks) if i not in with_fusion]
        raise StateDictMismatchError(
            f"stereo fusion (SCAM, 'body.{{i}}.module.fusion.*') in blocks {_ranges(sorted(with_fusion))} but not in "
            f"blocks {_ranges(unfused)} of {blocks}; nafnet-edge supports NAFSSR with fusion after every block (the "
            "releases) or after none (NAFNetSR): checkpoints trained with upstream's fusion_from/fusion_to set to a "
            "part of the blocks are not supported",
            missing=[f"body.{i}.module.fusion.*" for i in unfused],
        )
    dw_expand, ffn_expand = _expansions(state_dict, "body.0.module.blk." if blocks else None)
    return NAFNetConfig(
        img_channels=img_channels,
        width=width,
        enc_blk_nums=(),
        middle_blk_num=blocks,
        dec_blk_nums=(),
        dw_expand=dw_expand,
        ffn_expand=ffn_expand,
        arch="nafnet-sr",
        up_scale=up_scale,
        fusion=bool(with_fusion),
    )


def _pixel_shuffle_scale(up: torch.Tensor, img_channels: int) -> int:
    """The output scale s from the conv feeding PixelShuffle(s): img_channels * s**2 output channels."""
    out = int(up.shape[0]) if up.dim() == 4 else 0
    scale = math.isqrt(out // img_channels) if out % img_channels == 0 else 0
    if scale < 1 or img_channels * scale**2 != out:
        examples = ", ".join(f"{img_channels * s * s} for x{s}" for s in (2, 3, 4))
        raise StateDictMismatchError(
            f"'up.0.weight' has shape {list(up.shape)}: the conv before PixelShuffle needs img_channels "
            f"({img_channels}, from 'intro.weight') times the square of the scale as output channels ({examples}); "
            "the file is damaged or not a NAFNetSR/NAFSSR"
        )
    return scale


def _ranges(indices: list[int]) -> str:
    """0, 1, 2, 5 as '0-2, 5'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _expansions(state_dict: dict[str, torch.Tensor], block: str | None) -> tuple[int, int]:
    """dw_expand and ffn_expand from the first block (conv1 and conv4 against norm1's channels); every other
    block is checked against them by the shape check."""
    norm = state_dict.get(f"{block}norm1.weight") if block else None
    if block is None or norm is None or norm.dim() != 1:
        return 2, 2
    c = int(norm.shape[0])
    return _expansion(state_dict.get(block + "conv1.weight"), c), _expansion(state_dict.get(block + "conv4.weight"), c)


def _expansion(weight: torch.Tensor | None, channels: int) -> int:
    if weight is None or channels == 0 or weight.dim() == 0 or weight.shape[0] % channels:
        return 2  # the shape check then reports the offending tensor
    return int(weight.shape[0] // channels)


def expected_shapes(config: NAFNetConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of ``config`` with its shape, computed without allocating memory."""
    with torch.device("meta"):
        model = build_model(config)
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        raise CheckpointError(f"the inferred configuration has {n / 1e9:.1f}G parameters; refusing to build it")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(state_dict: dict[str, torch.Tensor], config: NAFNetConfig) -> None:
    """Raise StateDictMismatchError or NonFiniteWeightsError, naming the keys and shapes involved."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, expected[k], tuple(state_dict[k].shape))
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k, want, got = mismatched[0]
            more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
            parts.append(f"wrong shape for {k!r}: expected {list(want)}, found {list(got)}{more}")
        if missing:
            parts.append(f"missing keys: {_sample(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_sample(unexpected)}")
        raise StateDictMismatchError(
            f"checkpoint does not match the {family_label(config)} configuration inferred from it "
            f"({layout_summary(config)}): " + "; ".join(parts),
            missing=missing,
            unexpected=unexpected,
            shape_mismatches=mismatched,
        )
    bad_dtype = [k for k, v in state_dict.items() if not v.is_floating_point()]
    if bad_dtype:
        raise StateDictMismatchError(
            f"non-floating-point weights: {_sample(bad_dtype)} ({state_dict[bad_dtype[0]].dtype})"
        )
    _check_values(state_dict)


def _check_values(state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse weights that are NaN or Inf once cast to float32, the precision the model computes in (float64
    values beyond float32's range become Inf), or so large that float32 arithmetic overflows on them."""
    non_finite: list[tuple[str, int, int]] = []  # key, values non-finite in float32, of which float64 overflows
    huge: list[tuple[str, float]] = []
    for k, v in state_dict.items():
        if not v.numel():
            continue
        v32 = v.to(torch.float32)
        low, high = (float(x) for x in torch.aminmax(v32))  # NaN propagates
        if max(-low, high) < MAX_WEIGHT:
            continue
        bad = int((~torch.isfinite(v32)).sum())
        if bad:
            overflowed = bad - int((~torch.isfinite(v)).sum()) if v.dtype == torch.float64 else 0
            non_finite.append((k, bad, overflowed))
        else:
            huge.append((k, max(-low, high)))
    if non_finite:
        listed = ", ".join(
            f"{k!r} ({n} values{f', of which {o} overflow float32 from float64' if o else ''})"
            for k, n, o in non_finite[:5]
        )
        raise NonFiniteWeightsError(
            f"NaN or Inf weights in float32 in {len(non_finite)} tensors: {listed}; the training run diverged or "
            "the file is damaged, use an earlier checkpoint"
        )
    if huge:
        listed = ", ".join(f"{k!r} (up to {m:.3g})" for k, m in huge[:5])
        raise NonFiniteWeightsError(
            f"weights of magnitude {MAX_WEIGHT:.2g} or more in {len(huge)} tensors: {listed}; float32 arithmetic "
            "overflows on them (a trained NAFNet's weights stay far below 1e3): the file is damaged or not a "
            "trained model, use another checkpoint"
        )


def _metadata_config(metadata: dict[str, str]) -> dict[str, object]:
    try:
        cfg = json.loads(metadata.get("config", "{}"))
    except json.JSONDecodeError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def is_size(value: object) -> bool:
    """Two positive integers (height, width): a train size as a file's metadata or a manifest may give it."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 1 for v in value)
    )


def _check_load_memory(state_dict: dict[str, torch.Tensor], path: Path, device: torch.device) -> None:
    """Refuse, before allocating, a model whose float32 weights do not fit in the memory available.

    The weights are copied to float32 on the CPU, then moved to ``device``; their size is that of the
    configuration the keys imply (:func:`check_state_dict` has matched every tensor to it).
    """
    from nafnet_edge.inference import available_memory_bytes

    needed = sum(t.numel() for t in state_dict.values()) * 4
    for where in dict.fromkeys([torch.device("cpu"), device]):
        available = available_memory_bytes(where)
        if available is not None and needed > available:
            raise CheckpointError(
                f"{path}: its float32 weights need {needed / 1e9:.2f} GB of memory"
                f"{'' if where.type == 'cpu' else f' on {where}'}, {available / 1e9:.2f} GB are available; free "
                "some memory or use a machine with more"
            )


def fitting_archs(config: NAFNetConfig) -> tuple[Arch, ...]:
    """The archs a checkpoint of ``config``'s tensors loads into: the family's class with global pooling and its
    TLC variant; for the super-resolution family NAFSSR (TLC) and NAFNetSR (global pooling) for a stereo
    checkpoint, only NAFNetSR for a single-view one."""
    if config.family == "nafnet-sr":
        return ("nafssr", "nafnet-sr") if config.fusion else ("nafnet-sr",)
    return (config.family, local_arch(config.family))


def _arch_mismatch(arch: str, config: NAFNetConfig) -> str:
    """Why ``arch`` cannot load a checkpoint of ``config``'s tensors, and what fits instead."""
    label = family_label(config)
    if arch == "nafssr" and config.family == "nafnet-sr":
        why = f"NAFSSR is the stereo network (SCAM fusion in every block) and this is a single-view {label}"
    else:
        why = f"{arch} builds a {CLASS_NAMES[arch]} and this checkpoint is a {label}"
    fits = fitting_archs(config)
    return f"{why} ({layout_summary(config)}); {'the arch that fits' if len(fits) == 1 else 'archs that fit'}: " + (
        ", ".join(fits)
    )


def shape_arch(config: NAFNetConfig) -> tuple[Arch, ArchSource]:
    """The arch a file without release or metadata gets from its tensors: TLC where upstream evaluates networks of
    that shape with it (the GoPro/REDS-shaped U-Nets, NAFSSR), else the family's class."""
    if config.family == "nafnet-sr":
        return ("nafssr" if config.fusion else "nafnet-sr"), "shape"
    shaped = [r.config for r in releases_with_shape(config)] + [RELEASE_SHAPES[n] for n in shapes_like(config)]
    if any(c.local for c in shaped):
        return local_arch(config.family), "shape"
    return config.family, "default"


def load_checkpoint(
    path: str | Path | None = None,
    *,
    param_key: ParamKey = "auto",
    arch: Arch | None = None,
    train_size: tuple[int, int] | None = None,
    device: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Load a checkpoint of the NAFNet family (the embedded default when ``path`` is None; a name of
    ``defaults.SHIPPED_MODELS`` for a model shipped in the package) into an eval-mode fp32 model.

    The family and layout come from the tensor shapes (:func:`infer_config`); the class (TLC or not) from, in
    order: ``arch`` (which must fit the family: :func:`fitting_archs`), the release table (sha256), the file's
    metadata, the shape (GoPro/REDS-shaped U-Nets and stereo SR networks get TLC, as upstream evaluates them).
    ``train_size`` (TLC's training crop) overrides the metadata's, else the family's default applies.
    """
    is_default = path is None
    path = default_checkpoint_path() if path is None else Path(defaults.shipped_model_path(str(path)))
    raw = read_checkpoint(path, param_key=param_key)
    try:
        config = infer_config(raw.state_dict)
        check_state_dict(raw.state_dict, config)
    except CheckpointError as e:  # name the file, as read_checkpoint's errors do
        e.args = (f"{path}: {e.args[0]}", *e.args[1:])
        raise
    _check_load_memory(raw.state_dict, path, torch.device(device))
    sha256 = sha256_file(path)
    release = release_by_sha256(sha256)
    meta = _metadata_config(raw.metadata)
    fits = fitting_archs(config)

    arch_source: ArchSource
    if arch is not None:
        if arch not in ARCHS:
            raise CheckpointError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if arch not in fits:
            raise OptionError(f"--arch {arch} does not fit {path}: {_arch_mismatch(arch, config)}")
        arch_source = "flag"
    elif release is not None:
        arch, arch_source = release.config.arch, "release"
    elif meta.get("arch") in ARCHS:
        arch, arch_source = meta["arch"], "metadata"  # type: ignore[assignment]
        if meta["arch"] not in fits:
            raise CheckpointError(
                f"{path}: its metadata gives arch {meta['arch']!r}, which does not fit its tensors: "
                f"{_arch_mismatch(str(meta['arch']), config)}; fix the file's config metadata, or pass --arch to "
                "override it"
            )
    else:
        arch, arch_source = shape_arch(config)
    if train_size is None and "train_size" in meta:
        if not is_size(meta["train_size"]):
            raise CheckpointError(
                f"{path}: its metadata gives train_size {meta['train_size']!r}; expected [height, width] in pixels "
                "(two positive integers): fix the file's config metadata, or pass --train-size to override it"
            )
        train_size = tuple(meta["train_size"])  # type: ignore[arg-type,assignment]
    elif train_size is not None and not is_size(train_size):
        raise CheckpointError(f"train_size must be two positive integers (height, width), got {train_size!r}")
    config = config.replace(arch=arch, train_size=train_size)  # None: the family's default

    with torch.device("meta"):
        model = build_model(config)
    # Copies: the model must not share storage with a memory-mapped file or with the caller's tensors.
    state = {k: v.to(torch.float32, copy=True).contiguous() for k, v in raw.state_dict.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.to(device)
    return LoadedCheckpoint(
        model=model,
        config=config,
        path=path,
        sha256=sha256,
        release=release,
        raw_param_key=raw.param_key,
        key_prefix=raw.key_prefix,
        file_format=raw.file_format,
        arch_source=arch_source,
        is_default=is_default,
        other_param_keys=raw.other_param_keys,
        metadata=raw.metadata,
    )
