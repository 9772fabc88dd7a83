"""A stage's output goes to its log file at the file-descriptor level: Python prints, raw fd writes, child
processes; captures nest, may end out of order across threads, and survive a child that outlives them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from tasks.capture import capture_output, terminal


@pytest.fixture(autouse=True)
def real_std_streams(capfd, monkeypatch):
    """sys.stdout / sys.stderr on fds 1 and 2 during the test, as in a real process (pytest's own write to its
    capture files directly, and pytest re-installs them when the test's call phase starts: patch from there)."""
    def patch() -> None:
        monkeypatch.setattr(sys, "stdout", open(1, "w", buffering=1, closefd=False))  # noqa: SIM115
        monkeypatch.setattr(sys, "stderr", open(2, "w", buffering=1, closefd=False))  # noqa: SIM115

    return patch


def _everything(tag: str) -> None:
    print(f"{tag}-print", flush=True)
    sys.stderr.write(f"{tag}-stderr\n")
    sys.stderr.flush()
    os.write(1, f"{tag}-fd1\n".encode())
    os.write(2, f"{tag}-fd2\n".encode())
    subprocess.run(["sh", "-c", f"echo {tag}-child; echo {tag}-childerr >&2"], check=True)


def test_everything_written_during_a_capture_lands_in_its_file_and_nowhere_else(tmp_path, capfd, real_std_streams):
    real_std_streams()
    with capture_output(tmp_path / "stage.log", tee=False) as path:
        _everything("x")
    print("after", flush=True)
    out, err = capfd.readouterr()
    text = path.read_text()
    for piece in ("x-print", "x-stderr", "x-fd1", "x-fd2", "x-child", "x-childerr"):
        assert piece in text and piece not in out + err, piece
    assert out == "after\n" and "after" not in text


def test_tee_shows_it_too_and_nested_captures_route_to_the_innermost(tmp_path, capfd, real_std_streams):
    real_std_streams()
    with capture_output(tmp_path / "run.log", tee=False) as run_log:
        print("outer-before", flush=True)
        with capture_output(tmp_path / "stage.log", tee=False) as stage_log:
            _everything("inner")
            terminal().write("console line\n")
        print("outer-after", flush=True)
    with capture_output(tmp_path / "teed.log", tee=True) as teed:
        _everything("t")
    out, err = capfd.readouterr()
    assert "inner-fd1" in stage_log.read_text() and "inner-fd1" not in run_log.read_text() + out + err
    assert "outer-before" in run_log.read_text() and "outer-after" in run_log.read_text()
    assert "console line" in out and "outer-" not in out
    assert "t-child" in teed.read_text() and "t-childerr" in out  # one pipe: a tee shows both on stdout


def test_captures_ended_out_of_order_from_threads_leave_the_fds_whole(tmp_path, capfd, real_std_streams):
    real_std_streams()
    a_open, b_open, a_closed = threading.Event(), threading.Event(), threading.Event()

    def a() -> None:
        with capture_output(tmp_path / "a.log", tee=False):
            a_open.set()
            b_open.wait(5)
        a_closed.set()

    def b() -> None:
        a_open.wait(5)
        with capture_output(tmp_path / "b.log", tee=False):
            b_open.set()
            a_closed.wait(5)
            os.write(1, b"b-after-a\n")

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    os.write(1, b"restored\n")
    out, _ = capfd.readouterr()
    assert "b-after-a" in (tmp_path / "b.log").read_text() and out == "restored\n"


def test_a_child_that_outlives_the_capture_does_not_hold_it_up(tmp_path, capfd, real_std_streams):
    real_std_streams()
    t0 = time.perf_counter()
    with capture_output(tmp_path / "stage.log", tee=False) as path:
        child = subprocess.Popen(["sh", "-c", "sleep 3; echo late"])
    assert time.perf_counter() - t0 < 2.9  # the pump waited at most 2 s
    child.wait(10)
    deadline = time.time() + 5
    while "late" not in path.read_text() and time.time() < deadline:
        time.sleep(0.1)
    assert "late" in path.read_text()
    os.write(1, b"ok\n")
    assert capfd.readouterr().out == "ok\n"
