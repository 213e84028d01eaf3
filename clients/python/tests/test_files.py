"""Files in the session's working directory: upload from bytes, a path or a file object (streamed),
list, download whole or into a file as it arrives, delete, and the API's refusals as exceptions."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

import pytest

from kernelbox import FileNotFound, InvalidPath, Session, WrongKind


def test_upload_list_download_delete(session: Session, tmp_path: Path) -> None:
    written = session.files.upload("data/sales.csv", b"a,b\n1,2\n")
    assert written.path == "data/sales.csv" and written.size == 8 and written.mtime > 0

    listing = session.files.list("data")
    assert listing.path == "data" and not listing.truncated
    assert [(e.name, e.size, e.kind) for e in listing.entries] == [("sales.csv", 8, "file")]
    assert "data" in session.files.list().names
    assert [e.kind for e in session.files.list(".").entries if e.name == "data"] == ["directory"]

    r = session.run("import csv\nrows = list(csv.reader(open('data/sales.csv')))\nprint(rows)")
    assert r.stdout == "[['a', 'b'], ['1', '2']]\n"

    assert session.files.download("data/sales.csv") == b"a,b\n1,2\n"
    session.files.delete("data")
    with pytest.raises(FileNotFound):
        session.files.download("data/sales.csv")
    assert "data" not in session.files.list().names


def test_large_files_stream_both_ways(session: Session, tmp_path: Path) -> None:
    # 24 MiB of non-repeating bytes: uploaded from a path and from a file object, downloaded into a path
    # and into a file object, in chunks.
    size = 24 * 1024 * 1024
    source = tmp_path / "big.bin"
    with open(source, "wb") as f:
        for _ in range(size // (1024 * 1024)):
            f.write(os.urandom(1024 * 1024))
    assert session.files.upload("big.bin", source).size == size  # a pathlib.Path: a local file
    with open(source, "rb") as f:
        f.seek(1024)
        assert session.files.upload("tail.bin", f).size == size - 1024, "a file object is sent from where it stands"

    dest = tmp_path / "back.bin"
    assert session.files.download("big.bin", dest) == size
    assert dest.read_bytes() == source.read_bytes()

    buf = io.BytesIO()
    assert session.files.download("tail.bin", buf) == size - 1024
    assert buf.getvalue() == source.read_bytes()[1024:]
    r = session.run("import hashlib\nhashlib.sha256(open('big.bin','rb').read()).hexdigest()")
    import hashlib

    assert r.text == repr(hashlib.sha256(source.read_bytes()).hexdigest())


def test_an_upload_from_a_stream_that_cannot_seek(session: Session) -> None:
    class Pipe(io.RawIOBase):
        def __init__(self, chunks: Iterator[bytes]) -> None:
            self.chunks = chunks

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            return next(self.chunks, b"")

    pipe = Pipe(iter([b"one ", b"two ", b"three"]))
    assert session.files.upload("piped.txt", pipe).size == len(b"one two three")
    assert session.files.download("piped.txt") == b"one two three"


def test_paths_the_api_refuses(session: Session) -> None:
    with pytest.raises(InvalidPath) as e:
        session.files.upload("../escape.txt", b"x")
    assert e.value.status == 422
    # `..` alone would name the session itself once a URL is normalised: it must reach the files API.
    with pytest.raises(InvalidPath):
        session.files.delete("..")
    assert session.run("1").ok, "the session is still there"
    session.files.upload("dir/file.txt", b"x")
    with pytest.raises(WrongKind):
        session.files.list("dir/file.txt")
    with pytest.raises(FileNotFound):
        session.files.delete("missing.txt")
    with pytest.raises(ValueError):
        session.files.download("")
