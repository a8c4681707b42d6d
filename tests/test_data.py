import gzip
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest

from qkv import data
from qkv.data import (
    DataError,
    Example,
    clean_pairs,
    multi30k_file,
    read_lines,
    read_parallel,
    read_tsv,
    token_batches,
)
from qkv.tokenizer import Subwords


def test_read_plain_gz_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("eins\nzwei\n", encoding="utf-8")
    (tmp_path / "b.gz").write_bytes(gzip.compress(b"one\r\ntwo"))
    assert read_parallel(tmp_path / "a.txt", tmp_path / "b.gz") == [
        ("eins", "one"),
        ("zwei", "two"),
    ]
    (tmp_path / "c.txt").write_text("x\ny\nz\n")
    with pytest.raises(DataError, match="a.txt has 2 lines but .*c.txt has 3"):
        read_parallel(tmp_path / "a.txt", tmp_path / "c.txt")
    (tmp_path / "bad.txt").write_bytes(b"ok\nfine\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad.txt:3: invalid UTF-8"):
        read_lines(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: empty file"):
        read_lines(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="missing.txt: no such file"):
        read_lines(tmp_path / "missing.txt")
    (tmp_path / "notgz.gz").write_text("plain")
    with pytest.raises(DataError, match="notgz.gz: cannot read"):
        read_lines(tmp_path / "notgz.gz")


def test_binary_files_directories_and_unreadable_files_are_refused(tmp_path, monkeypatch):
    (tmp_path / "nul.txt").write_bytes(b"eins\nzw\0ei\n")
    with pytest.raises(DataError, match="nul.txt:2: a NUL byte"):
        read_lines(tmp_path / "nul.txt")
    with pytest.raises(DataError, match="nul.txt:2: a NUL byte"):
        data.read_text(tmp_path / "nul.txt")
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(DataError, match="dir.txt: a directory, not a file"):
        read_lines(tmp_path / "dir.txt")
    # a byte order mark and CRLF line ends are read as ordinary text
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfeins\r\nzwei\r\n")
    assert read_lines(tmp_path / "bom.txt") == ["eins", "zwei"]
    locked = tmp_path / "locked.txt"
    locked.write_text("secret\n")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root reads anything: make the read fail as it would
            real = Path.read_bytes

            def denied(self):
                if self == locked:
                    raise PermissionError(13, "Permission denied", str(self))
                return real(self)

            monkeypatch.setattr(Path, "read_bytes", denied)
        with pytest.raises(DataError, match="locked.txt: cannot read \\(Permission denied\\)"):
            read_lines(locked)
    finally:
        locked.chmod(0o644)


def test_tsv_and_cleaning(tmp_path):
    (tmp_path / "p.tsv").write_text("\ufeffHallo\tHello\tCC-BY\n \tx\nlang\t" + "y" * 50 + "\n")
    pairs = read_tsv(tmp_path / "p.tsv")
    assert pairs[0] == ("Hallo", "Hello")  # BOM dropped, attribution column ignored
    kept = clean_pairs(pairs, max_chars=20)
    assert kept.pairs == [("Hallo", "Hello")] and kept.blank == 1 and kept.too_long == 1
    (tmp_path / "q.tsv").write_text("no tab here\n")
    with pytest.raises(DataError, match="q.tsv:1: expected source<TAB>target"):
        read_tsv(tmp_path / "q.tsv")


def test_multi30k_found_via_env(tmp_path, monkeypatch):
    (tmp_path / "multi30k").mkdir()
    (tmp_path / "multi30k" / "val.de.gz").write_bytes(gzip.compress(b"Hallo\n"))
    monkeypatch.setenv("QKV_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # so ../shared/data is not found first
    monkeypatch.setattr(data, "data_dirs", lambda d=None: [tmp_path])
    assert multi30k_file("val", "de") == tmp_path / "multi30k" / "val.de.gz"
    with pytest.raises(DataError, match="no split"):
        multi30k_file("dev", "de")
    with pytest.raises(DataError, match="no language"):
        multi30k_file("val", "xx")


@pytest.fixture
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_checks_the_checksum(tmp_path, monkeypatch, http_dir):
    root, url = http_dir
    body = gzip.compress(b"A man.\n")
    (root / "val.en.gz").write_bytes(body)
    monkeypatch.setattr(data, "data_dirs", lambda d=None: [tmp_path / "nowhere"])
    monkeypatch.setenv("QKV_CACHE", str(tmp_path / "cache"))
    good = dict(data.MULTI30K_SHA256, **{"val.en.gz": hashlib.sha256(body).hexdigest()})
    monkeypatch.setattr(data, "MULTI30K_SHA256", good)
    path = multi30k_file("val", "en", base_url=url)
    assert path == tmp_path / "cache" / "multi30k" / "val.en.gz"
    assert read_lines(path) == ["A man."]
    # a corrupted download is refused and leaves nothing behind
    (root / "val.de.gz").write_bytes(b"tampered")
    with pytest.raises(DataError, match="checksum mismatch"):
        multi30k_file("val", "de", base_url=url)
    assert sorted(p.name for p in (tmp_path / "cache" / "multi30k").iterdir()) == ["val.en.gz"]
    with pytest.raises(DataError, match="download failed"):
        multi30k_file("val", "fr", base_url=url)  # 404


def test_token_batches_cover_everything_within_budget():
    examples = [Example([5] * (i % 17 + 1), [6] * (i % 13 + 1)) for i in range(500)]
    batches = token_batches(examples, max_tokens=200, seed=1, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(500))
    for b in batches:
        longest = max(max(len(examples[i].src), len(examples[i].tgt)) + 2 for i in b)
        assert longest * len(b) <= 200
    assert batches == token_batches(examples, 200, seed=1, epoch=0)  # reproducible
    assert batches != token_batches(examples, 200, seed=1, epoch=1)  # reshuffled per epoch


def test_subwords_round_trip():
    texts = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee!", "A man rides a bike."] * 20
    tok = Subwords.train(texts, vocab_size=500, min_frequency=1)
    for t in texts[:3] + ["Unbekannte Wörter: Straßenbahn, 42 % (ok)? „Ça va“ – příliš žluťoučký"]:
        ids = tok.encode(t)
        assert all(i >= 3 for i in ids)
        assert tok.decode([1] + ids + [2, 0]) == t
    assert tok.decode(tok.encode("日本")) == "<unk><unk>"  # outside the alphabet: unknown
    assert tok.tok.token_to_id("<pad>") == 0 and tok.tok.token_to_id("</s>") == 2
