"""bench.errors: the choice checker's two phrasings and the error-wrapping helper, message for message."""

from __future__ import annotations

import pytest

from bench.data.datasets import load_dataset
from bench.errors import BenchError, check_choice, reraised
from bench.training.config import make_config
from variants import get_variant


def test_check_choice_says_what_was_unknown_and_the_choices_in_order():
    check_choice("split", "test", ("train", "test"))  # a known value passes
    with pytest.raises(BenchError) as err:
        check_choice("split", "dev", ("train", "test"))
    assert str(err.value) == "unknown split 'dev'; choose one of: train, test"
    with pytest.raises(BenchError) as err:
        check_choice("schedule", "quadratic", ("linear", "cosine"), field=True)
    assert str(err.value) == "schedule must be one of linear, cosine, got 'quadratic'"


@pytest.mark.parametrize(("call", "message"), [
    (lambda: get_variant("nope"), "unknown variant 'nope'; choose one of: "),
    (lambda: load_dataset("nope", "test"), "unknown dataset 'nope'; choose one of: cifar10, digits"),
    (lambda: load_dataset("digits", "dev"), "unknown split 'dev'; choose one of: train, test"),
    (lambda: make_config(network="huge"), "unknown network 'huge'; choose one of: "),
    (lambda: make_config(precision="fp8"), "precision must be one of auto, fp32, bf16, got 'fp8'"),
])
def test_the_suite_refuses_an_unknown_choice_in_its_own_words(call, message):
    with pytest.raises(BenchError) as err:
        call()
    assert str(err.value).startswith(message)


def test_reraised_wraps_the_kinds_named_and_lets_a_bench_error_pass():
    with pytest.raises(BenchError) as err, reraised(lambda e: f"cannot read it ({e})", OSError):
        raise FileNotFoundError("gone")
    assert str(err.value) == "cannot read it (gone)" and err.value.__cause__ is None and err.value.__suppress_context__
    with pytest.raises(BenchError) as err, reraised(lambda e: "wrapped", OSError, chain=True):
        raise OSError("cause")
    assert str(err.value) == "wrapped" and str(err.value.__cause__) == "cause"
    with pytest.raises(BenchError) as err, reraised(lambda e: "wrapped", ValueError):
        raise BenchError("its own words")  # a BenchError is a ValueError, yet passes unchanged
    assert str(err.value) == "its own words"
    with pytest.raises(KeyError), reraised(lambda e: "wrapped", OSError):
        raise KeyError("not named: not wrapped")
