"""The `.shardopt` file container: a fixed header, a JSON manifest and named binary payloads, each hashed.

Layout (all integers little-endian; format version 1)::

    offset  size  field
    0       8     magic b"SHARDOPT"
    8       4     format version (uint32)
    12      4     reserved, 0
    16      8     manifest length in bytes (uint64)
    24      32    sha256 of the manifest bytes
    56      M     manifest: UTF-8 JSON object; manifest["payloads"] lists every payload in file order as
                  {"name", "size", "sha256", "encoding": "raw" | "zlib"}
    56+M    ...   the payloads, back to back, in the order the manifest lists them
    end-8   8     trailer b"SHOPTEND"

Nothing is ever unpickled: the manifest is JSON, the payloads are bytes whose meaning the manifest names. Every
check failure raises `ArtifactError` saying which field or payload does not match. The hashes detect truncation,
corruption and edits; they are not signatures (whoever can rewrite the file can rewrite the hashes too).

This module needs only the standard library, so the CLI can read a manifest before jax starts its backends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import struct
import zlib
from collections.abc import Iterable, Mapping
from typing import IO, Any

from shardopt.core.errors import ArtifactError  # a pure-Python module: no jax is imported

MAGIC = b"SHARDOPT"
TRAILER = b"SHOPTEND"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
_HEADER = struct.Struct("<8sIIQ32s")
HEADER_SIZE = _HEADER.size  # 56
ENCODINGS = ("raw", "zlib")




def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _encode(data: bytes, encoding: str) -> bytes:
    return zlib.compress(data, 6) if encoding == "zlib" else bytes(data)


def _write_chunk(f: IO[bytes], chunk: bytes) -> None:
    """One write of the file body (a seam for tests that simulate a crash in the middle of a save)."""
    f.write(chunk)


def atomic_write(path: str | os.PathLike[str], chunks: Iterable[bytes]) -> None:
    """Writes `chunks` to a temporary file next to `path`, fsyncs it, then renames it over `path`.

    A crash or exception part way leaves `path` as it was (absent, or the previous complete file) and removes
    the temporary file, so a reader never sees a half-written artifact under the final name.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                _write_chunk(f, chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows it
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def encode_container(manifest: Mapping[str, Any], payloads: Mapping[str, tuple[bytes, str]]) -> list[bytes]:
    """The file's bytes as chunks; `payloads` maps name -> (data, encoding). Adds manifest["payloads"]."""
    entries, bodies = [], []
    for name, (data, encoding) in payloads.items():
        if encoding not in ENCODINGS:
            raise ValueError(f"payload {name!r}: unknown encoding {encoding!r}")
        body = _encode(data, encoding)
        entries.append({"name": name, "size": len(body), "sha256": sha256(body), "encoding": encoding})
        bodies.append(body)
    doc = {"format": "shardopt-artifact", "format_version": FORMAT_VERSION, **manifest, "payloads": entries}
    manifest_bytes = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(manifest_bytes), hashlib.sha256(manifest_bytes).digest())
    return [header, manifest_bytes, *bodies, TRAILER]


def write_container(path: str | os.PathLike[str], manifest: Mapping[str, Any],
                    payloads: Mapping[str, tuple[bytes, str]]) -> int:
    """Writes the container atomically; returns its size in bytes."""
    chunks = encode_container(manifest, payloads)
    atomic_write(path, chunks)
    return sum(len(c) for c in chunks)


def _parse_header(data: bytes, where: str) -> tuple[int, dict[str, Any]]:
    """Checks magic, version and the manifest hash; returns (manifest end offset, manifest)."""
    if not data:
        raise ArtifactError(f"{where}: empty file, not a shardopt artifact")
    if len(data) < HEADER_SIZE:
        if not MAGIC.startswith(data[: len(MAGIC)]):
            raise ArtifactError(f"{where}: not a shardopt artifact (no {MAGIC!r} header)")
        raise ArtifactError(f"{where}: truncated: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, _, mlen, mhash = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ArtifactError(f"{where}: not a shardopt artifact (starts with {magic!r}, expected {MAGIC!r})")
    if version not in SUPPORTED_VERSIONS:
        raise ArtifactError(f"{where}: unknown artifact format version {version}; this shardopt reads format "
                            f"version(s) {list(SUPPORTED_VERSIONS)} (upgrade shardopt to read newer artifacts)")
    end = HEADER_SIZE + mlen
    if len(data) < end:
        raise ArtifactError(f"{where}: truncated: the header announces a {mlen}-byte manifest but the file has "
                            f"{len(data)} bytes in all")
    manifest_bytes = data[HEADER_SIZE:end]
    if hashlib.sha256(manifest_bytes).digest() != mhash:
        raise ArtifactError(f"{where}: the manifest was modified or corrupted (sha256 {sha256(manifest_bytes)} "
                            f"does not match the header's {mhash.hex()})")
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{where}: the manifest is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("payloads"), list):
        raise ArtifactError(f"{where}: the manifest has no payload list")
    if manifest.get("format_version") != version:
        raise ArtifactError(f"{where}: the manifest says format version {manifest.get('format_version')!r}, the "
                            f"header {version}")
    return end, manifest


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified manifest alone (reads only the header and manifest; payloads are not checked)."""
    where = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
        if len(head) == HEADER_SIZE:
            mlen = _HEADER.unpack_from(head)[3] if head[: len(MAGIC)] == MAGIC else 0
            head += f.read(min(mlen, 1 << 31))
    return _parse_header(head, where)[1]


def read_container(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Reads and verifies the whole file; returns the manifest and the decoded payloads by name."""
    where = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    offset, manifest = _parse_header(data, where)
    entries = manifest["payloads"]
    try:
        sizes = [int(e["size"]) for e in entries]
        names = [str(e["name"]) for e in entries]
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{where}: the manifest's payload list is malformed") from None
    expected = offset + sum(sizes) + len(TRAILER)
    if len(data) < expected:
        raise ArtifactError(f"{where}: truncated: the manifest describes a {expected}-byte file, it has "
                            f"{len(data)} bytes")
    if len(data) > expected:
        raise ArtifactError(f"{where}: {len(data) - expected} unexpected bytes after the last payload")
    if data[-len(TRAILER):] != TRAILER:
        raise ArtifactError(f"{where}: corrupted: the file does not end with the {TRAILER!r} trailer")
    payloads: dict[str, bytes] = {}
    for entry, name, size in zip(entries, names, sizes, strict=True):
        body = data[offset:offset + size]
        offset += size
        if sha256(body) != entry.get("sha256"):
            raise ArtifactError(f"{where}: payload {name!r} is corrupted or was modified (sha256 {sha256(body)}, "
                                f"the manifest says {entry.get('sha256')})")
        encoding = entry.get("encoding", "raw")
        if encoding not in ENCODINGS:
            raise ArtifactError(f"{where}: payload {name!r} has unknown encoding {encoding!r}")
        try:
            payloads[name] = zlib.decompress(body) if encoding == "zlib" else body
        except zlib.error as e:
            raise ArtifactError(f"{where}: payload {name!r} does not decompress: {e}") from None
    return manifest, payloads


__all__ = ["ArtifactError", "FORMAT_VERSION", "HEADER_SIZE", "MAGIC", "TRAILER", "atomic_write", "encode_container",
           "read_container", "read_manifest", "sha256", "write_container"]
