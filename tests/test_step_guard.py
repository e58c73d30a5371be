"""``StepGuard`` on its own (the end-to-end guard runs in tests/test_lost_work.py)."""

from collections import defaultdict

import pytest

from rlad_pl.core.errors import ConfigError
from rlad_pl.training.step_guard import StepGuard


def test_streak_warning_once_stop_and_checkpoint_state():
    guard, counters = StepGuard(max_consecutive=3), defaultdict(float)
    first = guard.skip(counters, 2, 4, epoch=7)
    assert first == ("rlad_pl: warning: skipped an optimizer step (non-finite loss in 2 micro-batch(es) of 4, "
                     "epoch 7): parameters and optimizer state unchanged; counted in nonfinite/steps_skipped")
    assert guard.skip(counters, 0, 4, epoch=8) is None  # one warning line per run
    guard.step_taken()
    assert (guard.consecutive, counters["nonfinite/steps_skipped"]) == (0, 2.0)
    guard.skip(counters, 0, 4, epoch=9)
    guard.skip(counters, 0, 4, epoch=10)
    resumed = StepGuard(max_consecutive=3)
    resumed.load_state_dict(guard.state_dict())
    assert guard.state_dict() == {"consecutive_skipped_steps": 2}
    with pytest.raises(ConfigError) as e:  # the resumed streak counts: the 3rd in a row stops
        resumed.skip(counters, 0, 4, epoch=11)
    assert str(e.value).startswith("model.max_consecutive_skipped_steps: 3 optimizer steps in a row were skipped "
                                   "(non-finite gradient norm, epoch 11)")
    assert counters["nonfinite/steps_skipped"] == 5.0


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_limit_is_a_positive_integer(value):
    with pytest.raises(ConfigError, match=r"^model\.max_consecutive_skipped_steps: expected an integer >= 1"):
        StepGuard(max_consecutive=value)
