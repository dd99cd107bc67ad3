"""The three things every lesson's check test says, written once: a right answer passes (the check prints one ✔),
a named mistake fails with a message that names it, and the unfilled exercise stops with NotImplementedError
(so the learner reads "write your solution here", not a failed check)."""
import pytest


def unfilled(*args, **kwargs):
    """What an exercise cell holds before the learner writes it (``exercises.strip_solutions`` writes this)."""
    raise NotImplementedError("Exercise: write your solution here")


def assert_passes(capsys, *calls):
    """Each ``(check, answer, ...)`` passes and prints its ✔; returns what they printed (to look for a number)."""
    for check, *answers in calls:
        check(*answers)
    out = capsys.readouterr().out
    assert out.count("✔") == len(calls), out
    return out


def assert_rejects(check, *answers, message=None):
    """``check(*answers)`` fails with an AssertionError whose text matches the regular expression ``message``;
    returns that text (to test what it must not say)."""
    with pytest.raises(AssertionError, match=message) as info:
        check(*answers)
    return str(info.value)


def assert_unfilled_stops(*checks, exercise=unfilled):
    """Each check, given the unfilled ``exercise``, lets its NotImplementedError through."""
    for check in checks:
        with pytest.raises(NotImplementedError):
            check(exercise)
