"""The shard tar writer: archives that tarfile, GNU tar and webdataset all read back exactly."""

import hashlib
import subprocess
import tarfile

import pyarrow as pa
import webdataset as wds

from pipelines.ingest.shards import ShardOutput, ShardWriter, TarStream, metadata_table


def test_tar_stream_round_trips_through_tarfile_and_gnu_tar(tmp_path):
    members = {"000000001.jpg": bytes(range(256)) * 7, "000000001.txt": b"a caption",
               "000000001.json": b"{}", "k" * 120 + ".txt": b"a name too long for ustar", "empty.txt": b""}
    path = tmp_path / "a.tar"
    with open(path, "wb") as f:
        stream = TarStream(f)
        for name, data in members.items():
            stream.add(name, data)
        digest = stream.close()

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with tarfile.open(path) as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar} == members
    listed = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True).stdout
    assert listed.split() == list(members)


def test_shard_writer_output_reads_back_with_webdataset(tmp_path):
    out = ShardOutput(str(tmp_path))
    writer = ShardWriter(out, 3)
    writer.add("000030000", {"jpg": b"\xff\xd8 not really", "txt": "é caption".encode()})
    writer.add("000030001", {"txt": b"second"})
    stats = writer.close(metadata_table([{"key": "000030000"}], pa.schema([("key", pa.string())])), {"count": 2})

    assert stats["samples"] == 2 and stats["shard"] == "00003"
    assert stats["tar_sha256"] == hashlib.sha256((tmp_path / "00003.tar").read_bytes()).hexdigest()
    samples = list(wds.WebDataset(str(tmp_path / "00003.tar"), shardshuffle=False))
    assert [(s["__key__"], s.get("jpg"), s["txt"]) for s in samples] == [
        ("000030000", b"\xff\xd8 not really", "é caption".encode()), ("000030001", None, b"second")]
    assert out.done_shards() == {3}


def test_aborted_shard_leaves_nothing(tmp_path):
    out = ShardOutput(str(tmp_path))
    writer = ShardWriter(out, 0)
    writer.add("000000000", {"txt": b"x"})
    writer.abort()
    assert list(tmp_path.iterdir()) == [] and out.done_shards() == set()
