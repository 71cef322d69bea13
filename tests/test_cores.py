"""The core registry (bench.runtime.cores): every live registered process is counted, dead ones' entries are removed."""

from __future__ import annotations

import fcntl
import os
import time

from bench.runtime import cores


def test_an_entry_is_locked_before_another_process_can_see_it(tmp_path, monkeypatch):
    """Another process scans the registry at the worst moment, after this one created its entry and before it
    locked it: an entry visible then looks abandoned (its lock is free) and is unlinked, and this process would
    hold the lock of a file no one sees (counted by no one). The entry appears only once it is locked."""
    scanner = cores.CoreShare(tmp_path)  # another process looking (registered or not, it counts the same)
    flock, scanned = fcntl.flock, []

    def flock_after_a_scan(fd, how):
        if not scanned and not how & fcntl.LOCK_NB:  # the registering process's own (blocking) lock
            scanned.append(scanner.live())
        return flock(fd, how)

    monkeypatch.setattr(cores.fcntl, "flock", flock_after_a_scan)
    with cores.CoreShare(tmp_path) as share:
        assert scanned == [1]  # the scan ran in between (it counts at least one)
        assert share.path.exists()
        assert list(tmp_path.iterdir()) == [share.path]
        other = cores.CoreShare(tmp_path)
        with other:
            assert other.live() == 2 and share.live() == 2  # both registered, both counted
    assert list(tmp_path.iterdir()) == []


def test_entries_of_dead_processes_are_removed(tmp_path, monkeypatch):
    dead = tmp_path / "12345-deadbeef.lock"  # a killed process's entry: its lock died with it
    dead.write_text("")
    pending = tmp_path / f".12345-feedface{cores.PENDING}"  # one killed while registering, long ago
    pending.write_text("")
    old = time.time() - cores.ABANDONED_AFTER - 1
    os.utime(pending, (old, old))
    fresh = tmp_path / f".23456-cafecafe{cores.PENDING}"  # one registering right now: left alone
    fresh.write_text("")
    with cores.CoreShare(tmp_path) as share:
        assert share.live() == 1
        assert sorted(tmp_path.iterdir()) == sorted([share.path, fresh])
