"""GPU slots: each claim holds a device of its own until it is released (or its process ends)."""

import threading
import time

from normrnn.pipeline import gpu_slots


def test_claims_take_free_slots_and_wait_while_all_are_held(tmp_path):
    a, b = gpu_slots.claim(2, tmp_path), gpu_slots.claim(2, tmp_path)
    assert {a.index, b.index} == {0, 1}
    got, said = [], []
    waiter = threading.Thread(
        target=lambda: got.append(gpu_slots.claim(2, tmp_path, 0.05, said.append))
    )
    waiter.start()
    time.sleep(0.3)
    assert not got and said == ["all 2 GPU slots are in use; waiting for one"]
    b.release()
    waiter.join(5)
    assert got and got[0].index == b.index  # the freed one
    a.release()
    got[0].release()


def test_the_device_of_a_slot(monkeypatch):
    slot = gpu_slots.Slot(index=3, fd=-1, claimed_at=0.0)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert gpu_slots.device_for("auto", slot) == "cuda:3" == gpu_slots.device_for("cuda", slot)
    assert gpu_slots.device_for("cuda:1", slot) == "cuda:1"  # a device the user pinned
    assert gpu_slots.device_for("auto", None) == "auto"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_slots.device_for("auto", slot) == "auto"  # a stand-in slot: the CPU
    monkeypatch.setenv(gpu_slots.STAND_IN, "4")
    assert gpu_slots.visible_gpus() == 4


def test_only_jobs_on_this_machine_share_its_gpus_and_no_locks_means_no_slot(tmp_path, monkeypatch):
    import errno

    monkeypatch.delenv(gpu_slots.LOCAL, raising=False)
    assert gpu_slots.local_gpus() == 0  # a cluster job: its scheduler gave it its GPUs
    monkeypatch.setenv(gpu_slots.LOCAL, "2")
    assert gpu_slots.local_gpus() == 2

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(gpu_slots.fcntl, "flock", no_locks)
    said = []
    assert gpu_slots.claim(2, tmp_path, log=said.append) is None
    assert "no file locks" in said[0]
