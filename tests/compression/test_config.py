from __future__ import annotations

import pytest

from app.compression import PRESETS, InvalidRecipe, parse_recipe
from app.compression.config import DistillStep, PruneStep, QuantizeStep


def test_every_preset_parses_to_typed_steps() -> None:
    for name in PRESETS:
        recipe = parse_recipe(name)
        assert recipe.name == name and recipe.steps
    shrink = parse_recipe("shrink-50")
    assert isinstance(shrink.steps[0], PruneStep) and shrink.steps[0].mode == "structured"
    assert isinstance(shrink.steps[1], DistillStep)


def test_custom_recipe_with_defaults() -> None:
    recipe = parse_recipe({"steps": [{"op": "prune", "mode": "structured", "sparsity": 0.3},
                                     {"op": "quantize", "mode": "static", "calibration": "entropy"}]})
    step = recipe.steps[1]
    assert isinstance(step, QuantizeStep) and step.calibration == "entropy" and step.per_channel is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("int3", "unknown preset 'int3'"),
        ("auto", "search"),
        ({"steps": [{"op": "frobnicate"}]}, "unknown op 'frobnicate'"),
        ({"steps": [{"op": "prune", "mode": "unstructured", "sparsity": 1.5}]}, "sparsity"),
        ({"steps": [{"op": "prune", "mode": "unstructured", "sparsity": "half"}]}, "sparsity"),
        ({"steps": [{"op": "quantize", "mode": "int4", "block_size": 48}]}, "power of two"),
        ({"steps": [{"op": "quantize", "mode": "dynamic", "colour": "red"}]}, "colour"),
        ({"steps": [{"op": "distill", "epochs": 0}]}, "epochs"),
        ({"steps": []}, "at least 1"),
        ({"stages": []}, "steps"),
        (42, "preset name or an object"),
    ],
)
def test_bad_recipes_name_the_problem(spec: object, message: str) -> None:
    with pytest.raises(InvalidRecipe, match=message):
        parse_recipe(spec)  # type: ignore[arg-type]
