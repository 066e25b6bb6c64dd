from __future__ import annotations

import pytest

from app.api.fastpath import match


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/models/mlp/infer", ("v2", "mlp", None)),
        ("/v2/models/mlp/versions/int8/infer", ("v2", "mlp", "int8")),
        ("/models/mlp/predict", ("predict", "mlp", None)),
        ("/v2/models//infer", None),
        ("/v2/models/mlp/ready", None),
        ("/v2/models/mlp/versions//infer", None),
        ("/models/mlp/compressions", None),
        ("/models/mlp/predict/extra", None),
        ("/v2/models/mlp/infer/", None),
    ],
)
def test_only_prediction_paths_take_the_fast_path(path: str, expected: tuple[str, str, str | None] | None) -> None:
    assert match(path) == expected
