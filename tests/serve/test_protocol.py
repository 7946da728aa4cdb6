"""Request validation messages name what is wrong with a field, for the values JSON parsers let through."""

import math

import pytest
from pydantic import ValidationError

from nanoseek.serve.protocol import CompletionRequest


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_temperature_is_named_as_not_finite(value):
    with pytest.raises(ValidationError) as error:
        CompletionRequest(model="m", prompt="a", temperature=value)
    assert "finite number" in str(error.value)
    assert "less than or equal" not in str(error.value)


def test_finite_sampling_values_still_validate_their_ranges():
    assert CompletionRequest(model="m", prompt="a", temperature=0.5, top_p=0.9).temperature == 0.5
    with pytest.raises(ValidationError, match="less than or equal to 2"):
        CompletionRequest(model="m", prompt="a", temperature=3.0)
