"""Model compression as a library: no web, database or settings imports, so a worker or a script can run it.

    recipe = parse_recipe("int8-static")
    result = run_recipe(original=Path("model.onnx"), output=Path("out.onnx"), recipe=recipe, data=data)
    result.report["speedup"], result.report["fidelity"]
"""

from app.compression.config import (
    PRESETS,
    Budget,
    DistillStep,
    OptimizeStep,
    PruneStep,
    QuantizeStep,
    Recipe,
    parse_recipe,
)
from app.compression.data import ModelData, from_arrays, from_npz, synthetic
from app.compression.errors import (
    Cancelled,
    CompressionError,
    DataRequired,
    InvalidRecipe,
    StepFailed,
    UnsupportedModel,
)
from app.compression.evaluate import measure
from app.compression.progress import CancelToken
from app.compression.recipes import RecipeResult, run_recipe
from app.compression.search import SearchResult, search

__all__ = [
    "PRESETS", "Budget", "CancelToken", "Cancelled", "CompressionError", "DataRequired", "DistillStep",
    "InvalidRecipe", "ModelData", "OptimizeStep", "PruneStep", "QuantizeStep", "Recipe", "RecipeResult",
    "SearchResult", "StepFailed", "UnsupportedModel", "from_arrays", "from_npz", "measure", "parse_recipe",
    "run_recipe", "search", "synthetic",
]
