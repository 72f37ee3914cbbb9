"""The method seam: names resolve to methods, unknown names and options are one-line errors."""

import ml_collections
import pytest

from research import methods


def test_full_fine_tuning_is_the_default():
    method = methods.build(None)
    assert isinstance(method, methods.Method) and method.trainable is None
    params = {"a": 1}
    assert method.init(None, params) is params


def test_unknown_method_and_option_are_one_line_errors():
    with pytest.raises(ValueError, match=r"config.method.name='lorra' is not one of \["):
        methods.build(ml_collections.ConfigDict({"name": "lorra"}))
    with pytest.raises(ValueError, match="config.method for 'full'.*rank"):
        methods.build(ml_collections.ConfigDict({"name": "full", "rank": 8}))
