"""Files other processes read are written whole, in one step, with mode 0600."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

from jupyter_dist.private_file import write_atomically


def test_file_is_private_and_leaves_no_temporary_behind(tmp_path: Path) -> None:
    target = tmp_path / "conn.json"
    write_atomically(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["conn.json"]


def test_a_reader_sees_the_old_file_or_the_new_one_never_a_part(tmp_path: Path) -> None:
    target = tmp_path / "conn.json"
    texts = ["a" * 100_000, "b" * 100_000]
    write_atomically(target, texts[0])
    seen: set[str] = set()
    done = threading.Event()

    def read_while_written() -> None:
        while not done.is_set():
            seen.add(target.read_text())

    reader = threading.Thread(target=read_while_written)
    reader.start()
    try:
        for i in range(200):
            write_atomically(target, texts[i % 2])
    finally:
        done.set()
        reader.join(5)
    assert seen <= set(texts)


def test_an_open_reader_keeps_the_whole_old_content(tmp_path: Path) -> None:
    target = tmp_path / "conn.json"
    write_atomically(target, "old")
    with open(target) as old:
        write_atomically(target, "new")
        assert old.read() == "old"
    assert target.read_text() == "new"
