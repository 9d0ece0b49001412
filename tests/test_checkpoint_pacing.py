"""When a Ray Train worker checkpoints the member in training (CheckpointPacer; no Ray started)."""

import pytest

from simex_ray.distributed.train import CheckpointPacer


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_first_epoch_is_checkpointed_then_only_when_the_training_since_is_worth_it():
    clock = Clock()
    pacer = CheckpointPacer(budget=0.1, clock=clock)
    assert pacer.due()

    def checkpoint():  # a checkpoint that takes 2 s
        clock.t += 2.0

    pacer.write(checkpoint)
    decisions = []
    for _ in range(50):  # 1-second epochs: due again after 20 s of training
        clock.t += 1.0
        if pacer.due():
            decisions.append(round(clock.t))
            pacer.write(checkpoint)
    assert decisions == [22, 44]
    assert (pacer.written, pacer.skipped) == (3, 48)
    # Checkpoints took at most about the budget of the time.
    assert pacer.written * 2.0 / clock.t <= 0.1 + 2.0 / clock.t


def test_long_epochs_are_all_checkpointed():
    clock = Clock()
    pacer = CheckpointPacer(budget=0.1, clock=clock)
    for _ in range(5):
        clock.t += 60.0  # a real model's epoch
        assert pacer.due()
        pacer.write(lambda: setattr(clock, "t", clock.t + 2.0))
    assert pacer.skipped == 0


@pytest.mark.parametrize("budget", [0.0, -1.0, 1.5])
def test_budget_outside_zero_one_is_refused(budget):
    with pytest.raises(ValueError, match="budget"):
        CheckpointPacer(budget=budget)
