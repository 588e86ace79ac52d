"""Read Hugging Face checkpoint directories stored as safetensors, without torch.

The safetensors format is parsed here directly: an 8-byte little-endian header length, a
JSON header describing every tensor, then one flat data buffer. Tensors are returned as
read-only NumPy views into a memory map of each file, so opening a multi-gigabyte
checkpoint costs almost nothing until the data is actually touched.

Nothing here ever downloads or unpickles anything.
"""

from __future__ import annotations

import difflib
import json
import math
import mmap
import os
import pathlib
import re
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointDir",
    "CheckpointError",
    "MissingTensorError",
    "check_tensor_set",
]

_INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAME = "model.safetensors"
_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")

# Explicit little-endian codes: safetensors data is little-endian whatever the host is.
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}

_HOW_TO_GET_FILES = (
    "gemmalens never downloads anything: pass a local directory that holds config.json and "
    "the *.safetensors file(s), e.g. one made on a machine with network access with\n"
    "    hf download google/gemma-3-1b-it --local-dir ./gemma-3-1b-it"
)

_HOW_TO_CONVERT = (
    "On a machine that has torch and transformers, convert it with\n"
    "    from transformers import AutoModelForCausalLM\n"
    "    model = AutoModelForCausalLM.from_pretrained({src!r}, torch_dtype='auto')\n"
    "    model.save_pretrained({dst!r}, safe_serialization=True)\n"
    "and copy tokenizer.model next to the result. Most Gemma repositories on the "
    "Hugging Face Hub already ship *.safetensors files, so downloading those is another option."
)


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, malformed, or does not fit the model."""


class MissingTensorError(CheckpointError, KeyError):
    """A tensor name was asked for that the checkpoint does not contain.

    Also a ``KeyError`` so that mapping-style code (``except KeyError``) keeps working.
    """

    # Defaults keep the exception picklable (unpickling calls cls(*args) with the message only).
    def __init__(self, message: str, key: str = "", suggestions: list[str] | None = None):
        super().__init__(message)
        self.key = key
        self.suggestions = suggestions or []

    # KeyError.__str__ would repr() the message, turning newlines into "\n" noise.
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class _TensorInfo:
    file: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    # Absolute byte offsets in the file (header included), so reads need no extra arithmetic.
    start: int
    stop: int


@dataclass(frozen=True)
class _FileHeader:
    path: pathlib.Path
    size: int
    tensors: dict[str, _TensorInfo]


def _unique_keys_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of repeated keys; in a header that would hide a tensor.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"tensor {k!r} is described twice")
        out[k] = v
    return out


def _read_header(path: pathlib.Path) -> _FileHeader:
    """Parse and validate one safetensors header; reads only the header bytes."""
    size = path.stat().st_size
    not_safetensors = (
        f"{path} is truncated or not a safetensors file: {{why}}. "
        "Re-download or re-copy the file (and check the copy finished)."
    )
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(
                not_safetensors.format(why=f"it has only {size} bytes, less than the 8-byte header")
            )
        if head.startswith(b"version "):
            # A Git LFS pointer is the most common way to end up with a tiny "safetensors" file.
            raise CheckpointError(
                f"{path} is a Git LFS pointer file ({size} bytes), not the tensor data. "
                "Run `git lfs pull` in the repository, or download the file with "
                "`hf download`."
            )
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                not_safetensors.format(
                    why=f"its header claims {header_len} bytes but the file has only {size} bytes"
                )
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys_hook)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            not_safetensors.format(why=f"its header is not valid JSON ({e})")
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            not_safetensors.format(why="its header is not a JSON object of tensor descriptions")
        )

    # Free-form string metadata (e.g. {"format": "pt"}); nothing here depends on it.
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    tensors: dict[str, _TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(path, name, entry, data_start)

    overrun = sorted((t for t in tensors.items() if t[1].stop > size), key=lambda t: t[1].stop)
    if overrun:
        name, info = overrun[0]
        others = f" (and {len(overrun) - 1} more after it)" if len(overrun) > 1 else ""
        full = max(t.stop for t in tensors.values())
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r}{others} needs the file to be at least "
            f"{info.stop} bytes long (the complete file has {full} bytes), but it has only "
            f"{size} bytes. The download or copy was probably interrupted; re-download or "
            "re-copy this file."
        )
    return _FileHeader(path=path, size=size, tensors=tensors)


def _parse_entry(path: pathlib.Path, name: str, entry: Any, data_start: int) -> _TensorInfo:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: the header entry for tensor {name!r} is malformed: {why}. "
            "The file is corrupt or was not written by a safetensors library; re-download it."
        )

    if not isinstance(entry, dict):
        raise bad(f"expected an object, found {entry!r}")
    dtype_code = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"'shape' should be a list of non-negative integers, found {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(
            f"'data_offsets' should be [begin, end] with 0 <= begin <= end, found {offsets!r}"
        )
    dtype = _DTYPES.get(dtype_code) if isinstance(dtype_code, str) else None
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {dtype_code!r}, which gemmalens does not support "
            f"(supported: {', '.join(_DTYPES)}). Re-save the checkpoint with one of those dtypes, "
            "e.g. bfloat16 or float32."
        )
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} is {dtype_code} with shape {tuple(shape)}, which takes "
            f"{expected} bytes, but its data_offsets [{begin}, {end}] span {end - begin} bytes. "
            "The file is corrupt; re-download or re-copy it."
        )
    return _TensorInfo(
        file=path,
        dtype=dtype,
        shape=tuple(shape),
        start=data_start + begin,
        stop=data_start + end,
    )


def _load_json(path: pathlib.Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} ({what}) is not UTF-8 text: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} ({what}) is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}. "
            "Fix the file by hand or re-download it."
        ) from None


def _closest(key: str, names: Iterable[str], n: int) -> list[str]:
    return difflib.get_close_matches(key, list(names), n=n, cutoff=0.5)


class TensorIndex:
    """The lookups every checkpoint gives its loader, over ``_tensors`` (name -> an entry
    with ``shape`` and ``dtype``) and ``_info(name)`` (the entry, or a precise error)."""

    _tensors: Mapping[str, Any]

    def _info(self, key: str) -> Any:
        raise NotImplementedError

    def keys(self) -> list[str]:
        """All tensor names, sorted."""
        return list(self._tensors)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key``, without reading it."""
        return self._info(key).shape

    def dtype(self, key: str) -> np.dtype:
        """NumPy dtype of tensor ``key`` (``ml_dtypes.bfloat16`` for BF16)."""
        return self._info(key).dtype


class CheckpointDir(TensorIndex):
    """A Hugging Face checkpoint directory: config.json + model.safetensors or sharded
    model-0000x-of-0000y.safetensors with model.safetensors.index.json (+ optional
    tokenizer.model).

    All safetensors headers are read and validated when the object is created, so a truncated
    or inconsistent checkpoint fails here rather than halfway through loading a model. Tensor
    data is memory-mapped on first use; call :meth:`close` (or use ``with``) to release the
    maps early, otherwise they go away with the object.

    Args:
        path: the local directory. ``~`` is expanded.

    Raises:
        CheckpointError: the directory is missing, incomplete or malformed; the message says
            which file is at fault and how to fix it.
    """

    path: pathlib.Path
    config: dict[str, Any]
    tokenizer_path: pathlib.Path | None
    files: list[pathlib.Path]

    def __init__(self, path: str | os.PathLike[str]):
        self.path = pathlib.Path(path).expanduser()
        self._check_directory()
        self.config = self._load_config()
        tok = self.path / "tokenizer.model"
        self.tokenizer_path = tok if tok.is_file() else None
        self._weight_map: dict[str, str] | None = None
        self.files = self._find_weight_files()
        self._tensors = self._index_tensors()
        self._maps: dict[pathlib.Path, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- discovery and validation -------------------------------------------------------

    def _check_directory(self) -> None:
        p = self.path
        if not p.exists():
            hint = ""
            if not p.is_absolute() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(p)):
                hint = (
                    f" {str(p)!r} looks like a Hugging Face Hub model id; gemmalens does not "
                    "resolve those."
                )
            raise CheckpointError(
                f"Checkpoint directory {p} does not exist.{hint}\n{_HOW_TO_GET_FILES}"
            )
        if not p.is_dir():
            raise CheckpointError(
                f"{p} is a file, not a directory. Pass the directory that contains it "
                f"({p.parent}), which must also hold config.json."
            )
        if not (p / "config.json").is_file():
            nested = sorted(p.glob("*/config.json")) + sorted(p.glob("snapshots/*/config.json"))
            hint = ""
            if nested:
                hint = f" Did you mean {nested[0].parent}?"
            raise CheckpointError(
                f"{p} has no config.json, so it is not a Hugging Face model directory.{hint}\n"
                f"{_HOW_TO_GET_FILES}"
            )

    def _load_config(self) -> dict[str, Any]:
        config = _load_json(self.path / "config.json", "the model config")
        if not isinstance(config, dict):
            raise CheckpointError(
                f"{self.path / 'config.json'} should hold a JSON object, found "
                f"{type(config).__name__}. Re-download it."
            )
        return config

    def _find_weight_files(self) -> list[pathlib.Path]:
        p = self.path
        # Same precedence as transformers: a single model.safetensors wins over an index.
        if (p / _SINGLE_NAME).is_file():
            return [p / _SINGLE_NAME]
        if (p / _INDEX_NAME).is_file():
            return self._files_from_index()
        found = sorted(f for f in p.glob("*.safetensors") if f.is_file())
        if found:
            self._check_shard_series(found)
            return found
        raise self._no_safetensors_error()

    def _files_from_index(self) -> list[pathlib.Path]:
        index_path = self.path / _INDEX_NAME
        index = _load_json(index_path, "the shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{index_path} has no valid 'weight_map' (an object mapping tensor names to "
                "shard file names). Re-download it."
            )
        self._weight_map = weight_map
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (self.path / n).is_file()]
        if missing:
            counts = {n: sum(1 for v in weight_map.values() if v == n) for n in missing}
            listed = "\n".join(f"    {n} (holds {counts[n]} tensors)" for n in missing)
            raise CheckpointError(
                f"{index_path} lists shard file(s) that are not in {self.path}:\n{listed}\n"
                "The download is incomplete; download or copy the missing file(s) into the "
                "directory."
            )
        return [self.path / n for n in names]

    def _check_shard_series(self, found: list[pathlib.Path]) -> None:
        # Without an index, a gap in model-0000i-of-0000n would otherwise silently drop weights.
        series: dict[tuple[str, str], set[int]] = {}
        for f in found:
            m = _SHARD_RE.match(f.name)
            if m:
                series.setdefault((m["prefix"], m["n"]), set()).add(int(m["i"]))
        for (prefix, n), have in series.items():
            width = len(n)
            absent = [
                f"{prefix}-{i:0{width}d}-of-{n}.safetensors"
                for i in range(1, int(n) + 1)
                if i not in have
            ]
            if absent:
                raise CheckpointError(
                    f"{self.path} has no {_INDEX_NAME} and is missing shard file(s): "
                    f"{', '.join(absent)}. Download or copy them (and the index) into the "
                    "directory."
                )

    def _no_safetensors_error(self) -> CheckpointError:
        p = self.path
        names = sorted(f.name for f in p.iterdir() if f.is_file())
        pickled = [
            n
            for n in names
            if n.endswith((".bin", ".pt", ".ckpt", ".pth")) and not n.startswith("training_args")
        ]
        if pickled:
            return CheckpointError(
                f"{p} holds PyTorch pickle weights ({', '.join(pickled[:3])}) but no "
                "*.safetensors files. gemmalens reads only safetensors: it has no torch and never "
                "unpickles files, since unpickling can run arbitrary code. "
                + _HOW_TO_CONVERT.format(src=str(p), dst=f"{p}-safetensors")
            )
        gguf = [n for n in names if n.endswith(".gguf")]
        if gguf:
            return CheckpointError(
                f"{p} holds GGUF weights ({', '.join(gguf[:3])}) but no *.safetensors files. "
                "gemmalens reads only safetensors; GGUF files are llama.cpp's format and are often "
                "quantized. Download the original Hugging Face checkpoint (the *.safetensors "
                "files) instead."
            )
        flax = [n for n in names if n.endswith(".msgpack")]
        if flax:
            return CheckpointError(
                f"{p} holds Flax msgpack weights ({', '.join(flax[:3])}) but no *.safetensors "
                "files. gemmalens reads only safetensors. On a machine with torch and transformers, "
                "load it with AutoModelForCausalLM.from_pretrained(..., from_flax=True) and save "
                "it with save_pretrained(..., safe_serialization=True), or download the "
                "*.safetensors files of the same model."
            )
        return CheckpointError(
            f"{p} has config.json but no *.safetensors weight files (files there: "
            f"{', '.join(names[:10]) or 'none'}{', ...' if len(names) > 10 else ''}).\n"
            f"{_HOW_TO_GET_FILES}"
        )

    def _index_tensors(self) -> dict[str, _TensorInfo]:
        tensors: dict[str, _TensorInfo] = {}
        # Sizes at open time let _map notice a file replaced or still being written meanwhile.
        self._sizes: dict[pathlib.Path, int] = {}
        for f in self.files:
            header = _read_header(f)
            self._sizes[f] = header.size
            for name, info in header.tensors.items():
                if name in tensors:
                    raise CheckpointError(
                        f"Tensor {name!r} is stored in two files: {tensors[name].file.name} and "
                        f"{f.name} (in {self.path}). Only one copy may exist; remove the stray "
                        "file (e.g. left over from another model or an older download)."
                    )
                tensors[name] = info
        if self._weight_map is not None:
            absent = [(k, v) for k, v in sorted(self._weight_map.items()) if k not in tensors]
            if absent:
                lines = "\n".join(f"    {k!r} (expected in {v})" for k, v in absent[:10])
                more = f"\n    ... and {len(absent) - 10} more" if len(absent) > 10 else ""
                raise CheckpointError(
                    f"{self.path / _INDEX_NAME} lists tensors that are not in the shard it points "
                    f"to:\n{lines}{more}\nThe index and the shards come from different "
                    "downloads; re-download the index and all shards together."
                )
        return dict(sorted(tensors.items()))

    # -- lookup -------------------------------------------------------------------------

    def _info(self, key: str) -> _TensorInfo:
        try:
            return self._tensors[key]
        except (KeyError, TypeError):
            pass
        close = _closest(str(key), self._tensors, n=5)
        hint = (
            "Closest names: " + ", ".join(repr(c) for c in close)
            if close
            else "Use .keys() to list the tensors it has."
        )
        raise MissingTensorError(
            f"Tensor {key!r} is not in checkpoint {self.path} ({len(self._tensors)} tensors). "
            f"{hint}",
            key=str(key),
            suggestions=close,
        )

    def nbytes(self) -> int:
        """Total size of all tensor data in bytes, e.g. for a progress bar."""
        return sum(t.stop - t.start for t in self._tensors.values())

    def array(self, key: str) -> np.ndarray:
        """Tensor ``key`` as a read-only NumPy view into the memory-mapped file.

        No data is copied: pages are read from disk when the array is touched, and the array
        stays valid after :meth:`close` because it keeps its own reference to the map.
        """
        info = self._info(key)
        buf = self._map(info.file)
        count = math.prod(info.shape)
        return np.frombuffer(buf, dtype=info.dtype, count=count, offset=info.start).reshape(
            info.shape
        )

    def _map(self, file: pathlib.Path) -> mmap.mmap:
        with self._lock:
            if self._closed:
                raise CheckpointError(f"CheckpointDir({str(self.path)!r}) has been closed.")
            m = self._maps.get(file)
            if m is None:
                with open(file, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    expected = self._sizes[file]
                    if size != expected:
                        raise CheckpointError(
                            f"{file} changed on disk since the checkpoint was opened (it had "
                            f"{expected} bytes, now {size}). Open the CheckpointDir again."
                        )
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self._maps[file] = m
            return m

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Release the memory maps. Arrays already returned by :meth:`array` stay usable."""
        with self._lock:
            self._closed = True
            maps, self._maps = self._maps, {}
        for m in maps.values():
            try:
                m.close()
            except BufferError:
                # Live arrays still view this map; it is unmapped once the last one is freed.
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        gib = self.nbytes() / 2**30
        return (
            f"CheckpointDir({str(self.path)!r}, {len(self._tensors)} tensors in "
            f"{len(self.files)} file(s), {gib:.2f} GiB)"
        )


def check_tensor_set(
    ckpt: CheckpointDir,
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignore: Callable[[str], bool] | None = None,
) -> None:
    """Check that a checkpoint holds exactly the expected tensors with the expected shapes.

    Args:
        ckpt: the checkpoint to check.
        expected: tensor name -> expected shape.
        ignore: predicate for checkpoint tensors that may be present without being expected
            (e.g. rotary caches or tied output embeddings).

    Raises:
        CheckpointError: listing every missing, unexpected and mis-shaped tensor at once, so a
            wrong config or model family shows up in one go rather than one tensor at a time.
    """
    have = set(ckpt.keys())
    missing = sorted((k for k in expected if k not in have), key=_natural_key)
    unexpected = sorted(
        (k for k in have if k not in expected and not (ignore is not None and ignore(k))),
        key=_natural_key,
    )
    misshaped = sorted(
        (
            (k, tuple(expected[k]), ckpt.shape(k))
            for k in expected
            if k in have and tuple(expected[k]) != ckpt.shape(k)
        ),
        key=lambda t: _natural_key(t[0]),
    )
    if not (missing or unexpected or misshaped):
        return

    # A renamed tensor usually shows up as unexpected, so look there first for the closest name.
    pool = unexpected or sorted(have)

    def missing_line(k: str) -> str:
        close = _closest(k, pool, n=1) or _closest(k, have, n=1)
        return f"{k}  (closest in checkpoint: {close[0]!r})" if close else k

    sections = []
    if missing:
        sections.append(_capped(f"{len(missing)} missing tensor(s):", missing, missing_line))
    if unexpected:
        sections.append(_capped(f"{len(unexpected)} unexpected tensor(s):", unexpected, str))
    if misshaped:
        sections.append(
            _capped(
                f"{len(misshaped)} tensor(s) with the wrong shape:",
                misshaped,
                lambda t: f"{t[0]}: expected {t[1]}, found {t[2]}",
            )
        )
    raise CheckpointError(
        f"Checkpoint {ckpt.path} does not match the model:\n"
        + "\n".join(sections)
        + "\nCheck that the checkpoint is the model you meant to load and that config.json "
        "belongs to these weights."
    )


_T = TypeVar("_T")


def _natural_key(name: str) -> list[str | int]:
    # So that layers.2 is listed before layers.10 and the first lines show the first layers.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _capped(title: str, items: list[_T], fmt: Callable[[_T], str], cap: int = 10) -> str:
    lines = [f"  {title}"] + [f"    {fmt(x)}" for x in items[:cap]]
    if len(items) > cap:
        lines.append(f"    ... and {len(items) - cap} more")
    return "\n".join(lines)
