"""What the first cluster run would hit, where one process on the CPU can show it: Adam's moments resumed into
another memory layout, a finite loss with non-finite gradients, a checkpoint with non-finite weights, a loader
that fails (with and without a stop pending), the GradScaler's checkpoint state without a host sync, gloo's
network interface, launches that cannot restart, LOCAL_RANK beyond the visible GPUs, and DDP's buffer broadcast
with synchronised BatchNorm. Through torchrun itself: tests/test_torchrun.py."""

from __future__ import annotations

import copy
import json
import signal

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stenvan import distributed
from stenvan.checkpoint import CheckpointError, read_checkpoint
from stenvan.training.checkpoint_writer import CheckpointWriter
from stenvan.config import load_config
from tests.test_train import TINY, shards  # noqa: F401 - the module's shard fixture


# ----------------------------------------------------------------------------------------------------------
# A resume with channels_last changed (the optimizer state's layout)
# ----------------------------------------------------------------------------------------------------------

def adam_run(channels_last: bool, state=None, steps: int = 1):
    """A conv layer (the same initial values) trained with fused Adam for `steps` steps on fixed batches, from the
    optimizer `state` if given, in the given memory layout; (weights, optimizer state dict)."""
    from stenvan.training.optim import build_optimizer

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, bias=False)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(list(conv.parameters()), "adam", lr=1e-2, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if state is not None:
        from stenvan.training.resume_checks import restore_training_state

        conv.weight.data.copy_(state["weight"])
        restore_training_state({"optimizer": state["optimizer"], "scheduler": state["scheduler"], "scaler": {},
                                "precision": "fp32", "dataset": "x"}, {}, optimizer, scheduler,
                               torch.amp.GradScaler("cpu", enabled=False), load_config(None, [], data="x"), "fp32")
    gen = torch.Generator().manual_seed(len(optimizer.state))
    for _ in range(steps):
        x = torch.randn(2, 4, 6, 6, generator=gen)
        (conv(x) * torch.linspace(-1, 2, 8).view(1, 8, 1, 1)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return conv.weight.detach().clone(), {"weight": conv.weight.detach().clone(),
                                          "optimizer": copy.deepcopy(optimizer.state_dict()),
                                          "scheduler": scheduler.state_dict()}


@pytest.mark.parametrize("saved_channels_last", [True, False])
def test_adam_moments_resumed_into_another_memory_layout_follow_their_weights(saved_channels_last):
    _, saved = adam_run(saved_channels_last, steps=2)  # moments saved with the weights' layout then
    same, _ = adam_run(saved_channels_last, copy.deepcopy(saved))  # (a loaded state is stepped in place)
    toggled, _ = adam_run(not saved_channels_last, copy.deepcopy(saved))
    step = (same - saved["weight"]).norm()
    assert step > 1e-3  # the step moved the weights (not vacuous)
    # Unmatched strides made fused Adam pair each weight with another element's moments: about a step off.
    assert (toggled - same).norm() < 1e-5 * step, f"{float((toggled - same).norm() / step):.2e} of a step"


# ----------------------------------------------------------------------------------------------------------
# bf16: a finite loss with non-finite gradients; checkpoints with non-finite weights
# ----------------------------------------------------------------------------------------------------------

def run_with(shards, out, steps: int, *extra, loss=None, batches=None):  # noqa: F811
    """A tiny run of `steps` steps with a checkpoint after each, its loss (feats, loss) -> loss and its batches
    (step, batch) -> batch altered as given; returns the Trainer's error (None if it ended normally)."""
    from stenvan.training.trainer import Trainer

    cfg = load_config(None, TINY + ["--max_steps", str(steps), "--max_nonfinite", "3", "--ckpt_every", "1",
                                    "--keep_ckpts", "10", *extra], data=str(shards), out=str(out))
    trainer = Trainer(cfg)
    if loss is not None:
        real = trainer.criterion.forward
        trainer.criterion.forward = lambda feats, logits, labels: {
            **(r := real(feats, logits, labels)), "loss": loss(trainer.progress.global_step + 1, feats, r["loss"])}
    if batches is not None:
        real_epoch = trainer.loader.epoch
        trainer.loader.epoch = lambda e, start_step=0: (
            batches(e * trainer.steps_per_epoch + s + 1, b)
            for s, b in enumerate(real_epoch(e, start_step=start_step), start=start_step))
    try:
        trainer.fit()
        return None
    except Exception as e:  # noqa: BLE001 - the caller checks it
        return e
    finally:
        trainer.close()


def checkpoint_states(out, steps):
    return [read_checkpoint(out / f"step-{step:09d}.pt")["model"] for step in steps]


def test_a_finite_loss_with_nonfinite_gradients_skips_the_step_on_the_device(shards, tmp_path):  # noqa: F811
    # From step 2 on: loss + 0·sqrt(0), whose value is the loss's and whose gradient is NaN (what an overflow in a
    # bf16 backward gives). fp32 here: on this CPU, oneDNN's bf16 convolutions at these tiny sizes now and then
    # return non-finite values themselves (seen on main too), which would skip steps for another reason.
    from stenvan.training.trainer import TrainingStopped

    out = tmp_path / "run"
    error = run_with(shards, out, 8, loss=lambda step, feats, loss: loss + 0.0 * torch.sqrt(feats.sum() * 0.0)
                     if step >= 2 else loss)
    assert isinstance(error, TrainingStopped) and "3 steps in a row with non-finite losses or gradients by step 4" \
        in str(error), error
    after_first, *skipped = checkpoint_states(out, (1, 2, 3))
    for state in skipped:  # the weights, and the running statistics, as the skipped steps found them
        assert all(torch.equal(state[k], after_first[k]) for k in state if "num_batches" not in k)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("nonfinite_loss")] == [2, 3, 4] and "loss" in records[0]


def test_a_nonfinite_forward_leaves_no_trace_and_the_run_goes_on(shards, tmp_path):  # noqa: F811
    # A NaN in step 2's batch: its forward updates BatchNorm's running statistics with NaN, which every later
    # update would keep (and every checkpoint carry). The step is skipped and they are put back.
    out = tmp_path / "run"
    nan_at_2 = lambda step, batch: {**batch, "clips": batch["clips"] * float("nan")} if step == 2 else batch  # noqa
    assert run_with(shards, out, 3, "--optimizer", "sgd", batches=nan_at_2) is None  # SGD: smaller checkpoints
    first, second, third = checkpoint_states(out, (1, 2, 3))
    assert all(torch.equal(second[k], first[k]) for k in first if "num_batches" not in k)  # nothing moved
    running = [k for k in first if "running_" in k]
    assert any(not torch.equal(third[k], second[k]) for k in running)  # the run went on training
    assert all(torch.isfinite(third[k]).all() for k in third if third[k].is_floating_point())


def test_a_checkpoint_with_nonfinite_weights_is_not_written_and_says_so(tmp_path):
    writer = CheckpointWriter(tmp_path, keep=5, log=lambda _: None)
    good = {"model": {"w": torch.ones(10)}, "optimizer": {"state": {0: {"exp_avg": torch.zeros(10)}}},
            "progress": {"global_step": 1}}
    writer.save(good, step=1)
    writer.wait()
    bad = copy.deepcopy(good)
    bad["progress"]["global_step"] = 2
    bad["optimizer"]["state"][0]["exp_avg"][3] = float("nan")
    writer.save(bad, step=2)
    with pytest.raises(CheckpointError, match=r"step 2 not written: optimizer/state/0/exp_avg holds NaN or "
                                              r"infinite values .*the newest checkpoint with finite weights is "
                                              r".*step-000000001"):
        writer.wait()
    assert not (tmp_path / "step-000000002.pt").exists()
    assert read_checkpoint(tmp_path / "last.pt")["progress"]["global_step"] == 1


# ----------------------------------------------------------------------------------------------------------
# A loader that fails, with and without a stop signal pending
# ----------------------------------------------------------------------------------------------------------

def failing_loader(trainer, at_step: int, stop_signal: int = 0):
    """Make the trainer's loader fail as DALI does when its workers died (`pipe.run()` raises this), when batch
    `at_step` is asked for; with `stop_signal`, as if that signal had arrived during the step before."""
    real_epoch = trainer.loader.epoch

    def epoch(e, start_step=0):
        for step, batch in enumerate(real_epoch(e, start_step=start_step), start=start_step):
            if e == 0 and step == at_step:
                trainer.stop_signal = stop_signal
                raise RuntimeError("Worker data receiving interrupted")
            yield batch

    trainer.loader.epoch = epoch


def test_a_loader_failure_while_a_stop_is_pending_still_saves_and_stops_cleanly(shards, tmp_path, capsys):  # noqa: F811
    # What torchrun's SIGTERM did before DALI's workers ignored it: they died with the signal, and the rank's next
    # batch failed before the stop was acted on.
    from stenvan.training.trainer import Trainer

    out = tmp_path / "run"
    trainer = Trainer(load_config(None, TINY, data=str(shards), out=str(out)))
    failing_loader(trainer, at_step=3, stop_signal=signal.SIGTERM)
    try:
        progress = trainer.fit()  # returns: a clean stop, not an error
    finally:
        trainer.close()
    assert progress.global_step == 3
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 3
    printed = capsys.readouterr().out
    assert "stopping: a loader failed meanwhile: the loader failed: RuntimeError: Worker data receiving interrupted" \
        in printed and "stopped cleanly by signal 15 at step 3" in printed


def test_a_loader_failure_stops_every_rank_with_the_checkpoint_of_its_step(shards, tmp_path, capsys):  # noqa: F811
    from stenvan.training.failures import LoaderFailed
    from stenvan.training.trainer import Trainer

    out = tmp_path / "run"
    trainer = Trainer(load_config(None, TINY, data=str(shards), out=str(out)))
    failing_loader(trainer, at_step=2)
    try:
        with pytest.raises(LoaderFailed) as failed:
            trainer.fit()
    finally:
        trainer.close()
    assert str(failed.value) == (f"the loader failed: RuntimeError: Worker data receiving interrupted; stopped at step "
                                 f"2, saved as {out / 'step-000000002.pt'}: continue with --resume auto")
    assert read_checkpoint(out / "last.pt")["progress"]["global_step"] == 2


# ----------------------------------------------------------------------------------------------------------
# fp16 checkpoints: the GradScaler's state without waiting for the device
# ----------------------------------------------------------------------------------------------------------

class ScalarReads(TorchDispatchMode):
    """Counts `.item()`-style reads (`aten._local_scalar_dense`): on a GPU each one waits for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_grad_scaler_state_is_taken_without_reading_the_device_and_loads_back(tmp_path):
    from stenvan.amp import load_scaler_state, scaler_state

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for _ in range(2):  # two good steps: the scale doubles twice
        scaler.scale(weight.sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    with ScalarReads() as reads:
        state = scaler_state(scaler)
    assert reads.count == 0  # GradScaler.state_dict() reads the scale and the growth tracker with .item()
    torch.save(state, tmp_path / "scaler.pt")
    fresh = torch.amp.GradScaler("cpu")
    load_scaler_state(fresh, torch.load(tmp_path / "scaler.pt", weights_only=True))
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 2.0 ** 12
    load_scaler_state(fresh, {**scaler.state_dict(), "scale": 8.0})  # the plain form (older checkpoints)
    assert fresh.get_scale() == 8.0


# ----------------------------------------------------------------------------------------------------------
# Launch: gloo's interface, restarts, LOCAL_RANK
# ----------------------------------------------------------------------------------------------------------

def test_gloo_takes_nccls_interface_when_it_has_none():
    interfaces = ["lo", "docker0", "eth0", "eth1", "ib0"]
    assert distributed.gloo_interface("eth", interfaces) == "eth0"  # NCCL: a prefix
    assert distributed.gloo_interface("=eth1", interfaces) == "eth1"  # NCCL: exactly
    assert distributed.gloo_interface("ib,eth", interfaces) == "ib0"  # the first listed that matches
    assert distributed.gloo_interface("^docker,lo", interfaces) is None  # exclusions: gloo has no such form
    assert distributed.gloo_interface("=eth", interfaces) is None and distributed.gloo_interface("", interfaces) is None
    env = {"NCCL_SOCKET_IFNAME": "lo"}
    assert distributed.set_gloo_interface(env) == "lo" and env["GLOO_SOCKET_IFNAME"] == "lo"
    env = {"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "eth7"}
    assert distributed.set_gloo_interface(env) is None and env["GLOO_SOCKET_IFNAME"] == "eth7"  # the user's wins


def test_launches_that_cannot_restart_are_refused_and_attempts_keep_their_keys_apart():
    shared = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}
    with pytest.raises(distributed.LaunchError, match="--max-restarts=3 with 2 nodes shares one store"):
        distributed.check_restartable({**shared, "GROUP_WORLD_SIZE": "2"})
    distributed.check_restartable({**shared, "GROUP_WORLD_SIZE": "1"})  # one node: one agent counts the attempts
    distributed.check_restartable({**shared, "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "0"})
    distributed.check_restartable({**shared, "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "False"})
    assert distributed.attempt_prefix({**shared, "TORCHELASTIC_RESTART_COUNT": "2"}) == "stenvan/attempt2"
    assert distributed.attempt_prefix({"TORCHELASTIC_USE_AGENT_STORE": "False"}) is None  # a fresh store each time
    # A person split's keys (`train.py --split all`) go under the attempt's: a restart's splits start afresh too.
    attempt1 = {**shared, "TORCHELASTIC_RESTART_COUNT": "1"}
    assert distributed.store_prefix(attempt1, "split3") == "stenvan/attempt1/split3"
    assert distributed.store_prefix({}, "split3") == "split3" and distributed.store_prefix({}) == ""


def test_local_rank_beyond_the_visible_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(distributed.DeviceError, match=r"LOCAL_RANK=2 but 2 GPU\(s\) are visible here: start at most "
                                                      r"2 process\(es\) per node \(torchrun --nproc_per_node=2\)"):
        distributed.describe("cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.describe("cuda").device == torch.device("cuda", 1)
