"""The on-disk contract: keyed, atomically published stage outputs."""

import pytest

from compactlm.artifacts import fingerprint, is_complete, publish_dir, read_manifest, stage_key


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
    b.start(); c.start(); a.join(); b.join(); c.join()
    t = {(n, e): ts for n, e, ts in events}
    assert t[("b", "in")] >= t[("a", "out")]
    assert t[("c", "in")] < t[("a", "out")]
