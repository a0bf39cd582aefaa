"""Checkpoints: round trip, rotation (last.pt / prev.pt), atomic writes, refusing damaged or unsafe files, RNG states."""

import hashlib
import io
import random

import numpy as np
import pytest
import torch

from odeflux.mnist.checkpoint import (
    CHECKPOINT_NAME,
    PREVIOUS_NAME,
    CheckpointError,
    atomic_write_bytes,
    is_intact,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _payload(epoch: int, value: float = 0.0) -> dict:
    gen = torch.Generator().manual_seed(epoch)
    return {
        "epoch": epoch,
        "config": {"seed": 3, "n_samples": "all", "data_dir": None, "lr": 1e-3},
        "model": {"w": torch.randn(5, 4, generator=gen) + value, "b": torch.arange(4, dtype=torch.float64)},
        "optimizer": {"state": {0: {"step": torch.tensor(float(epoch)), "exp_avg": torch.ones(3)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]},
        "rng": {"ranks": [rng_state()]},
        "loader": {"seed": 3, "next_epoch": epoch},
        "history": [{"epoch": e, "mean_loss": 1.0 / e} for e in range(1, epoch + 1)],
        "world_size": 1,
    }  # fmt: skip


def test_round_trip_keeps_every_field(tmp_path):
    payload = _payload(2)
    path = save_checkpoint(tmp_path, payload)
    assert path == tmp_path / CHECKPOINT_NAME and is_intact(path)
    ck = load_checkpoint(tmp_path)  # a run directory means its last.pt
    assert ck.path == path and ck.run_dir == tmp_path and ck.epoch == 2
    assert ck.config == payload["config"] and ck.history == payload["history"] and ck.loader == payload["loader"]
    for k, v in payload["model"].items():
        assert torch.equal(ck.model[k], v) and ck.model[k].dtype == v.dtype
    assert ck.optimizer["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(ck.optimizer["state"][0]["exp_avg"], torch.ones(3))
    assert torch.equal(ck.rng["ranks"][0]["torch"], payload["rng"]["ranks"][0]["torch"])
    assert load_checkpoint(path).epoch == 2  # the file itself works too


def test_each_save_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, _payload(1))
    assert not (tmp_path / PREVIOUS_NAME).exists()
    save_checkpoint(tmp_path, _payload(2))
    save_checkpoint(tmp_path, _payload(3))
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME).epoch == 3
    assert load_checkpoint(tmp_path / PREVIOUS_NAME).epoch == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME, PREVIOUS_NAME]  # no temporary files left


def test_an_interrupted_save_leaves_both_checkpoints_intact(tmp_path):
    save_checkpoint(tmp_path, _payload(1))
    save_checkpoint(tmp_path, _payload(2))
    before = {n: (tmp_path / n).read_bytes() for n in (CHECKPOINT_NAME, PREVIOUS_NAME)}

    def crash():
        raise KeyboardInterrupt  # stands in for a kill halfway through the write

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, _payload(3), _midway=crash)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME, PREVIOUS_NAME]


@pytest.mark.parametrize("damage", ["flip", "truncate", "truncate-header", "empty"])
def test_a_damaged_checkpoint_is_a_clear_error_and_prev_is_intact(tmp_path, damage):
    save_checkpoint(tmp_path, _payload(1))
    save_checkpoint(tmp_path, _payload(2))
    last = tmp_path / CHECKPOINT_NAME
    data = bytearray(last.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit inside the tensor data: torch.load alone reads this silently
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "truncate-header":
        data = data[:30]
    else:
        data = bytearray()
    last.write_bytes(bytes(data))
    assert not is_intact(last)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(last) in msg
    assert any(w in msg for w in ("corrupt", "truncated", "empty"))
    assert str(tmp_path / PREVIOUS_NAME) in msg  # the fix: the previous checkpoint
    assert load_checkpoint(tmp_path / PREVIOUS_NAME).epoch == 1


def test_other_files_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not an odeflux checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)  # a torch file, but not ours
    with pytest.raises(CheckpointError, match="not an odeflux checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(tmp_path)


class _Payload:
    """Unpickling this would run code (creates a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_arbitrary_objects_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"format": "odeflux-checkpoint", "version": 1, "epoch": 1, "evil": _Payload(str(marker))}, buf)
    body = buf.getvalue()
    path = tmp_path / "evil.pt"
    path.write_bytes(b"ODEFLUX-CHECKPOINT v1 " + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    assert is_intact(path)  # the checksum is right: only the safe loader stands in the way
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)
    assert not marker.exists()


def test_saving_refuses_what_could_not_be_loaded(tmp_path):
    bad = _payload(1)
    bad["config"] = {"when": object()}
    with pytest.raises(TypeError, match="plain containers"):
        save_checkpoint(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_rng_state_round_trip():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = rng_state()
    first = (torch.rand(3), random.random(), np.random.rand(2))
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and np.array_equal(first[2], again[2])
    # and the state survives a checkpoint file
    set_rng_state(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    assert torch.equal(torch.rand(3), first[0])
