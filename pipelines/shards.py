"""The shard format, owned here: every stage reads and writes shards through this module.

A shard folder (local path or fsspec URL) holds shards in img2dataset's layout, readable by
`webdataset.WebDataset`: `NNNNN.tar` (samples: `KEY.jpg`/`.webp`/`.png`, `KEY.txt`, `KEY.json`),
`NNNNN.parquet` (one row per input row, failures included) and `NNNNN_stats.json`, plus
`manifest.json` listing every shard with its sample count and sha256.

Publication: nothing named like a shard file exists until the whole shard is done. Its three files
are staged under names no `*.tar`/`*.parquet`/`*.json` glob matches (`.00002.tar.tmp-xxxx` beside
the output on local disk, a local temporary folder for object stores), then published back to back
(a rename, or one whole PUT), stats last: the stats file marks the shard done. A run owns its output
(`OutputLock`) and removes the files of unfinished shards when it starts and ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from typing import IO, Any, Callable, Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipelines import __version__
from pipelines.errors import InfrastructureError, PipelineError
from pipelines.runtime import filesystem

MANIFEST = "manifest.json"
FORMAT = "pipelines.shards/v1"
LOCK = ".lock"  # a dotfile: no glob over the shards reads it
IMAGE_EXTS = ("jpg", "jpeg", "webp", "png")  # the image members a sample may have, in order of preference
TAR_ERRORS = (OSError, tarfile.TarError, EOFError)  # what reading a missing, truncated or non-tar file raises


# -- names and paths --------------------------------------------------------------------------------
def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def shard_files(shard_id: int) -> tuple[str, str, str]:
    """The tar, parquet and stats file names of a shard."""
    name = shard_name(shard_id)
    return f"{name}.tar", f"{name}.parquet", f"{name}_stats.json"


def shard_id_of(name: str) -> int | None:
    """The shard a file name belongs to (`00002.tar`, `00002.parquet`, `00002_stats.json`), else None."""
    for suffix in (".tar", ".parquet", "_stats.json"):
        stem = name.removesuffix(suffix)
        if stem != name and stem.isdigit():
            return int(stem)
    return None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is the local disk (renames are atomic there; object stores get whole PUTs instead)."""
    return isinstance(fs, LocalFileSystem)


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of `fs` as a URL that any process can open: an absolute path on local disk, else with its
    protocol (`s3://bucket/key`; fsspec's paths leave it out)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def absolute(url: str) -> str:
    """A local path made absolute (tasks run in other folders); an fsspec URL as it is."""
    fs, path = filesystem(url)
    return url_of(fs, path) if is_local(fs) else url


# -- tars -------------------------------------------------------------------------------------------
def _ustar_template() -> bytearray:
    """A ustar header with every field but the name, the size and the checksum filled in."""
    h = bytearray(512)
    h[100:124] = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid
    h[136:148] = b"00000000000\x00"  # mtime 0: the same content gives the same bytes
    h[148:156] = b" " * 8  # the checksum field counts as spaces while summing
    h[156:157] = b"0"  # regular file
    h[257:265] = b"ustar\x0000"
    return h


_USTAR = bytes(_ustar_template())
_USTAR_SUM = sum(_USTAR)


class TarStream:
    """Appends files to a tar stream, hashing it on the way.

    Our own because it is measurably cheaper where it runs, on the crawl's event-loop thread: 0.04 ms
    per sample (image, caption, metadata) against 0.16 ms with webdataset.TarWriter/tarfile, which
    build PAX headers in Python. Plain POSIX ustar entries (names up to 100 bytes; longer ones fall
    back to tarfile's PAX header), which tarfile, GNU tar and webdataset read.
    """

    def __init__(self, f: Any):
        self.f = f
        self.sha = hashlib.sha256()

    def _write(self, data: bytes) -> None:
        self.sha.update(data)
        self.f.write(data)

    @staticmethod
    def header(name: str, size: int) -> bytes:
        raw = name.encode()
        if len(raw) > 100:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, 0, 0o644
            return info.tobuf(format=tarfile.PAX_FORMAT)
        h = bytearray(_USTAR)
        h[0:len(raw)] = raw
        size_field = b"%011o\x00" % size
        h[124:136] = size_field
        # The checksum sums every byte of the header: those of the fixed fields once (`_USTAR_SUM`), the name's
        # and the size's here (summing all 512 bytes took 8 µs a header, three headers a sample).
        h[148:156] = b"%06o\x00 " % (_USTAR_SUM + sum(raw) + sum(size_field))
        return bytes(h)

    def add(self, name: str, data: bytes) -> None:
        self._write(self.header(name, len(data)))
        self._write(data)
        if len(data) % 512:
            self._write(bytes(512 - len(data) % 512))

    def close(self) -> str:
        """End the archive; return its sha256."""
        self._write(bytes(1024))
        return self.sha.hexdigest()


def tar_samples(f: IO[bytes], exts: Iterable[str] | None = None) -> dict[str, dict[str, bytes]]:
    """The samples of a shard tar read from `f`, in tar order: key -> {extension: bytes}, only the
    members whose extension is in `exts` (default: all). Raises one of `TAR_ERRORS` if it is not whole."""
    wanted = None if exts is None else set(exts)
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if member.isfile() and (wanted is None or ext in wanted):
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def read_tar(url: str, exts: Iterable[str] | None = None) -> dict[str, dict[str, bytes]]:
    """`tar_samples` of the tar at `url` (local path or fsspec URL)."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return tar_samples(f, exts)


def image_of(sample: dict[str, bytes]) -> tuple[str, bytes] | None:
    """(extension, bytes) of a sample's image, whichever format the crawl wrote it in; None if it has none."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    return None if ext is None else (ext, sample[ext])


# -- manifests --------------------------------------------------------------------------------------
def manifest_digest(shards: list[dict[str, Any]]) -> str:
    """What identifies a shard set's content: every tar's name, sha256 and sample count."""
    return hashlib.sha256("\n".join(f"{s['tar']} {s['sha256']} {s['samples']}" for s in shards).encode()).hexdigest()


def storage_error(exc: BaseException, what: str) -> PipelineError | InfrastructureError:
    """`exc`, raised while reading or writing storage, as one of the two kinds of error: the user's mistake
    when the path itself is wrong (missing, not a folder, not allowed, not JSON), else a failure of the
    storage or the network under it (a timeout, a reset connection, an S3 error), which a retry may get past."""
    mistakes = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError,
                ValueError)
    kind = PipelineError if isinstance(exc, mistakes) else InfrastructureError
    return kind(f"{what} ({type(exc).__name__}: {exc})")


def read_manifest(url: str) -> dict[str, Any]:
    """The `manifest.json` of the shard folder at `url`; a PipelineError naming `url` if there is none."""
    fs, root = filesystem(url)
    try:
        with fs.open(f"{root.rstrip('/')}/{MANIFEST}", "rb") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise PipelineError(f"{url}: no {MANIFEST} (not a shard folder, or the run writing it has not finished)") from None
    except Exception as exc:  # noqa: BLE001 (s3fs lets botocore's connection errors through unwrapped)
        raise storage_error(exc, f"{url}: cannot read {MANIFEST}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list) or "digest" not in manifest:
        raise PipelineError(f"{url}: {MANIFEST} is not a shard manifest (no `shards` list or `digest`)")
    return manifest


# -- publication ------------------------------------------------------------------------------------
def _temporary(path: str) -> str:
    """A name beside `path` that no shard glob matches and no other writer uses."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")


def write_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `path` whole: a temporary renamed into place on local disk, one PUT on object stores."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    staged = _temporary(path)
    try:
        with open(staged, "wb") as f:
            f.write(data)
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staged)
        raise


class ShardOutput:
    """A shard folder being written (local path or fsspec URL)."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = filesystem(url)
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            # Only a file is in the way: on an object store a prefix with nothing under it is no folder yet.
            if self.fs.isfile(self.root):
                raise NotADirectoryError(url)
        except Exception as exc:  # noqa: BLE001 (s3fs lets botocore's connection errors through unwrapped)
            raise storage_error(exc, f"{url}: cannot use as output folder") from exc

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _names(self) -> set[str]:
        """The names of the files (not folders) in the output."""
        self.fs.invalidate_cache(self.root)  # other processes write here: never trust a cached listing
        try:
            return {os.path.basename(e["name"]) for e in self.fs.ls(self.root, detail=True) if e["type"] == "file"}
        except FileNotFoundError:
            return set()

    def done_shards(self) -> set[int]:
        """Shards whose tar, parquet and stats are all in place."""
        names = self._names()
        return {sid for sid in map(shard_id_of, names) if sid is not None
                and all(f in names for f in shard_files(sid))}

    def remove_unfinished(self) -> list[str]:
        """Delete what killed or failed writers left: temporaries (local disk; object stores get whole
        PUTs) and every file of a shard that is not done. Only while no writer is at work (the
        run holds `lock()`). Returns the names removed."""
        names = self._names()
        done = {sid for sid in map(shard_id_of, names) if sid is not None
                and all(f in names for f in shard_files(sid))}
        gone = sorted(n for n in names if (".tmp-" in n and is_local(self.fs))
                      or shard_id_of(n) not in (None, *done))
        for name in gone:
            self.fs.rm(self.path(name))
        return gone

    def remove_shards(self, keep: Callable[[dict[str, Any]], bool] = lambda stats: False) -> None:
        """Delete every done shard whose stats `keep` rejects (default: all), stats first, and the manifest."""
        if self.fs.exists(self.path(MANIFEST)):
            self.fs.rm(self.path(MANIFEST))
        for sid in sorted(self.done_shards()):
            if not keep(self.read_json(shard_files(sid)[2])):
                for name in reversed(shard_files(sid)):
                    self.fs.rm(self.path(name))

    def lock(self) -> OutputLock:
        return OutputLock(self)

    def read_json(self, name: str) -> Any:
        with self.fs.open(self.path(name), "rb") as f:
            return json.load(f)

    def read_parquet(self, name: str) -> pa.Table:
        with self.fs.open(self.path(name), "rb") as f:
            return pq.read_table(f)

    def read_tar(self, name: str) -> dict[str, dict[str, bytes]]:
        """Samples of a shard tar: key -> {extension: bytes}."""
        with self.fs.open(self.path(name), "rb") as f:
            return tar_samples(f)

    def staging(self, name: str) -> str:
        """A local path to write `name` to before `commit`."""
        if is_local(self.fs):
            return _temporary(self.path(name))
        return os.path.join(tempfile.mkdtemp(prefix="pipelines-"), name)

    def commit(self, staged: str, name: str) -> None:
        """Publish a staged file as `name` (a rename, or one whole PUT)."""
        if is_local(self.fs):
            os.replace(staged, self.path(name))
        else:
            try:
                self.fs.put_file(staged, self.path(name))
            finally:
                self.discard(staged)

    def discard(self, staged: str) -> None:
        """Remove a staged file (on object stores, with the temporary folder it was staged in)."""
        if is_local(self.fs):
            with contextlib.suppress(FileNotFoundError):
                os.remove(staged)
        else:
            shutil.rmtree(os.path.dirname(staged), ignore_errors=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        write_file(self.fs, self.path(name), data)


class ShardWriter:
    """Writes one shard: samples stream into a staged tar as they are ready (so finishing a shard
    costs only its parquet and stats), then `close` stages the parquet and stats and publishes all
    three back to back, stats last. A shard whose publication fails is removed whole."""

    def __init__(self, out: ShardOutput, shard_id: int, input_digest: str | None = None):
        self.out, self.shard_id, self.input_digest = out, shard_id, input_digest
        self.count = 0
        self._names = shard_files(shard_id)
        self._staged = [out.staging(self._names[0])]
        self._file = open(self._staged[0], "wb")
        self._tar = TarStream(self._file)

    def add(self, key: str, files: dict[str, bytes]) -> None:
        """One sample: `files` maps extensions (jpg, txt, json) to contents."""
        for ext, data in files.items():
            self._tar.add(f"{key}.{ext}", data)
        self.count += 1

    def close(self, table: pa.Table, stats: dict[str, Any]) -> dict[str, Any]:
        """Publish the shard; return the stats written. On failure nothing of the shard is left."""
        tar_sha256 = self._tar.close()
        self._file.close()
        stats = dict(stats, shard=shard_name(self.shard_id), samples=self.count, tar_sha256=tar_sha256,
                     node_id=ray_node_id())
        if self.input_digest is not None:
            stats["input_digest"] = self.input_digest
        try:
            self._staged.append(self.out.staging(self._names[1]))
            pq.write_table(table, self._staged[1])
            self._staged.append(self.out.staging(self._names[2]))
            with open(self._staged[2], "wb") as f:
                f.write(json.dumps(stats, indent=2).encode())
            self._publish()
        except BaseException:
            self.abort()
            raise
        return stats

    def _publish(self) -> None:
        stats_path = self.out.path(self._names[2])
        if self.out.fs.isfile(stats_path):  # a shard being rewritten is not done until its new stats are in
            self.out.fs.rm(stats_path)
        published: list[str] = []
        try:
            for staged, name in zip(list(self._staged), self._names, strict=True):
                self.out.commit(staged, name)
                self._staged.remove(staged)
                published.append(name)
        except BaseException:
            for name in published:
                with contextlib.suppress(OSError):
                    self.out.fs.rm(self.out.path(name))
            raise

    def abort(self) -> None:
        """Drop what is staged (the shard stays not done)."""
        self._file.close()
        for staged in self._staged:
            self.out.discard(staged)
        self._staged.clear()


def ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray): a shard's stats say where it was written."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def write_shard(out: ShardOutput, shard_id: int, samples: Iterable[tuple[str, dict[str, bytes]]],
                table: pa.Table, stats: dict[str, Any], input_digest: str | None = None) -> dict[str, Any]:
    """Write one shard whose samples are all at hand; return the stats written."""
    writer = ShardWriter(out, shard_id, input_digest)
    try:
        for key, files in samples:
            writer.add(key, files)
    except BaseException:
        writer.abort()
        raise
    return writer.close(table, stats)


def write_manifest(out: ShardOutput, kind: str, config: dict[str, Any], config_digest: str,
                   shard_stats: list[dict[str, Any]], run_stats: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `manifest.json`: every shard with its sample count and sha256, the config, the version.

    `digest` identifies the shard set's content; later stages key caching and lineage on it.
    """
    shards = []
    for s in sorted(shard_stats, key=lambda s: s["shard"]):
        tar_name, parquet_name, stats_name = shard_files(int(s["shard"]))
        shards.append({"name": s["shard"], "tar": tar_name, "parquet": parquet_name, "stats": stats_name,
                       "samples": s["samples"], "rows": s["count"], "sha256": s["tar_sha256"]})
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "digest": manifest_digest(shards),
        "pipelines_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "config_digest": config_digest,
        "samples": sum(s["samples"] for s in shards),
        "stats": run_stats,
        **(extra or {}),
        "shards": shards,
    }
    out.write_bytes(MANIFEST, json.dumps(manifest, indent=2).encode())
    return manifest


# -- one run per output -----------------------------------------------------------------------------
class OutputLock:
    """One run owns an output at a time; a second gets a PipelineError naming the output and the holder.

    On local disk: `fcntl.flock` on `OUTPUT/.lock`, which the OS releases when the process dies. On
    object stores: a `.lock` object naming its owner, renewed by a heartbeat and free once it has not
    been renewed for `ttl_s` (so a killed run holds it at most that long).
    """

    def __init__(self, out: ShardOutput, ttl_s: float = 60.0):
        self.out, self.ttl_s = out, ttl_s
        self.owner = {"run": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _refused(self, holder: Any) -> PipelineError:
        who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
               if isinstance(holder, dict) else "another run")
        return PipelineError(f"{self.out.url}: in use by another run ({who}); wait for it to end or "
                             "write to another --output")

    def __enter__(self) -> OutputLock:
        if is_local(self.out.fs):
            self._lock_file()
        else:
            self._lock_object()
        return self

    def _lock_file(self) -> None:
        path = self.out.path(LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = None
            with contextlib.suppress(OSError, ValueError), open(path, "rb") as f:
                holder = json.load(f)
            raise self._refused(holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self.owner).encode())
        self._fd = fd

    def _read_object(self) -> Any:
        try:
            return json.loads(self.out.fs.cat_file(self.out.path(LOCK)))
        except (FileNotFoundError, ValueError):
            return None

    def _write_object(self) -> None:
        self.out.fs.pipe_file(self.out.path(LOCK), json.dumps({**self.owner, "expires": time.time() + self.ttl_s}).encode())

    def _lock_object(self) -> None:
        holder = self._read_object()
        if isinstance(holder, dict) and holder.get("run") != self.owner["run"] and holder.get("expires", 0) > time.time():
            raise self._refused(holder)
        self._write_object()
        time.sleep(0.2)  # two runs that both found it free: the last PUT wins, the other backs off
        holder = self._read_object()
        if not isinstance(holder, dict) or holder.get("run") != self.owner["run"]:
            raise self._refused(holder)
        self._heartbeat = threading.Thread(target=self._renew, daemon=True, name="output-lock")
        self._heartbeat.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            with contextlib.suppress(OSError):
                self._write_object()

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
        if self._heartbeat is not None:
            self._stop.set()
            self._heartbeat.join()
            self._heartbeat = None
            with contextlib.suppress(OSError):
                if (self._read_object() or {}).get("run") == self.owner["run"]:
                    self.out.fs.rm(self.out.path(LOCK))


@contextlib.contextmanager
def owned(out: ShardOutput) -> Iterator[ShardOutput]:
    """Hold `out` for one run: lock it, and remove unfinished shards when the run starts and when it ends."""
    with out.lock():
        out.remove_unfinished()
        yield out
        out.remove_unfinished()
