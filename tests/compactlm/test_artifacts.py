"""Stage outputs on disk: keys, fingerprints, atomic publish, locks, and write failures named clearly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from compactlm.artifacts import MANIFEST, fingerprint, is_complete, publish_dir, read_manifest, stage_key
from tests.helpers import tmp_dirs


def test_publish_is_atomic_and_complete(tmp_path):
    final = tmp_path / "stage" / "k1"
    with pytest.raises(RuntimeError):
        with publish_dir(final, {"a": 1}) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert not final.exists() and list((tmp_path / "stage").iterdir()) == []
    with publish_dir(final, {"a": 1}) as tmp:
        (tmp / "weights.bin").write_bytes(b"full")
    assert is_complete(final) and read_manifest(final)["a"] == 1
    assert (final / "weights.bin").read_bytes() == b"full"


def test_stage_key_tracks_config_and_upstream(tmp_path):
    up = tmp_path / "up"
    with publish_dir(up, {"n": 1}):
        pass
    k = stage_key("prune", {"x": 1}, [up])
    assert k == stage_key("prune", {"x": 1}, [up])
    assert k != stage_key("prune", {"x": 2}, [up])
    assert k != stage_key("distill", {"x": 1}, [up])
    before = fingerprint(up)
    (up / "manifest.json").write_text('{"n": 2}')
    assert fingerprint(up) != before


def test_fingerprint_of_plain_dir_changes_with_content(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    a = fingerprint(d)
    (d / "model.safetensors").write_bytes(b"123")
    assert fingerprint(d) != a


def test_output_lock_serialises_same_output_only(tmp_path):
    import threading
    import time

    from compactlm.artifacts import output_lock

    events = []

    def worker(name, target, hold):
        with output_lock(tmp_path / target):
            events.append((name, "in", time.monotonic()))
            time.sleep(hold)
            events.append((name, "out", time.monotonic()))

    a = threading.Thread(target=worker, args=("a", "k1", 0.5))
    a.start()
    time.sleep(0.1)
    b = threading.Thread(target=worker, args=("b", "k1", 0))  # same output: waits for a
    c = threading.Thread(target=worker, args=("c", "k2", 0))  # other output: does not wait
    for th in (b, c):
        th.start()
    for th in (a, b, c):
        th.join()
    t = {(n, e): ts for n, e, ts in events}
    assert t[("b", "in")] >= t[("a", "out")]
    assert t[("c", "in")] < t[("a", "out")]


def test_write_errors_are_recognised_and_others_pass_through(tmp_path):
    """Unit: how each library reports a full disk, mapped to one WriteError naming the path."""
    import errno

    from compactlm.artifacts import WriteError, as_write_error, publish_dir

    cases = [OSError(errno.ENOSPC, "No space left on device"),
             RuntimeError("Error while serializing: I/O error: File too large (os error 27)"),
             RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")]
    for exc in cases:
        err = as_write_error(exc, tmp_path / "x")
        assert isinstance(err, WriteError) and f"could not write {tmp_path / 'x'}" in str(err), exc
    assert as_write_error(ValueError("bad config"), tmp_path / "x") is None
    assert as_write_error(OSError(errno.ENOENT, "missing"), tmp_path / "x") is None

    final = tmp_path / "out"
    with pytest.raises(WriteError, match="no space left on device") as info:
        with publish_dir(final, {}) as tmp:
            (tmp / "a").write_text("x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(info.value.__cause__, OSError)
    assert not final.exists() and tmp_dirs(final) == []
    with pytest.raises(KeyError):  # not a write failure: unchanged
        with publish_dir(final, {}):
            raise KeyError("x")


def test_stale_temp_dirs_of_dead_processes_are_removed(tmp_path):
    from compactlm.artifacts import publish_dir, remove_stale_tmp

    final = tmp_path / "out"
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{host}-{dead}-abcd1234"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-abcd1234"
    other_host = tmp_path / f".out.tmp-elsewhere-{dead}-abcd1234"
    old_style = tmp_path / ".out.tmp-abcd1234"
    other_output = tmp_path / f".out2.tmp-{host}-{dead}-abcd1234"
    for p in (stale, live, other_host, old_style, other_output):
        p.mkdir()
    assert remove_stale_tmp(final) == [stale]
    with publish_dir(final, {}) as tmp:
        (tmp / "f").write_text("x")
    assert is_complete(final) and (final / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", live.name, other_host.name, old_style.name, other_output.name])
