"""Downloading data shards over HTTP from a real server on 127.0.0.1: checksums, resume, clear errors."""

import hashlib
import http.server
import threading

import pytest

from trainer import prepare

PAYLOAD = (b"the quick brown fox jumps over the lazy dog. " * 4000)[:150_000]
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class ShardServer(http.server.ThreadingHTTPServer):
    """Serves PAYLOAD at /shard.txt with Range support; can be told to drop the first response midway."""

    drop_first_after: int | None = None
    ranges: list[str | None]


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server: ShardServer = self.server
        if self.path != "/shard.txt":
            self.send_error(404)
            return
        header = self.headers.get("Range")
        server.ranges.append(header)
        start = int(header.split("=")[1].split("-")[0]) if header else 0
        body = PAYLOAD[start:]
        self.send_response(206 if header else 200)
        if header:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drop_first_after is not None:
            cut, server.drop_first_after = server.drop_first_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection dies mid-body
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = ShardServer(("127.0.0.1", 0), Handler)
    srv.ranges = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_download_with_checksum_then_prepare(server, tmp_path):
    srv, base = server
    meta = prepare.prepare(tmp_path, f"{base}/shard.txt", sha256=SHA)
    assert (tmp_path / "shard.txt").read_bytes() == PAYLOAD
    assert meta["train_tokens"] + meta["val_tokens"] == len(PAYLOAD)
    # A second prepare finds the verified file and does not download again.
    prepare.prepare(tmp_path, f"{base}/shard.txt", sha256=SHA)
    assert srv.ranges == [None]


def test_checksum_mismatch_is_one_clear_error_and_leaves_nothing(server, tmp_path):
    _, base = server
    with pytest.raises(prepare.DataError, match="checksum mismatch for .*shard.txt"):
        prepare.download(f"{base}/shard.txt", tmp_path / "shard.txt", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    srv, base = server
    srv.drop_first_after = 50_000
    with pytest.raises(prepare.DataError, match="rerun to resume"):
        prepare.download(f"{base}/shard.txt", tmp_path / "shard.txt", sha256=SHA)
    assert (tmp_path / "shard.txt.partial").stat().st_size == 50_000
    path = prepare.download(f"{base}/shard.txt", tmp_path / "shard.txt", sha256=SHA)
    assert path.read_bytes() == PAYLOAD
    assert srv.ranges == [None, "bytes=50000-"]


def test_missing_shard_and_unreachable_server(server, tmp_path):
    _, base = server
    with pytest.raises(prepare.DataError, match="HTTP 404"):
        prepare.download(f"{base}/nope.txt", tmp_path / "nope.txt", sha256=None)
    with pytest.raises(prepare.DataError, match="downloading http://127.0.0.1:9/x.txt failed"):
        prepare.download("http://127.0.0.1:9/x.txt", tmp_path / "x.txt", sha256=None, timeout=5)


def test_parquet_shards(tmp_path):
    import pyarrow as pa  # in the test extra: this test never skips
    import pyarrow.parquet as pq

    docs = [f"document {i}: " + "words " * 50 for i in range(100)]
    pq.write_table(pa.table({"text": docs, "id": list(range(100))}), tmp_path / "shard.parquet")
    meta = prepare.prepare(tmp_path / "out", str(tmp_path / "shard.parquet"))
    total = (tmp_path / "out" / "train.bin").read_bytes() + (tmp_path / "out" / "val.bin").read_bytes()
    assert total == "\n".join(docs).encode()
    assert meta["train_tokens"] > meta["val_tokens"] > 0
    pq.write_table(pa.table({"body": ["x" * 2000]}), tmp_path / "wrong.parquet")
    with pytest.raises(prepare.DataError, match="wrong.parquet is not a readable parquet shard"):
        prepare.prepare(tmp_path / "out2", str(tmp_path / "wrong.parquet"))
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(prepare.DataError, match="corrupt.parquet is not a readable parquet shard"):
        prepare.prepare(tmp_path / "out3", str(tmp_path / "corrupt.parquet"))
