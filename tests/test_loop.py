"""The one training loop's pieces that need no cache: the schedule and the out-of-memory error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import TrainError
from pipeline.train.config import TrainConfig
from pipeline.train.loop import Variant, VariantRunner, lr_lambda
from pipeline.train.reader import Batch
from pipeline.train.rundir import RunDir


class _Failing(torch.nn.Module):
    def __init__(self, error: BaseException):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.error = error

    def required_taps(self):
        return [0]

    def required_decoder_taps(self):
        return []

    def training_loss(self, labels, taps, attention_mask):
        raise self.error


class _Linear(_Failing):
    """A real one-weight model: its step computes, backpropagates and updates."""

    def training_loss(self, labels, taps, attention_mask):
        return (taps[0].sum(-1).mean(-1) * self.w.sum() - labels.float()).pow(2).mean()


def _batch() -> Batch:
    return Batch(index=np.arange(3), input_ids=torch.zeros(3, 4, dtype=torch.long),
                 attention_mask=torch.ones(3, 4, dtype=torch.long), labels=torch.zeros(3, dtype=torch.long),
                 taps=[torch.zeros(3, 4, 8)])


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"),
                                   torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")])
def test_out_of_memory_in_a_step_is_a_clear_error(tmp_path, error):
    v = Variant(0, TrainConfig(out=str(tmp_path)), _Failing(error), RunDir(tmp_path), {}, torch.get_rng_state())
    b = _batch()
    with pytest.raises(TrainError, match="lower --batch-size or --batch-tokens"):
        VariantRunner(v, 10).train_step({0: b.taps[0]}, b)


def test_other_runtime_errors_are_not_hidden(tmp_path):
    v = Variant(0, TrainConfig(out=str(tmp_path)), _Failing(RuntimeError("shape mismatch")), RunDir(tmp_path), {},
                torch.get_rng_state())
    b = _batch()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        VariantRunner(v, 10).train_step({0: b.taps[0]}, b)


def test_a_step_updates_the_weights_and_frees_its_gradients(tmp_path):
    """Gradients held until the next step's zero_grad would sit beside that step's forward: a whole
    parameter-sized copy on top of the peak (on a 7B-shaped cache, 177 MB of 1.3 GB)."""
    model = _Linear(RuntimeError())
    v = Variant(0, TrainConfig(out=str(tmp_path)), model, RunDir(tmp_path), {}, torch.get_rng_state())
    b = _batch()
    b.taps[0].fill_(1.0)
    b.labels.fill_(1)
    runner = VariantRunner(v, 10)
    before = model.w.detach().clone()
    runner.train_step({0: b.taps[0]}, b)
    assert not torch.equal(model.w.detach(), before)
    assert model.w.grad is None


def test_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(10, 2)
    assert [f(s) for s in range(3)] == [0.5, 1.0, 1.0] and f(9) == pytest.approx(0.125) and f(10) == 0.0


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch_size": 0}, {"lr": -0.1}, {"epochs": "three"},
                                 {"warmup_ratio": 1.5}, {"method": "sgd"}])
def test_impossible_training_values_are_refused(bad):
    with pytest.raises(TrainError):
        TrainConfig(**bad)


def test_yaml_string_numbers_are_read_as_numbers():
    assert TrainConfig(lr="3e-3").lr == 0.003


def test_a_run_resumes_across_a_new_side_key_at_its_default(tmp_path):
    """A run started before a side option existed (its config.yaml lacks the key) resumes when the
    option is given at its default, and is refused when it is given another value."""
    run = RunDir(tmp_path / "run")
    fp = {"backbone": "b", "dataset": "d"}
    old = TrainConfig(cache="c", out=str(run), side={"r": 4}).to_dict()
    run.start({"train": old, "cache_fingerprint": fp})
    (run.checkpoint).mkdir()
    (run.checkpoint / "info.json").write_text("{}")
    assert run.prepare(TrainConfig(cache="c", out=str(run), side={"r": 4, "tap_noise": 0.0}), fp, resumable=True)
    with pytest.raises(TrainError, match="differs in side"):
        run.prepare(TrainConfig(cache="c", out=str(run), side={"r": 4, "tap_noise": 0.3}), fp, resumable=True)
