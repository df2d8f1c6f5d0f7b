"""What the API computes when it takes a job: the cache key, the quota estimate, the rate limit."""

from __future__ import annotations

import pytest

from kiln.registry import job_types
from kiln.submission import RateLimiter, input_hash
from kiln.errors import RateLimited
from kiln.schemas import Resources
from kiln.schemas.sleep import SleepInput


def test_the_cache_key_ignores_how_the_same_input_is_written():
    one = SleepInput.model_validate({"seconds": 1})
    same = SleepInput.model_validate({"children": 0, "seconds": 1.0, "fail": False})
    rounded = SleepInput.model_validate({"seconds": 1.0000000000001})
    other = SleepInput.model_validate({"seconds": 1.001})
    assert input_hash("sleep", one) == input_hash("sleep", same) == input_hash("sleep", rounded)
    assert input_hash("sleep", one) != input_hash("sleep", other)
    assert input_hash("sleep", one) != input_hash("other-type", one)


def test_structures_in_any_form_give_one_cache_key_but_a_formula_does_not():
    from pymatgen.core import Lattice, Structure

    from kiln.schemas.ml_predict import MLPredictInput

    salt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    shuffled = Structure.from_sites(list(reversed(salt.sites)))
    keys = {
        input_hash("ml_predict", MLPredictInput.model_validate({"structure": form}))
        for form in (salt.as_dict(), salt.to(fmt="poscar"), salt.to(fmt="cif"), shuffled.as_dict())
    }
    assert len(keys) == 1
    formula = input_hash("ml_predict", MLPredictInput.model_validate({"structure": "NaCl"}))
    forces = input_hash("ml_predict", MLPredictInput.model_validate({"structure": salt.as_dict(), "property": "forces"}))
    assert formula not in keys and forces not in keys


def test_the_quota_estimate_is_an_hour_per_core_unless_the_type_knows_better():
    from kiln.schemas.ml_predict import MLPredictInput

    predict = MLPredictInput.model_validate({"structure": "Si"})
    ml_predict, sleep = job_types()["ml_predict"], job_types()["sleep"]
    assert ml_predict.core_hours(predict, Resources()) == 1.0
    assert ml_predict.core_hours(predict, Resources(cpu_count=4)) == 4.0
    assert sleep.core_hours(SleepInput(seconds=1800, children=1), Resources()) == pytest.approx(1.0)


def test_the_rate_limit_counts_per_key_and_kind_and_says_when_to_retry():
    limiter = RateLimiter()
    limiter.take("a", "batch submissions", 2)
    limiter.take("a", "batch submissions", 2)
    with pytest.raises(RateLimited, match="at most 2 per minute") as caught:
        limiter.take("a", "batch submissions", 2)
    assert 1 <= caught.value.retry_after <= 60
    limiter.take("b", "batch submissions", 2)
    limiter.take("a", "job submissions", 2)


def test_the_model_version_is_part_of_the_cache_key_through_the_job_type():
    from kiln.schemas.ml_predict import MLPredictInput

    ml_predict = job_types()["ml_predict"]
    request = MLPredictInput.model_validate({"structure": "Si"})
    versions = ml_predict.versions_of(request)
    assert versions["model_version"].startswith("matgl 2.1.2")
    assert input_hash("ml_predict", request, versions) != input_hash("ml_predict", request, {"model_version": "new"})


def test_tokens_count_once_used_and_the_call_after_the_limit_waits():
    limiter = RateLimiter()
    limiter.take("a", "LLM tokens", 100, amount=0)  # a check: nothing used yet
    limiter.spend("a", "LLM tokens", 150)  # the call let through used more than the limit
    with pytest.raises(RateLimited, match="at most 100 per minute") as caught:
        limiter.take("a", "LLM tokens", 100, amount=0)
    assert 59 <= caught.value.retry_after <= 60
    limiter.take("b", "LLM tokens", 100, amount=0)
