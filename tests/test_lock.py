"""stenvan.lock: one holder per folder; a dead holder's lock is taken over with a line, another host's is refused."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys

import pytest

from stenvan.lock import LOCK_NAME, FolderLock, LockError

HOLD = "import sys; from stenvan.lock import FolderLock; FolderLock(sys.argv[1], 'holder').acquire(); " \
       "print('held', flush=True); sys.stdin.read()"


def holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def record(folder) -> dict:
    return json.loads((folder / LOCK_NAME).read_text())


def test_a_running_holder_excludes_others_until_it_releases(tmp_path):
    proc = holder(tmp_path)
    assert record(tmp_path)["pid"] == proc.pid and record(tmp_path)["host"] == socket.gethostname()
    with pytest.raises(LockError, match=rf"{tmp_path}: in use by holder \(pid {proc.pid} on "):
        FolderLock(tmp_path, "second").acquire()
    proc.stdin.close()  # the holder exits normally: no release call, so its lock stays, stale
    proc.wait()
    lines = []
    with FolderLock(tmp_path, "second", log=lines.append) as lock:
        assert lock.held and record(tmp_path)["what"] == "second"
    assert len(lines) == 1 and f"took over the stale lock of holder (pid {proc.pid}" in lines[0]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_sigkilled_holder_is_taken_over_with_a_line(tmp_path):
    proc = holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = []
    lock = FolderLock(tmp_path, "next", log=lines.append).acquire()
    assert lines == [f"{tmp_path / LOCK_NAME}: took over the stale lock of holder (pid {proc.pid} on "
                     f"{socket.gethostname()}, since {lines[0].split('since ')[1].split(')')[0]}): that process is no "
                     "longer running"]
    lock.release()


@pytest.mark.parametrize("change", ["start time", "boot id"])
def test_a_reused_pid_or_a_reboot_makes_a_lock_stale(tmp_path, change):
    FolderLock(tmp_path, "old").acquire()  # written by this (live) process...
    held = record(tmp_path)
    held["pid"] = os.getppid()  # ...then claimed for a live pid whose process started at another time
    if change == "start time":
        held["start_ticks"] = (held["start_ticks"] or 0) + 12345
    else:
        held["boot_id"] = "another-boot"
    (tmp_path / LOCK_NAME).write_text(json.dumps(held))
    lines = []
    FolderLock(tmp_path, "new", log=lines.append).acquire().release()
    assert len(lines) == 1 and "took over the stale lock of old" in lines[0]


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "gpu-node-7", "pid": 4242, "what": "train.py",
                                                  "since": "2026-01-01 00:00:00 +0000"}))
    with pytest.raises(LockError) as e:
        FolderLock(tmp_path, "prepare").acquire()
    assert "train.py (pid 4242 on gpu-node-7" in str(e.value) and f"delete {tmp_path / LOCK_NAME}" in str(e.value)
    (tmp_path / LOCK_NAME).write_text("not json")
    with pytest.raises(LockError, match="not a lock record"):
        FolderLock(tmp_path, "prepare").acquire()


def test_the_same_process_cannot_take_it_twice_and_forked_children_never_release(tmp_path):
    lock = FolderLock(tmp_path / "new" / "folder", "first").acquire()  # creates the folder
    with pytest.raises(LockError, match="already locked by this process"):
        FolderLock(tmp_path / "new" / "folder", "again").acquire()
    child = mp.get_context("fork").Process(target=lock.release)
    child.start()
    child.join()
    assert (tmp_path / "new" / "folder" / LOCK_NAME).exists()
    lock.release()
    assert not (tmp_path / "new" / "folder" / LOCK_NAME).exists()


def test_a_takeover_never_removes_a_lock_another_process_took_meanwhile(tmp_path, monkeypatch):
    """Between reading a stale record and removing it, another process may take the lock over: the re-check
    under the takeover guard must see that and leave the new holder's lock alone."""
    dead = holder(tmp_path)
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    stale = (tmp_path / LOCK_NAME).read_bytes()
    real_read, state = FolderLock._read, {}

    def read_then_lose_the_race(self):
        if "winner" not in state:  # our first look sees the stale record; then someone else takes over
            (tmp_path / LOCK_NAME).unlink()
            state["winner"] = holder(tmp_path)
            return stale
        return real_read(self)
    monkeypatch.setattr(FolderLock, "_read", read_then_lose_the_race)
    with pytest.raises(LockError, match=r"in use by holder \(pid \d+") as e:
        FolderLock(tmp_path, "late taker", log=lambda line: None).acquire()
    winner = state["winner"]
    assert f"pid {winner.pid} " in str(e.value) and record(tmp_path)["pid"] == winner.pid
    winner.kill()
    winner.wait()


def test_an_empty_lock_file_says_what_to_do_not_rerun(tmp_path):
    """An empty .lock (a writer killed between creating it and writing its record, or a `touch`): the old code
    said "rerun", and every rerun failed the same way."""
    (tmp_path / LOCK_NAME).write_bytes(b"")
    os.utime(tmp_path / LOCK_NAME, (1, 1))  # empty for long: no record is on its way
    with pytest.raises(LockError) as e:
        FolderLock(tmp_path, "second").acquire()
    assert str(e.value).startswith(f"{tmp_path / LOCK_NAME}: exists but is empty, not a lock record")
    assert f"delete {tmp_path / LOCK_NAME}" in str(e.value) and "rerunning alone will not help" in str(e.value)
