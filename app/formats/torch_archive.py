"""Recognise PyTorch files by their bytes and vet `torch.export` archives before torch ever reads them.

Nothing here imports torch or unpickles anything, so the API can refuse a bad file at upload in milliseconds. The
worker repeats `vet_exported_program` on the text it hands to torch's deserializer, which would otherwise evaluate
symbolic shape strings with sympy (`eval`), compile `guards_code`, and `torch.load(weights_only=False)` pickled
payloads.
"""

from __future__ import annotations

import json
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from app.errors import InvalidContent, UnsupportedFormat

TORCH_EXPORT = "torch.export"
TORCHSCRIPT = "torchscript"
SUFFIXES = {TORCH_EXPORT: ".pt2", TORCHSCRIPT: ".pt"}

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_MARK = 0x80
# The serialized program and its payload configs are JSON; anything bigger than this is not a model we can vet.
MAX_JSON_BYTES = 256 * 1024 * 1024

# Operators a converted program may call. aten covers every exported model; the file and print ops are the
# aten operators that reach outside the tensor world.
_ALLOWED_TARGET = re.compile(
    r"^(torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+"
    r"|_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|pow|neg|pos|abs|eq|ne|lt|le|gt|ge|and_|or_|not_)"
    r"|torch\.sym_(int|float|max|min|not|ite|sqrt|sum)"
    r"|math\.(ceil|floor|sqrt|trunc))$"
)
REFUSED_ATEN = {"from_file", "save", "_print", "_nested_from_file"}

# Symbolic shapes arrive as sympy srepr text and are parsed with sympy.sympify (an eval): only sympy constructors,
# their keyword flags, numbers, quoted symbol names and arithmetic may appear.
_SYMPY_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "Mul", "Add", "Pow", "Mod", "Max", "Min", "Abs", "Eq", "Ne", "Lt",
    "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality",
    "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair", "FloorDiv", "ModularIndexing", "Where",
    "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "IntTrueDiv", "FloatTrueDiv", "TruncToInt",
    "TruncToFloat", "ToFloat", "RoundToInt", "RoundDecimal", "Identity", "PowByNatural", "FloatPow", "Infinity",
    "NegativeInfinity", "oo", "zoo", "nan", "true", "false", "True", "False", "One", "Zero", "NegativeOne",
    "Half", "ceiling", "floor", "positive", "negative", "integer", "real", "nonnegative", "nonpositive",
    "finite", "infinite", "nonzero", "zero", "even", "odd", "commutative", "precision",
}
_EXPR_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|('[A-Za-z0-9_.+\-]*')|(\d+(?:\.\d+)?(?:e[+-]?\d+)?)"
                         r"|(\*\*|[-+*/%(),=<>!]))")
_SYMBOL_NAME = re.compile(r"^[a-z]{1,4}\d+$")  # torch's shape symbols: s0, u3, ps1...
# Node metadata that the deserializer turns into Python objects by name; dropped, since nothing needs it.
_DROPPED_METADATA = ("torch_fn", "source_fn_stack")


@dataclass
class TorchArchive:
    kind: str  # TORCH_EXPORT or TORCHSCRIPT
    root: str  # the archive's top folder, e.g. "model/"


def sniff(path: Path, filename: str, label: str) -> TorchArchive | None:
    """None for an ONNX candidate; the archive for a PyTorch file we can convert; a 415 for anything else."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    if head[:1] == bytes([_PICKLE_PROTOCOL_MARK]):
        raise _pickle_refused(label)
    if head != _ZIP_MAGIC:
        if suffix in (".pt", ".pt2", ".pth"):
            raise UnsupportedFormat(f"{label} is not a PyTorch archive (not a zip file); {_EXPORT_HINT}")
        if suffix not in ("", ".onnx"):
            raise UnsupportedFormat(f"{label} has the unsupported extension '{suffix}'; upload ONNX (.onnx), "
                                    "a torch.export archive (.pt2) or TorchScript (.pt)")
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError):
        raise UnsupportedFormat(f"{label} starts like a zip archive but is not a readable one") from None
    for info in infos:
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsupportedFormat(f"{label} contains a symbolic link ({info.filename[:100]!r}); refused")
    names = [info.filename for info in infos]
    root = _common_root(names)
    if root is None:
        raise UnsupportedFormat(f"{label} is a zip archive but not a PyTorch one; {_EXPORT_HINT}")
    members = {name[len(root):] for name in names}
    if "archive_format" in members and any(m.startswith("models/") and m.endswith(".json") for m in members):
        return TorchArchive(TORCH_EXPORT, root)
    if {"data.pkl", "constants.pkl"} <= members and members & {"version", ".data/version"} \
            and any(m.startswith("code/") for m in members):
        return TorchArchive(TORCHSCRIPT, root)
    if "data.pkl" in members:
        raise _pickle_refused(label)
    raise UnsupportedFormat(f"{label} is a zip archive but not a torch.export or TorchScript one; {_EXPORT_HINT}")


def is_torch_zip(path: Path) -> bool:
    """A zip written by torch (torch.export, TorchScript or a torch.save pickle), not an archive of a folder."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [info.filename for info in archive.infolist()]
    except (zipfile.BadZipFile, OSError):
        return False
    root = _common_root(names)
    if root is None:
        return False
    members = {name[len(root):] for name in names}
    return "data.pkl" in members or "archive_format" in members


_EXPORT_HINT = ("export with torch.export.save(torch.export.export(model, example), 'model.pt2'), "
                "torch.jit.save(torch.jit.trace(model, example), 'model.pt') or torch.onnx.export(model, example, "
                "'model.onnx', external_data=False)")


def _pickle_refused(label: str) -> UnsupportedFormat:
    return UnsupportedFormat(
        f"{label} is a Python pickle (torch.save of a module or a state dict); pickles are never loaded because "
        f"loading one can run arbitrary code. Instead, {_EXPORT_HINT}",
        code="pickle_refused",
    )


def _common_root(names: list[str]) -> str | None:
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        return None
    return roots.pop() + "/"


def read_member(archive: zipfile.ZipFile, name: str, label: str, limit: int = MAX_JSON_BYTES) -> bytes:
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise InvalidContent(f"{label} has no '{name}'") from None
    if info.file_size > limit:
        raise InvalidContent(f"{label}: '{name}' unpacks to {info.file_size} bytes, over the limit of {limit}")
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise InvalidContent(f"{label}: '{name}' unpacks past the limit of {limit} bytes")
    return data


@dataclass
class VettedProgram:
    model_name: str
    program: dict[str, Any]  # the ExportedProgram JSON, cleaned
    weights: dict[str, Any]
    constants: dict[str, Any]


def vet_exported_program(path: Path, root: str, label: str) -> VettedProgram:
    """Read a torch.export archive's JSON and refuse everything torch would execute or unpickle."""
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        programs = sorted(n for n in names if n.startswith(f"{root}models/") and n.endswith(".json"))
        if len(programs) != 1:
            raise InvalidContent(f"{label} holds {len(programs)} exported programs; upload an archive with one")
        model_name = programs[0][len(f"{root}models/"):-len(".json")]
        for legacy in (f"{root}data/weights/{model_name}.pt", f"{root}data/constants/{model_name}.pt"):
            if legacy in names:
                raise UnsupportedFormat(f"{label} stores its weights as a pickle (an old torch.export format); "
                                        "save it again with torch.export.save from PyTorch 2.6 or newer",
                                        code="pickle_refused")
        program = _json(archive, programs[0], label)
        weights = _json(archive, f"{root}data/weights/model_weights_config.json", label)
        constants = _json(archive, f"{root}data/constants/model_constants_config.json", label)
    for what, config in (("weight", weights), ("constant", constants)):
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise InvalidContent(f"{label}: the {what} table is not the torch.export format")
        for fqn, meta in entries.items():
            if not isinstance(meta, dict) or meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                    ("weight_", "tensor_")):
                raise UnsupportedFormat(
                    f"{label}: {what} '{str(fqn)[:80]}' is a pickled object (a tensor subclass or a custom "
                    "object); only plain tensors can be loaded safely. Export a model with plain tensor weights",
                    code="pickle_refused")
    if not isinstance(program, dict) or "graph_module" not in program:
        raise InvalidContent(f"{label}: its program is not the torch.export format")
    # Guards are Python source that torch compiles when the program is called; conversion needs none.
    program["guards_code"] = []
    _vet(program, label)
    return VettedProgram(model_name, program, weights, constants)


def _json(archive: zipfile.ZipFile, name: str, label: str) -> Any:
    try:
        return json.loads(read_member(archive, name, label))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidContent(f"{label}: '{name}' is not valid JSON") from None


def _vet(node: Any, label: str) -> None:
    """Walk the whole document: every operator target and every symbolic expression, wherever it is nested."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if "target" in item and "inputs" in item and isinstance(item["target"], str):
                check_target(item["target"], label)
            expression = item.get("expr_str")
            if isinstance(expression, str):
                check_expression(expression, label)
            metadata = item.get("metadata")
            if isinstance(metadata, dict):
                for key in _DROPPED_METADATA:
                    metadata.pop(key, None)
            ranges = item.get("range_constraints")
            if isinstance(ranges, dict):
                for key in ranges:
                    check_expression(key, label)
            stack.extend(item.values())


def check_target(target: str, label: str) -> None:
    parts = target.split(".")
    if not _ALLOWED_TARGET.match(target) or (parts[:3] == ["torch", "ops", "aten"] and parts[3] in REFUSED_ATEN):
        raise InvalidContent(
            f"{label} calls '{target[:100]}', which is not a standard aten operator; only programs made of "
            "aten operators are converted", code="unsupported_operator")


def check_expression(text: str, label: str) -> None:
    position = 0
    while position < len(text):
        match = _EXPR_TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise InvalidContent(f"{label} has a symbolic shape expression that is not plain arithmetic: "
                                 f"{text[:100]!r}", code="unsafe_expression")
        name = match.group(1)
        if name is not None and name not in _SYMPY_NAMES and not _SYMBOL_NAME.match(name):
            raise InvalidContent(f"{label} has a symbolic shape expression naming '{name[:40]}', which is not a "
                                 "shape function", code="unsafe_expression")
        position = match.end()
        while position < len(text) and text[position].isspace():
            position += 1
