"""The shard format: tars that tarfile, GNU tar and webdataset all read back exactly, shards published
whole or not at all, one run per output."""

import hashlib
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
import webdataset as wds

from pipelines.errors import PipelineError
from pipelines.ingest.shards import metadata_table
from pipelines.shards import ShardOutput, ShardWriter, TarStream, owned, write_shard

KEY = pa.schema([("key", pa.string())])


def test_tar_stream_round_trips_through_tarfile_and_gnu_tar(tmp_path):
    members = {"000000001.jpg": bytes(range(256)) * 7, "000000001.txt": b"a caption",
               "000000001.json": b"{}", "k" * 120 + ".txt": b"a name too long for ustar", "empty.txt": b"",
               "n" * 96 + ".txt": b"a name of exactly 100 bytes", "é€ü.json": b"y" * 513}  # checksums of bytes > 127
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


def shard_named(folder) -> list[str]:
    """Files a `*.tar` / `*.parquet` / `*.json` glob would pick up as data."""
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".tar", ".parquet", ".json"))


def test_shard_whose_publication_fails_leaves_nothing_named_like_a_shard(tmp_path):
    out = ShardOutput(str(tmp_path))
    (tmp_path / "00003_stats.json").mkdir()  # the stats cannot be published: its name is taken by a folder
    writer = ShardWriter(out, 3)
    writer.add("000030000", {"txt": b"x"})
    with pytest.raises(IsADirectoryError):
        writer.close(metadata_table([{"key": "000030000"}], pa.schema([("key", pa.string())])), {"count": 1})
    assert shard_named(tmp_path) == ["00003_stats.json"] and (tmp_path / "00003_stats.json").is_dir()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name] and out.done_shards() == set()


def test_a_run_removes_what_unfinished_shards_left_when_it_starts_and_ends(tmp_path):
    out = ShardOutput(str(tmp_path))
    write_shard(out, 0, [("000000000", {"txt": b"done"})], metadata_table([{"key": "000000000"}], KEY), {"count": 1})
    for name in ("00001.tar", "00001.parquet", "00002_stats.json", ".00003.tar.tmp-deadbeef"):
        (tmp_path / name).write_bytes(b"left by a killed writer")
    with owned(out):
        assert shard_named(tmp_path) == ["00000.parquet", "00000.tar", "00000_stats.json"]
        (tmp_path / "00004.tar").write_bytes(b"published, then the writer died")
    assert shard_named(tmp_path) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".lock"]


def test_second_run_into_an_output_is_refused_in_one_line_naming_the_holder(tmp_path):
    out = ShardOutput(str(tmp_path))
    with out.lock():
        with pytest.raises(PipelineError) as info, ShardOutput(str(tmp_path)).lock():
            pass
        message = str(info.value)
        assert message.startswith(f"{tmp_path}: in use by another run (pid {os.getpid()} on ")
        assert "\n" not in message and "--output" in message
    with out.lock():  # released when the run ends
        pass


HOLD = """
import sys, time
from pipelines.shards import ShardOutput, owned
with owned(ShardOutput(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_lock_of_a_killed_run_does_not_block_the_next(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PipelineError, match=f"in use by another run \\(pid {holder.pid} "):
            ShardOutput(str(tmp_path)).lock().__enter__()
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        with owned(ShardOutput(str(tmp_path))):  # the OS released the dead run's lock
            pass
    finally:
        holder.kill()
        holder.wait()


def test_storage_that_does_not_answer_is_an_infrastructure_error_a_wrong_path_a_mistake(tmp_path, monkeypatch):
    """Reading shards: a missing folder or a file that is not JSON is the user's mistake (exit 2, not
    retried); an object store that does not answer (a closed port on loopback) is a failure of the
    infrastructure (exit 1, retried by the flows), never reported as the user's mistake."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.errors import InfrastructureError
    from pipelines.shards import read_manifest

    with pytest.raises(PipelineError, match="no manifest.json"):
        read_manifest(str(tmp_path / "nowhere"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(PipelineError, match="cannot read manifest.json"):
        read_manifest(str(tmp_path / "bad"))

    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(InfrastructureError, match="EndpointConnectionError|ConnectionError|connect"):
        read_manifest("s3://bucket/shards")
    run = CliRunner().invoke(app, ["curate", "--input", "s3://bucket/shards", "--output", str(tmp_path / "out"),
                                   "--config", "configs/curate/text-dedup.yaml"])
    assert run.exit_code == 1, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: s3://bucket/shards: cannot read manifest.json"), run.stderr
