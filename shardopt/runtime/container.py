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
import stat
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # it exists (owned by someone else), or we cannot tell: keep its file
        return True
    return True


def remove_stale_partials(path: str | os.PathLike[str]) -> list[str]:
    """Removes the temporary files `atomic_write` left next to `path` when a writer was killed mid-save.

    They are named `.<name>.<pid>.<8 hex>.partial`; only those whose writer pid no longer runs are removed (a
    live pid may be a concurrent save). Returns the paths removed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix, suffix = f".{os.path.basename(path)}.", ".partial"
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid, dot, token = name[len(prefix):-len(suffix)].partition(".")
        if not (dot and pid.isdigit() and len(token) == 8 and all(c in "0123456789abcdef" for c in token)):
            continue  # another file's temporary (a target whose name extends this one's) or not ours
        if int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
    return removed


def atomic_write(path: str | os.PathLike[str], chunks: Iterable[bytes]) -> None:
    """Writes `chunks` to a temporary file next to `path`, fsyncs it, then renames it over `path`.

    A crash or exception part way leaves `path` as it was (absent, or the previous complete file) and removes
    the temporary file, so a reader never sees a half-written artifact under the final name. A writer killed
    outright (SIGKILL) cannot remove its temporary file; the next save to the same `path` does.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_partials(path)
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


MAX_MANIFEST_DEPTH = 256  # JSON nesting; a manifest nests ~2 levels per level of the params pytree


def _json_depth_exceeds(doc: Any, limit: int) -> bool:
    """Whether `doc` nests deeper than `limit` (iterative, so it cannot itself overflow the stack)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return False


def _check_header(head: bytes, where: str, file_size: int) -> tuple[int, int, bytes]:
    """Checks the fixed header; returns (format version, manifest length, manifest sha256)."""
    if not head:
        raise ArtifactError(f"{where}: empty file, not a shardopt artifact")
    if len(head) < HEADER_SIZE:
        if not MAGIC.startswith(head[: len(MAGIC)]):
            raise ArtifactError(f"{where}: not a shardopt artifact (no {MAGIC!r} header)")
        raise ArtifactError(f"{where}: truncated: {len(head)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, reserved, mlen, mhash = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise ArtifactError(f"{where}: not a shardopt artifact (starts with {magic!r}, expected {MAGIC!r})")
    if version not in SUPPORTED_VERSIONS:
        raise ArtifactError(f"{where}: unknown artifact format version {version}; this shardopt reads format "
                            f"version(s) {list(SUPPORTED_VERSIONS)} (upgrade shardopt to read newer artifacts)")
    if reserved != 0:
        raise ArtifactError(f"{where}: corrupted header: the reserved bytes 12-15 are {reserved:#010x}, not 0")
    if HEADER_SIZE + mlen > file_size:
        raise ArtifactError(f"{where}: truncated: the header announces a {mlen}-byte manifest but the file has "
                            f"{file_size} bytes in all")
    return version, mlen, mhash


def _parse_manifest(manifest_bytes: bytes, mhash: bytes, version: int, where: str) -> dict[str, Any]:
    if hashlib.sha256(manifest_bytes).digest() != mhash:
        raise ArtifactError(f"{where}: the manifest was modified or corrupted (sha256 {sha256(manifest_bytes)} "
                            f"does not match the header's {mhash.hex()})")
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{where}: the manifest is not valid JSON: {e}") from None
    except RecursionError:
        raise ArtifactError(f"{where}: the manifest nests too deeply to be read") from None
    if _json_depth_exceeds(manifest, MAX_MANIFEST_DEPTH):
        raise ArtifactError(f"{where}: the manifest nests deeper than {MAX_MANIFEST_DEPTH} levels")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("payloads"), list):
        raise ArtifactError(f"{where}: the manifest has no payload list")
    if manifest.get("format_version") != version:
        raise ArtifactError(f"{where}: the manifest says format version {manifest.get('format_version')!r}, the "
                            f"header {version}")
    return manifest


def _parse_header(data: bytes, where: str) -> tuple[int, dict[str, Any]]:
    """Checks magic, version, the reserved bytes and the manifest hash of a whole file's bytes; returns
    (manifest end offset, manifest)."""
    version, mlen, mhash = _check_header(data[:HEADER_SIZE], where, len(data))
    end = HEADER_SIZE + mlen
    return end, _parse_manifest(data[HEADER_SIZE:end], mhash, version, where)


@contextlib.contextmanager
def _open_regular(path: str | os.PathLike[str], where: str) -> Any:
    """Opens `path` for reading if it is a regular file; a FIFO, device, socket or directory is refused before
    anything is read (and opening does not block: O_NONBLOCK, so a FIFO without a writer cannot hang us).
    Yields (file, size)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise ArtifactError(f"{where}: a directory, not a shardopt artifact") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a character device" if stat.S_ISCHR(st.st_mode)
                    else "a block device" if stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise ArtifactError(f"{where}: {kind}, not a shardopt artifact (artifacts are regular files)")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st.st_size


def _read_exactly(f: IO[bytes], n: int, where: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ArtifactError(f"{where}: truncated while reading: the file shrank ({what})")
    return data


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verified manifest alone (reads only the header and manifest; payloads are not checked)."""
    where = os.fspath(path)
    with _open_regular(path, where) as (f, size):
        head = f.read(HEADER_SIZE)
        version, mlen, mhash = _check_header(head, where, size)
        manifest_bytes = _read_exactly(f, mlen, where, "manifest")
    return _parse_manifest(manifest_bytes, mhash, version, where)


def read_container(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Reads and verifies the whole file; returns the manifest and the decoded payloads by name.

    Reads only what the header and manifest announce, and never more than the file's size."""
    where = os.fspath(path)
    with _open_regular(path, where) as (f, file_size):
        head = f.read(HEADER_SIZE)
        version, mlen, mhash = _check_header(head, where, file_size)
        manifest = _parse_manifest(_read_exactly(f, mlen, where, "manifest"), mhash, version, where)
        offset = HEADER_SIZE + mlen
        entries = manifest["payloads"]
        try:
            sizes = [int(e["size"]) for e in entries]
            names = [str(e["name"]) for e in entries]
        except (KeyError, TypeError, ValueError, OverflowError):
            raise ArtifactError(f"{where}: the manifest's payload list is malformed") from None
        if any(s < 0 for s in sizes):
            raise ArtifactError(f"{where}: the manifest's payload list has a negative size")
        expected = offset + sum(sizes) + len(TRAILER)
        if file_size < expected:
            raise ArtifactError(f"{where}: truncated: the manifest describes a {expected}-byte file, it has "
                                f"{file_size} bytes")
        if file_size > expected:
            raise ArtifactError(f"{where}: {file_size - expected} unexpected bytes after the last payload")
        data = _read_exactly(f, expected - offset, where, "payloads")
    if data[-len(TRAILER):] != TRAILER:
        raise ArtifactError(f"{where}: corrupted: the file does not end with the {TRAILER!r} trailer")
    payloads: dict[str, bytes] = {}
    pos = 0
    for entry, name, size in zip(entries, names, sizes, strict=True):
        body = data[pos:pos + size]
        pos += size
        if not isinstance(entry, dict) or sha256(body) != entry.get("sha256"):
            raise ArtifactError(f"{where}: payload {name!r} is corrupted or was modified (sha256 {sha256(body)}, "
                                f"the manifest says {entry.get('sha256') if isinstance(entry, dict) else None})")
        encoding = entry.get("encoding", "raw")
        if encoding not in ENCODINGS:
            raise ArtifactError(f"{where}: payload {name!r} has unknown encoding {encoding!r}")
        try:
            payloads[name] = zlib.decompress(body) if encoding == "zlib" else body
        except zlib.error as e:
            raise ArtifactError(f"{where}: payload {name!r} does not decompress: {e}") from None
    return manifest, payloads


__all__ = ["ArtifactError", "FORMAT_VERSION", "HEADER_SIZE", "MAGIC", "MAX_MANIFEST_DEPTH", "TRAILER", "atomic_write",
           "encode_container", "read_container", "read_manifest", "remove_stale_partials", "sha256", "write_container"]
