"""Reading safetensors files one tensor at a time, with every header field checked.

Layout: 8 bytes (little-endian u64) header length N, N bytes of JSON
    {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}
then the raw data; offsets are relative to the first data byte.

Each tensor is read with `readinto` straight into a freshly allocated tensor, not through a memory
map: mapped file pages count toward the process's resident memory while the map is open, so a
memory-mapped load of an N-byte checkpoint peaks near 2N; this one stays near N. A header that is
not JSON, names an unknown dtype, or claims offsets outside the file or inconsistent with the shape
is refused with the file and key named.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from nanoseek.errors import NanoseekError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
MAX_HEADER = 100 * 1024 * 1024


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise NanoseekError(f"{self.path} is a folder, not a safetensors file")
        if not self.path.is_file():
            raise NanoseekError(f"{self.path} is missing")
        self.size = self.path.stat().st_size
        try:
            self.entries, self.data_start = self._read_header()
        except OSError as e:
            raise NanoseekError(f"{self.path} cannot be read ({e.strerror or e})") from None

    def _fail(self, what: str):
        raise NanoseekError(f"{self.path} is corrupt or truncated: {what}")

    def _read_header(self):
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                self._fail("shorter than the 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n > min(MAX_HEADER, self.size - 8):  # not a safetensors file at all: its first bytes mean nothing
                self._fail("its first 8 bytes do not give a header length that fits in the file")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except UnicodeDecodeError:
                self._fail("header is not UTF-8 JSON")
            except json.JSONDecodeError as e:
                self._fail(f"header is not JSON ({e})")
            except RecursionError:
                self._fail("header is JSON nested too deeply")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        header.pop("__metadata__", None)
        data_len = self.size - 8 - n
        for key, entry in header.items():
            self._check_entry(key, entry, data_len)
        self._check_no_overlap(header)
        return header, 8 + n

    def _check_entry(self, key: str, entry, data_len: int):
        if not isinstance(entry, dict):
            self._fail(f"tensor {key!r} is described by {type(entry).__name__}, not an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            self._fail(f"tensor {key!r} has an unknown dtype {_short(dtype)}; valid: {', '.join(DTYPES)}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(_is_int(s) and s >= 0 for s in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
        ):
            self._fail(f"tensor {key!r} has a malformed shape {_short(shape)} or data_offsets {_short(offsets)}")
        begin, end = offsets
        if not (_is_int(begin) and _is_int(end) and 0 <= begin <= end <= data_len):
            self._fail(f"tensor {key!r} claims bytes {_short(begin)}..{_short(end)} of a {data_len}-byte data section")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            self._fail(f"tensor {key!r} spans {end - begin} bytes but its shape {shape} needs {nbytes}")

    def _check_no_overlap(self, header: dict):
        spans = sorted((e["data_offsets"][0], e["data_offsets"][1], k) for k, e in header.items())
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                self._fail(f"tensors {first!r} and {second!r} overlap in the data section")

    def keys(self):
        return self.entries.keys()

    def get(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        dtype = DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            view = memoryview(buffer.numpy())
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    self._fail(f"tensor {key!r} ends early")
                got += n
        return buffer.view(dtype).reshape(entry["shape"])

    def load_all(self) -> dict[str, torch.Tensor]:
        return {key: self.get(key) for key in self.keys()}
