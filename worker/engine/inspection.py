"""What a teacher file is and what it looks like, read without running it.

:func:`sniff_teacher` classifies a file by its content (never its name) and
refuses pickle-based formats; :func:`inspect` reads a teacher's
:class:`TeacherSignature` from the ONNX graph, the safetensors header and the
JSON configs alone. Nothing here imports torch or unpickles anything: the API
calls it on every upload.
"""

from __future__ import annotations

import json
import posixpath
import re
import struct
import zipfile
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast, get_args

import onnx
from google.protobuf.message import DecodeError

from worker.engine.archive import (
    TEACHER_LIMITS,
    ZIP_MAGIC,
    ExpansionBudget,
    extract_members,
    list_members,
    member_path,
    open_member,
)
from worker.engine.errors import (
    ArchiveUnsafe,
    TeacherIncompatible,
    TeacherInvalid,
    UnsupportedFormat,
)
from worker.engine.onnx_graph import all_tensors, check_structure
from worker.engine.signature import Dim, TeacherSignature, TensorSpec
from worker.engine.spec import BuiltinArchitecture

#: Student architectures a safetensors bundle's config may name.
BUILTIN_ARCHITECTURES: tuple[str, ...] = get_args(BuiltinArchitecture)

#: Operators of scikit-learn graphs (the ``ai.onnx.ml`` domain) that classify.
SKLEARN_CLASSIFIERS = frozenset(
    {"TreeEnsembleClassifier", "LinearClassifier", "SVMClassifier", "ZipMap"}
)
SKLEARN_REGRESSORS = frozenset({"TreeEnsembleRegressor", "LinearRegressor", "SVMRegressor"})
ML_DOMAIN = "ai.onnx.ml"

HOW_TO_EXPORT = (
    "Export the model to ONNX (torch.onnx.export(model, example_inputs, 'model.onnx')) or save "
    "its weights with safetensors (safetensors.torch.save_file(model.state_dict(), "
    "'model.safetensors')) and zip them with a config.json naming the architecture; "
    "transformers models: model.save_pretrained(folder, safe_serialization=True) and zip the "
    "folder."
)
PICKLE_REFUSAL = "{what}; unpickling runs arbitrary code, so it is never loaded. " + HOW_TO_EXPORT

#: Elements of one tensor, and parameters of one teacher: 2**44 (17.6 trillion) is ten times
#: the largest models built, and keeps every count well inside a signed 64-bit integer.
MAX_ELEMENTS = 2**44

_MAX_JSON_BYTES = 16 * 2**20
# Protobuf's limit on one serialized message.
_MAX_GRAPH_BYTES = 2**31
_MAX_SAFETENSORS_HEADER = 100 * 2**20
_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    8: "string",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    14: "complex64",
    15: "complex128",
    16: "bfloat16",
}
_MODALITIES = ("tabular", "image", "sequence", "text")
_FLOAT_DTYPES = frozenset({"float32", "float16", "float64", "bfloat16"})
# Quantized graphs keep their weights as 8-bit integers.
_WEIGHT_DTYPES = _FLOAT_DTYPES | {"int8", "uint8"}
# First byte of a serialized ModelProto: the tag of one of its fields.
_MODELPROTO_TAGS = frozenset({0x08, 0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72})
_GENERIC_GRAPH_NAMES = frozenset({"", "main_graph", "torch_jit", "torch-jit-export", "graph"})
# Tokenizers of these families give no segment ids (see hf.py, which asks the tokenizer).
_NO_TOKEN_TYPES = frozenset({"roberta", "xlm-roberta", "camembert", "distilbert", "mpnet"})
_ST_POOLING_KEYS = (
    "pooling_mode_cls_token",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


# --------------------------------------------------------------------------- bundles


class Bundle:
    """The files of a zip (validated by :func:`archive.list_members`) or of a folder.

    Names are POSIX paths relative to the bundle root: a single top folder is
    stripped, as :func:`archive.bundle_root` does after extraction. A zip is read
    under :data:`archive.TEACHER_LIMITS`: every read of its members counts against
    one :class:`archive.ExpansionBudget`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.is_zip = self.path.is_file()
        sizes: dict[str, int] = {}
        self._infos: dict[str, zipfile.ZipInfo] = {}
        self._budget: ExpansionBudget | None = None
        if self.is_zip:
            for info in list_members(self.path, TEACHER_LIMITS):
                sizes[info.filename] = info.file_size
                self._infos[info.filename] = info
            self._budget = ExpansionBudget(self.path, TEACHER_LIMITS)
        else:
            for p in self.path.rglob("*"):
                if p.is_file() and not p.is_symlink():
                    sizes[p.relative_to(self.path).as_posix()] = p.stat().st_size
        visible = {
            n: s for n, s in sizes.items() if not n.split("/")[0].startswith(("__MACOSX", "."))
        }
        tops = {n.split("/")[0] for n in visible}
        self.prefix = ""
        if len(tops) == 1 and all("/" in n for n in visible):
            self.prefix = next(iter(tops)) + "/"
        self.sizes = {n[len(self.prefix) :]: s for n, s in visible.items()}
        self.names = sorted(self.sizes)

    def archive_name(self, name: str) -> str:
        """Member ``name``'s full name in the zip (its path under the folder)."""
        return self.prefix + name

    def open(self, name: str) -> IO[bytes]:
        """A binary stream of member ``name``."""
        full = self.archive_name(name)
        if self._budget is not None:
            return open_member(self.path, self._infos[full], self._budget)
        return open(self.path / full, "rb")

    def read(self, name: str, limit: int = _MAX_JSON_BYTES) -> bytes:
        """Member ``name``'s bytes; :class:`TeacherInvalid` if it is over ``limit``."""
        size = self.sizes[name]
        if size > limit:
            raise TeacherInvalid(f"{name} is too large ({size} bytes)", field="teacher")
        with self.open(name) as f:
            # Never more than the listing says: a buffer of ``limit`` is never allocated.
            data = f.read(size + 1)
        if len(data) > size:
            raise TeacherInvalid(f"{name} is longer than the bundle lists it", field="teacher")
        return data

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        # ValueError covers integers too long to convert; RecursionError, deep nesting.
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise TeacherInvalid(f"cannot read {name}: {exc}", field="teacher") from None

    def basenames(self) -> set[str]:
        return {PurePosixPath(n).name for n in self.names}


# --------------------------------------------------------------------------- sniffing


def sniff_teacher(path: str | Path) -> str:
    """The teacher format of ``path``, from its content: onnx, safetensors or huggingface.

    Raises :class:`UnsupportedFormat` for pickle-based files (plain pickles,
    ``torch.save`` and TorchScript archives, ``.pt2`` exported programs, transformers
    folders with only ``pytorch_model.bin``) and for unknown content, and
    :class:`TeacherInvalid` for a file that looks like ONNX but does not parse.
    """
    path = Path(path)
    if _is_bundle(path):
        return _classify_bundle(Bundle(path))[0]
    _read_plain_onnx(path)
    return "onnx"


def _is_bundle(path: Path) -> bool:
    if path.is_dir():
        return True
    if not path.is_file():
        raise TeacherInvalid(f"teacher file {path.name!r} does not exist", field="teacher")
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def screen_teacher(path: str | Path) -> str:
    """The teacher format of ``path`` from its first bytes (and a zip's listing) alone.

    Refuses what :func:`sniff_teacher` refuses by content type (pickle-based
    files, HDF5, bare safetensors, unknown bytes) without parsing the file
    whole, so it is cheap for files of any size; a file that passes may still
    turn out invalid once :func:`inspect` reads it.
    """
    path = Path(path)
    if _is_bundle(path):
        return _classify_bundle(Bundle(path))[0]
    _screen_plain(path)
    return "onnx"


def _screen_plain(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(16)
    _refuse_known_non_onnx(head, path.stat().st_size)
    if not _looks_like_onnx(head) and (not head or head[0] not in _MODELPROTO_TAGS):
        raise _unknown_format()


def _read_plain_onnx(path: Path) -> onnx.ModelProto:
    """Parse a file that is not a zip: ONNX, or refused with the reason."""
    # Cheap checks first: only a plausible ModelProto is read whole and parsed.
    _screen_plain(path)
    return _parse_onnx_bytes(path.read_bytes(), path.name)


def _refuse_known_non_onnx(head: bytes, size: int) -> None:
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise UnsupportedFormat(
            PICKLE_REFUSAL.format(
                what="This file is a pickle (as .pt, .pth, .pkl and .ckpt files are)"
            ),
            field="teacher",
        )
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        raise UnsupportedFormat(
            "HDF5 (Keras .h5) models are not supported; convert the model to ONNX "
            "(for example with tf2onnx) and upload the .onnx file.",
            field="teacher",
        )
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise UnsupportedFormat(
                "a bare safetensors file holds weights but not the architecture; zip it with a "
                "config.json naming the architecture (or upload an ONNX export).",
                field="teacher",
            )


def _looks_like_onnx(head: bytes) -> bool:
    # ir_version (field 1, varint) comes first in every exporter we know; versions are small.
    return len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] <= 30


def _parse_onnx_bytes(data: bytes, name: str, *, expected: bool = False) -> onnx.ModelProto:
    """Parse a serialized ModelProto.

    Content that fails to parse is :class:`TeacherInvalid` when it looks like ONNX
    (or is ``expected`` to be ONNX), else :class:`UnsupportedFormat`.
    """
    looks = expected or _looks_like_onnx(data[:2])
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        if looks:
            raise TeacherInvalid(
                f"{name} is not a valid ONNX model (truncated or corrupt: {exc})", field="teacher"
            ) from None
        raise _unknown_format() from None
    if not model.HasField("graph") or not model.opset_import:
        if looks:
            raise TeacherInvalid(f"{name} is an ONNX model without a graph", field="teacher")
        raise _unknown_format()
    _check_graph(model, name)
    return model


def _check_graph(model: onnx.ModelProto, name: str) -> None:
    """Structural checks that catch truncated or hand-broken graphs before a runtime does.

    Cyclic graphs and graphs over the size caps are refused here, before any walk of them.
    """
    graph = model.graph
    if not graph.output:
        raise TeacherInvalid(f"{name}: the ONNX graph declares no outputs", field="teacher")
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    known |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        known.update(node.output)
    missing = [o.name for o in graph.output if o.name not in known]
    if missing:
        raise TeacherInvalid(
            f"{name}: the ONNX graph's outputs {missing} are produced by no node", field="teacher"
        )
    check_structure(model, name)


def _unknown_format() -> UnsupportedFormat:
    return UnsupportedFormat(
        "unrecognised teacher format: expected an ONNX model, a zip of safetensors weights with "
        "config.json, or a zip of a transformers folder. " + HOW_TO_EXPORT,
        field="teacher",
    )


@dataclass
class _Classified:
    format: str
    graph: str | None = None  # the ONNX member
    config: str | None = None  # the safetensors bundle's config member
    weights: str | None = None


def _classify_bundle(bundle: Bundle) -> tuple[str, _Classified]:
    names = bundle.names
    base = bundle.basenames()
    if "archive_format" in base or any("serialized_exported_program" in n for n in names):
        raise UnsupportedFormat(
            PICKLE_REFUSAL.format(
                what="This is a torch.export .pt2 archive, which stores data with pickle"
            ),
            field="teacher",
        )
    if "constants.pkl" in base:
        raise UnsupportedFormat(
            PICKLE_REFUSAL.format(
                what="This is a TorchScript archive (torch.jit.save), built on pickle"
            ),
            field="teacher",
        )
    if "data.pkl" in base:
        raise UnsupportedFormat(
            PICKLE_REFUSAL.format(what="This is a torch.save archive (.pt/.pth), built on pickle"),
            field="teacher",
        )
    graphs = [n for n in names if n.endswith(".onnx")]
    if len(graphs) > 1:
        raise TeacherInvalid(
            f"the bundle holds several ONNX graphs ({', '.join(graphs[:5])}); upload one",
            field="teacher",
        )
    if graphs:
        return "onnx", _Classified("onnx", graph=graphs[0])
    if "modules.json" in names or _hf_config(bundle) is not None:
        _require_hf_safetensors(bundle)
        return "huggingface", _Classified("huggingface")
    for cfg in ("config.json", "student_config.json"):
        if cfg in names:
            config = bundle.json(cfg)
            if isinstance(config, dict) and "architecture" in config:
                return "safetensors", _safetensors_bundle(bundle, cfg, config)
    if any(n.endswith((".safetensors",)) for n in names):
        raise TeacherInvalid(
            "the bundle has safetensors weights but no config.json naming the architecture "
            f"(one of {', '.join(BUILTIN_ARCHITECTURES)}) or the transformers model_type",
            field="teacher",
        )
    pickled = [n for n in names if n.endswith((".pt", ".pth", ".bin", ".ckpt", ".pkl"))]
    if pickled:
        raise UnsupportedFormat(
            PICKLE_REFUSAL.format(what=f"The bundle's {pickled[0]} is pickle-based"),
            field="teacher",
        )
    if "saved_model.pb" in base:
        raise UnsupportedFormat(
            "TensorFlow SavedModels are not supported; convert the model to ONNX (for example "
            "with tf2onnx) and upload the .onnx file.",
            field="teacher",
        )
    raise _unknown_format()


def _hf_config(bundle: Bundle) -> dict[str, Any] | None:
    if "config.json" not in bundle.names:
        return None
    config = bundle.json("config.json")
    if isinstance(config, dict) and "model_type" in config:
        return config
    return None


def _require_hf_safetensors(bundle: Bundle) -> None:
    if any(n.endswith(".safetensors") for n in bundle.names):
        return
    pickled = sorted(
        n
        for n in bundle.names
        if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".pkl"))
    )
    if pickled:
        raise UnsupportedFormat(
            f"the transformers folder has weights only in {', '.join(pickled[:3])}, which is "
            "pickle-based (or framework-specific), and unpickling runs arbitrary code, so it is "
            "never loaded. Convert it to safetensors: load it with transformers and call "
            "model.save_pretrained(folder, safe_serialization=True), then zip the folder again.",
            field="teacher",
        )
    raise TeacherInvalid("the transformers folder has no model.safetensors", field="teacher")


def _safetensors_bundle(bundle: Bundle, cfg: str, config: dict[str, Any]) -> _Classified:
    arch = config.get("architecture")
    if arch not in BUILTIN_ARCHITECTURES:
        raise TeacherInvalid(
            f"{cfg} names architecture {arch!r}; a safetensors teacher must be one of "
            f"{', '.join(BUILTIN_ARCHITECTURES)}",
            field="teacher",
        )
    weights = [n for n in bundle.names if n.endswith(".safetensors")]
    named = (config.get("weights") or {}).get("file") if isinstance(config, dict) else None
    if isinstance(named, str) and named in weights:
        weights = [named]
    if len(weights) != 1:
        raise TeacherInvalid(
            f"a safetensors bundle needs exactly one .safetensors file beside {cfg}; "
            f"found {len(weights)}",
            field="teacher",
        )
    return _Classified("safetensors", config=cfg, weights=weights[0])


# --------------------------------------------------------------------------- inspection


def inspect(path: str | Path) -> TeacherSignature:
    """The teacher's signature, read from its files without running (or importing) a model."""
    path = Path(path)
    if not _is_bundle(path):
        model = _read_plain_onnx(path)
        return onnx_signature(model, external_bytes(model, path.parent) + path.stat().st_size)
    bundle = Bundle(path)
    fmt, found = _classify_bundle(bundle)
    if fmt == "onnx":
        assert found.graph is not None
        model = read_bundle_graph(bundle, found.graph)
        data = _present_data_members(bundle, model, found.graph)
        return onnx_signature(model, sum(bundle.sizes[m] for m in [found.graph, *data]))
    if fmt == "safetensors":
        return _safetensors_signature(bundle, found)
    return _hf_signature(bundle)


# --------------------------------------------------------------------------- ONNX


@dataclass(frozen=True)
class ExtractedGraph:
    """An ONNX bundle on disk: its root folder (the zip's single top folder) and its graph."""

    root: Path
    graph: Path


def extract_onnx_bundle(path: str | Path, dest: str | Path) -> ExtractedGraph:
    """Extract an ONNX zip bundle's graph and the external data it references into ``dest``.

    Nothing else in the zip is written. Every referenced path must name a member
    inside the bundle (:class:`ArchiveUnsafe` if it would escape,
    :class:`TeacherInvalid` if it is missing); reads and writes run under
    :data:`archive.TEACHER_LIMITS`.
    """
    bundle = Bundle(path)
    fmt, found = _classify_bundle(bundle)
    if fmt != "onnx" or found.graph is None:
        raise TeacherInvalid(f"the bundle holds no ONNX graph (it is {fmt})", field="teacher")
    model = read_bundle_graph(bundle, found.graph)
    members = [found.graph, *_present_data_members(bundle, model, found.graph)]
    names = [bundle.archive_name(m) for m in members]
    root = extract_members(bundle.path, dest, names, TEACHER_LIMITS) / bundle.prefix
    return ExtractedGraph(root, root / found.graph)


#: The files a transformers / sentence-transformers folder is read from, by name: the
#: configs, the tokenizer's files and the weights. Nothing else in a bundle is extracted.
HF_FOLDER_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tokenizer.model",
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
    }
)


#: Weight files of a format that is never loaded (pickle-based or framework-specific).
PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def require_safetensors(names: Collection[str], what: str) -> None:
    """Refuse a transformers folder holding ``names`` unless its weights are in safetensors."""
    if "model.safetensors" in names or "model.safetensors.index.json" in names:
        return
    pickled = sorted(n for n in names if n.endswith(PICKLED_WEIGHT_SUFFIXES))
    if pickled:
        raise UnsupportedFormat(
            f"{what} has weights only in {', '.join(pickled)}, a pickle-based (or "
            "framework-specific) format that is never loaded. Convert it to safetensors where "
            "you trust it: transformers model.save_pretrained(folder, safe_serialization=True), "
            "or sentence-transformers model.save(folder, safe_serialization=True); then zip the "
            "folder again.",
            field="teacher",
        )
    raise TeacherInvalid(f"{what} has no model.safetensors", field="teacher")


def extract_hf_bundle(path: str | Path, dest: str | Path) -> Path:
    """Extract a transformers zip's referenced files into ``dest``; return the folder to load.

    Only the files of :data:`HF_FOLDER_FILES` in the bundle's root and in the module
    folders ``modules.json`` names are written, plus the weight shards the index names;
    an unreferenced member never reaches the disk. Reads and writes run under
    :data:`archive.TEACHER_LIMITS`.
    """
    bundle = Bundle(path)
    _require_safetensors_in(bundle)
    members = hf_bundle_members(bundle)
    if not members:
        raise TeacherInvalid("the bundle holds no transformers folder", field="teacher")
    names = [bundle.archive_name(m) for m in members]
    return extract_members(bundle.path, dest, names, TEACHER_LIMITS) / bundle.prefix


def _require_safetensors_in(bundle: Bundle) -> None:
    """Refuse pickle-only weights by name, as the loader would: they never reach the disk."""
    folders = {"": "the transformers model"}
    if "modules.json" in bundle.sizes:
        found = _sentence_transformer(bundle)
        folders = {found.model_dir: "the transformers model"}
        for dense in found.dense:
            folder = str(dense["folder"])
            folders[folder] = f"sentence-transformers module {PurePosixPath(folder).name}"
    for folder, what in folders.items():
        prefix = f"{folder}/" if folder else ""
        if prefix + "config.json" not in bundle.sizes:
            continue
        inside = [n[len(prefix) :] for n in bundle.names if n.startswith(prefix)]
        require_safetensors([n for n in inside if "/" not in n], what)


def hf_bundle_members(bundle: Bundle) -> list[str]:
    """The members a transformers folder reads: its files by name, and the indexed shards."""
    folders = [""]
    if "modules.json" in bundle.sizes:
        folders += _module_folders(bundle)
    wanted: set[str] = set()
    for folder in dict.fromkeys(folders):
        prefix = f"{folder}/" if folder else ""
        wanted.update(prefix + f for f in HF_FOLDER_FILES if prefix + f in bundle.sizes)
        index = prefix + "model.safetensors.index.json"
        if index in bundle.sizes:
            wanted.update(_indexed_shards(bundle, index, prefix))
    return sorted(wanted)


def _module_folders(bundle: Bundle) -> list[str]:
    """The folders of the sentence-transformers modules ``modules.json`` lists."""
    modules = bundle.json("modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise TeacherInvalid("modules.json is not a list of modules", field="teacher")
    raw = [str(m.get("path") or "") for m in modules]
    return [str(member_path(r)) for r in raw if r not in ("", ".")]


def _indexed_shards(bundle: Bundle, index: str, prefix: str) -> list[str]:
    """The weight shards ``index`` names that the bundle holds, each a member inside it."""
    content = bundle.json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise TeacherInvalid(f"{index} has no weight_map", field="teacher")
    shards = []
    for shard in set(map(str, weight_map.values())):
        try:
            member = prefix + str(member_path(shard))
        except ArchiveUnsafe:
            continue  # never extracted; the loader refuses the index, naming the entry
        if member in bundle.sizes:
            shards.append(member)
    return shards


def _present_data_members(bundle: Bundle, model: onnx.ModelProto, graph: str) -> list[str]:
    """The members holding ``graph``'s external data, each contained in the bundle and present."""
    members = bundle_external_members(model, graph)
    for member in members:
        if member not in bundle.sizes:
            raise TeacherInvalid(
                f"{graph} refers to external data {member!r}, which the bundle lacks",
                field="teacher",
            )
    return members


def read_bundle_graph(bundle: Bundle, member: str) -> onnx.ModelProto:
    """Parse the bundle's ONNX graph (its external data is left unread)."""
    return _parse_onnx_bytes(bundle.read(member, limit=_MAX_GRAPH_BYTES), member, expected=True)


def load_onnx(path: str | Path, *, expected: bool = False) -> onnx.ModelProto:
    """Parse an ONNX file without its external data.

    Anything else is refused as by :func:`sniff_teacher`; with ``expected`` (a
    bundle's ``.onnx`` member) content that does not parse is :class:`TeacherInvalid`.
    """
    path = Path(path)
    if expected:
        return _parse_onnx_bytes(path.read_bytes(), path.name, expected=True)
    return _read_plain_onnx(path)


def external_locations(model: onnx.ModelProto) -> list[str]:
    """Distinct ``location`` entries of the model's external tensors, in order.

    Subgraphs (``If``/``Loop``/``Scan`` bodies) and function bodies are included: the
    runtime reads their external data too.
    """
    seen: dict[str, None] = {}
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            if "location" not in entries:
                raise TeacherInvalid(
                    f"external tensor {tensor.name!r} has no location", field="teacher"
                )
            seen[entries["location"]] = None
    return list(seen)


def bundle_external_members(model: onnx.ModelProto, graph_member: str) -> list[str]:
    """The bundle members holding ``graph_member``'s external data; refuses escaping paths."""
    folder = posixpath.dirname(graph_member)
    out = []
    for location in external_locations(model):
        joined = posixpath.normpath(posixpath.join(folder, location))
        # member_path refuses absolute paths, backslashes and anything that climbs out.
        out.append(str(member_path(joined)))
    return out


def external_bytes(model: onnx.ModelProto, base_dir: Path) -> int:
    """Total size of the external data files beside a plain graph file (contained in its folder)."""
    from worker.engine.archive import contained

    total = 0
    for location in external_locations(model):
        target = contained(base_dir, location)
        if not target.is_file():
            raise TeacherInvalid(
                f"the graph refers to external data {location!r}, which does not exist beside it",
                field="teacher",
            )
        total += target.stat().st_size
    return total


def dtype_name(elem_type: int) -> str:
    """The numpy-style name of an ONNX tensor element type ("float32", "int64", ...)."""
    return _ONNX_DTYPES.get(elem_type, f"onnx:{elem_type}")


def _dims(shape: onnx.TensorShapeProto, name: str) -> list[Dim]:
    out: list[Dim] = []
    for d in shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    # Symbolic and negative ("unknown") sizes are left out of the product.
    element_count([d for d in out if isinstance(d, int) and d >= 0], f"tensor {name!r}")
    return out


def _value_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    t = value.type
    if t.HasField("tensor_type"):
        tensor = t.tensor_type
        shape = _dims(tensor.shape, value.name) if tensor.HasField("shape") else []
        return TensorSpec(value.name, shape, dtype_name(tensor.elem_type))
    if t.HasField("sequence_type") and t.sequence_type.elem_type.HasField("map_type"):
        m = t.sequence_type.elem_type.map_type
        inner = m.value_type.tensor_type.elem_type if m.value_type.HasField("tensor_type") else 0
        return TensorSpec(
            value.name, [None], f"sequence<map<{dtype_name(m.key_type)},{dtype_name(inner)}>>"
        )
    return TensorSpec(value.name, [], t.WhichOneof("value") or "unknown")


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs fed at run time (old graphs also list their initializers as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def element_count(dims: Iterable[Any], what: str) -> int:
    """The product of ``dims``: :class:`TeacherInvalid` for a negative size or past
    :data:`MAX_ELEMENTS`, checked as it grows, so absurd shapes cost no big-number arithmetic."""
    count = 1
    for raw in dims:
        d = int(raw)
        if d < 0 or d > MAX_ELEMENTS:
            raise TeacherInvalid(f"{what} has a dimension of {d}", field="teacher")
        count *= d
        if count > MAX_ELEMENTS:
            raise TeacherInvalid(f"{what} has more than {MAX_ELEMENTS} elements", field="teacher")
    return count


def parameter_total(counts: Iterable[int], what: str) -> int:
    """The sum of ``counts``; :class:`TeacherInvalid` past :data:`MAX_ELEMENTS`."""
    total = 0
    for n in counts:
        total += n
        if total > MAX_ELEMENTS:
            raise TeacherInvalid(f"{what}: more than {MAX_ELEMENTS} parameters", field="teacher")
    return total


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _class_labels(node: onnx.NodeProto) -> list[str] | None:
    for key in ("classlabels_int64s", "classlabels_strings", "classlabels_ints"):
        value = _attr(node, key)
        if value:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in value]
    return None


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def _ends_in(producers: dict[str, onnx.NodeProto], name: str, op_types: set[str]) -> bool:
    """Whether ``name`` comes from one of ``op_types`` through shape-only ops."""
    passthrough = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}
    seen = {name}
    node = producers.get(name)
    while node is not None and node.op_type in passthrough and node.input:
        if node.input[0] in seen:
            return False
        seen.add(node.input[0])
        node = producers.get(node.input[0])
    return node is not None and node.op_type in op_types


def _architecture(model: onnx.ModelProto, sklearn_op: str | None) -> str:
    name = model.graph.name
    wrapped = re.fullmatch(r"ONNX\((.+)\)", name)
    if wrapped:
        return wrapped.group(1)
    if name and name not in _GENERIC_GRAPH_NAMES:
        return name
    return sklearn_op or model.producer_name or "onnx"


def _modality(inputs: list[TensorSpec]) -> Any:
    if not inputs:
        return None
    first = inputs[0]
    if first.dtype in ("int64", "int32") and any(i.name == "input_ids" for i in inputs):
        return "text"
    return {2: "tabular", 3: "sequence", 4: "image"}.get(len(first.shape))


def onnx_signature(model: onnx.ModelProto, size: int) -> TeacherSignature:
    """The signature of a parsed ONNX graph (external data not loaded); ``size`` in bytes."""
    graph = model.graph
    inputs = [_value_spec(v) for v in graph_inputs(model)]
    outputs = [_value_spec(v) for v in graph.output]
    sizes = [(t, element_count(t.dims, f"initializer {t.name!r}")) for t in graph.initializer]
    parameters = parameter_total(
        (n for t, n in sizes if dtype_name(t.data_type) in _WEIGHT_DTYPES), "the initializers"
    )
    ml_nodes = [n for n in graph.node if n.domain == ML_DOMAIN]
    producers = _producers(graph)
    extra: dict[str, Any] = {
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": int(model.ir_version),
        "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "sklearn": bool(ml_nodes),
    }
    if inputs and inputs[0].shape and inputs[0].shape[0] == 1:
        extra["fixed_batch"] = 1
    signature = TeacherSignature(
        format="onnx",
        inputs=inputs,
        outputs=outputs,
        parameters=int(parameters),
        bytes=int(size),
        task=None,
        modality=_modality(inputs),
    )
    sklearn_op = None
    classifier = next((n for n in ml_nodes if n.op_type in SKLEARN_CLASSIFIERS - {"ZipMap"}), None)
    regressor = next((n for n in ml_nodes if n.op_type in SKLEARN_REGRESSORS), None)
    zipmap = next((n for n in ml_nodes if n.op_type == "ZipMap"), None)
    if classifier is not None or zipmap is not None:
        sklearn_op = (classifier or zipmap).op_type  # type: ignore[union-attr]
        labels = _class_labels(classifier or zipmap)  # type: ignore[arg-type]
        _sklearn_classifier(signature, outputs, zipmap, labels, extra)
    elif regressor is not None:
        sklearn_op = regressor.op_type
        _regressor(signature, outputs)
    else:
        _net_output(signature, outputs, producers)
    signature.architecture = _architecture(model, sklearn_op)
    signature.extra = extra
    return signature


def _sklearn_classifier(
    signature: TeacherSignature,
    outputs: list[TensorSpec],
    zipmap: onnx.NodeProto | None,
    labels: list[str] | None,
    extra: dict[str, Any],
) -> None:
    tensors = [o for o in outputs if o.dtype in _FLOAT_DTYPES and len(o.shape) == 2]
    preferred = [o for o in tensors if "prob" in o.name.lower()] or tensors
    k = len(labels) if labels else None
    if preferred:
        out = preferred[0]
        width = out.shape[1]
        k = width if isinstance(width, int) else k
    elif zipmap is not None:
        out = next(o for o in outputs if o.name == zipmap.output[0])
        out.shape = [None, k]
        # The runtime reads the tensor that feeds the ZipMap instead of the maps.
        extra["zipmap"] = {"output": zipmap.output[0], "tensor": zipmap.input[0]}
    else:
        raise TeacherIncompatible(
            "this scikit-learn classifier graph has no probability output; convert it with "
            "skl2onnx so it outputs probabilities",
            field="teacher",
        )
    if labels:
        extra["classes"] = labels
    signature.task = "classification"
    signature.output = out.name
    signature.output_kind = "probabilities"
    signature.num_classes = k
    signature.output_dim = k


def _regressor(signature: TeacherSignature, outputs: list[TensorSpec]) -> None:
    floats = [o for o in outputs if o.dtype in _FLOAT_DTYPES]
    if not floats:
        raise TeacherIncompatible("the regressor graph has no float output", field="teacher")
    out = floats[0]
    width = out.shape[1] if len(out.shape) == 2 else 1
    signature.task = "regression"
    signature.output = out.name
    signature.output_kind = "values"
    signature.output_dim = width if isinstance(width, int) else None


def _net_output(
    signature: TeacherSignature, outputs: list[TensorSpec], producers: dict[str, onnx.NodeProto]
) -> None:
    floats = [o for o in outputs if o.dtype in _FLOAT_DTYPES]
    if not floats:
        return
    named = [
        o
        for o in floats
        if any(k in o.name.lower() for k in ("logit", "prob", "output", "embed", "pred"))
    ]
    out = (named or floats)[0]
    signature.output = out.name
    shape = out.shape
    if len(shape) == 1:
        signature.task, signature.output_kind, signature.output_dim = "regression", "values", 1
        return
    trailing = shape[1:]
    known = all(isinstance(d, int) and d >= 0 for d in trailing)
    width = element_count(trailing, f"output {out.name!r}") if known else None
    signature.output_dim = width
    if len(shape) != 2:
        return
    if "embed" in out.name.lower() or "pool" in out.name.lower():
        signature.task, signature.output_kind = "embedding", "embedding"
    elif width == 1:
        signature.task, signature.output_kind = "regression", "values"
    else:
        signature.task = "classification"
        signature.num_classes = width
        softmax = _ends_in(producers, out.name, {"Softmax"})
        signature.output_kind = "probabilities" if softmax else "logits"


# --------------------------------------------------------------------------- safetensors


def safetensors_parameters(stream: IO[bytes], size: int, name: str) -> int:
    """Element count of a safetensors file, from its JSON header only."""
    raw = stream.read(8)
    if len(raw) < 8:
        raise TeacherInvalid(f"{name} is not a safetensors file (too short)", field="teacher")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
        raise TeacherInvalid(f"{name} has an invalid safetensors header length", field="teacher")
    try:
        header = json.loads(stream.read(n))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TeacherInvalid(
            f"{name} has an unreadable safetensors header: {exc}", field="teacher"
        ) from None
    if not isinstance(header, dict):
        raise TeacherInvalid(f"{name} has an invalid safetensors header", field="teacher")
    counts = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        try:
            if not isinstance(shape, list):
                raise TypeError(shape)
            counts.append(element_count(shape, f"{name}: tensor {key!r}"))
        except (TypeError, ValueError, OverflowError):
            raise TeacherInvalid(
                f"{name}: tensor {key!r} has no valid shape", field="teacher"
            ) from None
    return parameter_total(counts, name)


def _bundle_parameters(bundle: Bundle, names: list[str]) -> int:
    counts = []
    for n in names:
        with bundle.open(n) as f:
            counts.append(safetensors_parameters(f, bundle.sizes[n], n))
    return parameter_total(counts, "the weights")


def _text_inputs(names: list[str]) -> list[TensorSpec]:
    return [TensorSpec(n, ["batch", "sequence"], "int64") for n in names]


def _kind_for(task: str | None) -> Any:
    return {"classification": "logits", "regression": "values", "embedding": "embedding"}.get(
        task or ""
    )


def _safetensors_signature(bundle: Bundle, found: _Classified) -> TeacherSignature:
    assert found.config is not None and found.weights is not None
    config = bundle.json(found.config)
    try:
        input_names = [str(n) for n in config["input_names"]]
        output_dim = int(config["output_dim"])
        input_shape = [int(d) for d in config.get("input_shape", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise TeacherInvalid(
            f"{found.config} lacks input_names/output_dim/input_shape: {exc}", field="teacher"
        ) from None
    task = config.get("task") or None
    if task not in (None, "classification", "regression", "embedding"):
        raise TeacherInvalid(f"{found.config} names an unknown task {task!r}", field="teacher")
    text = "input_ids" in input_names
    inputs = (
        _text_inputs(input_names)
        if text
        else [TensorSpec(n, ["batch", *input_shape], "float32") for n in input_names]
    )
    modality = config.get("modality") or ("text" if text else _modality(inputs))
    return TeacherSignature(
        format="safetensors",
        inputs=inputs,
        outputs=[TensorSpec("output", ["batch", output_dim], "float32")],
        parameters=_bundle_parameters(bundle, [found.weights]),
        bytes=bundle.sizes[found.weights],
        task=task,
        output="output",
        output_kind=_kind_for(task),
        num_classes=output_dim if task == "classification" else None,
        output_dim=output_dim,
        architecture=str(config["architecture"]),
        modality=cast(Any, modality if modality in _MODALITIES else None),
        extra={"config": found.config, "weights": found.weights},
    )


# --------------------------------------------------------------------------- transformers


@dataclass
class _SentenceTransformer:
    """What modules.json says: the transformer's folder, its pooling and its dense layers."""

    model_dir: str = ""
    pooling: dict[str, Any] | None = None
    dense: list[dict[str, Any]] = field(default_factory=list)


def _sentence_transformer(bundle: Bundle) -> _SentenceTransformer:
    modules = bundle.json("modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise TeacherInvalid("modules.json is not a list of modules", field="teacher")
    found = _SentenceTransformer()
    for m in sorted(modules, key=lambda e: int(e.get("idx", 0))):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        raw = str(m.get("path") or "")
        folder = "" if raw in ("", ".") else str(member_path(raw))
        cfg_name = posixpath.join(folder, "config.json")
        cfg = bundle.json(cfg_name) if cfg_name in bundle.names else {}
        if kind == "Transformer":
            found.model_dir = folder
        elif kind == "Pooling":
            found.pooling = cfg
        elif kind == "Dense":
            found.dense.append({**cfg, "folder": folder})
    return found


def _embedding_dim(hidden: Any, st: _SentenceTransformer) -> int | None:
    """Width of the sentence embedding: pooled (modes concatenated), then the last dense layer."""
    dim = int(hidden) if hidden else None
    pooling = st.pooling
    if pooling is not None:
        modes = pooling.get("pooling_mode")
        count = (
            (1 if isinstance(modes, str) else len(modes))
            if modes
            else max(1, sum(bool(pooling.get(k)) for k in _ST_POOLING_KEYS))
        )
        width = pooling.get("word_embedding_dimension") or hidden
        dim = int(width) * count if width else None
    if st.dense:
        dim = int(st.dense[-1].get("out_features") or 0) or dim
    return dim


def _hf_input_names(bundle: Bundle, model_dir: str, model_type: str) -> list[str]:
    """The tokenizer's outputs: as its config declares them, else by model family."""
    tok_config = posixpath.join(model_dir, "tokenizer_config.json")
    input_names = ["input_ids", "attention_mask"]
    declared = None
    if tok_config in bundle.names:
        tok = bundle.json(tok_config)
        declared = tok.get("model_input_names") if isinstance(tok, dict) else None
    if declared:
        if "token_type_ids" in declared:
            input_names.append("token_type_ids")
    elif model_type not in _NO_TOKEN_TYPES:
        input_names.append("token_type_ids")
    return input_names


def _hf_model_config(bundle: Bundle, model_dir: str) -> dict[str, Any]:
    config_name = posixpath.join(model_dir, "config.json")
    if config_name not in bundle.names:
        raise TeacherInvalid("the transformers folder has no config.json", field="teacher")
    config = bundle.json(config_name)
    if not isinstance(config, dict) or "model_type" not in config:
        raise TeacherInvalid(f"{config_name} has no model_type", field="teacher")
    return config


def _hf_extra(config: dict[str, Any], task: Any, st: bool) -> dict[str, Any]:
    labels = config.get("id2label") or {}
    return {
        "model_type": str(config["model_type"]),
        "hidden_size": config.get("hidden_size") or config.get("dim") or config.get("d_model"),
        "num_layers": config.get("num_hidden_layers") or config.get("n_layers"),
        "vocab_size": config.get("vocab_size"),
        "sentence_transformers": st,
        "labels": (
            [str(labels[k]) for k in sorted(labels, key=lambda k: int(k))]
            if task == "classification" and isinstance(labels, dict)
            else None
        ),
    }


def _hf_signature(bundle: Bundle) -> TeacherSignature:
    is_st = "modules.json" in bundle.names
    st = _sentence_transformer(bundle) if is_st else _SentenceTransformer()
    config = _hf_model_config(bundle, st.model_dir)
    model_type = str(config["model_type"])
    architectures = [str(a) for a in config.get("architectures") or []]
    hidden = config.get("hidden_size") or config.get("dim") or config.get("d_model")
    task, num_labels = _hf_task(config, architectures, is_st)
    dim = _embedding_dim(hidden, st) if task == "embedding" else num_labels
    weights = [n for n in bundle.names if n.endswith(".safetensors")]
    output = "logits" if task != "embedding" else "embedding"
    return TeacherSignature(
        format="huggingface",
        inputs=_text_inputs(_hf_input_names(bundle, st.model_dir, model_type)),
        outputs=[TensorSpec(output, ["batch", dim], "float32")],
        parameters=_bundle_parameters(bundle, weights),
        bytes=bundle.path.stat().st_size if bundle.is_zip else sum(bundle.sizes.values()),
        task=task,
        output=output,
        output_kind=_kind_for(task),
        num_classes=dim if task == "classification" else None,
        output_dim=dim,
        architecture=(
            f"SentenceTransformer({model_type})"
            if is_st
            else (architectures[0] if architectures else model_type)
        ),
        modality="text",
        extra=_hf_extra(config, task, is_st),
    )


def _hf_task(config: dict[str, Any], architectures: list[str], st: bool) -> tuple[Any, int | None]:
    """``(task, num_labels)`` the way hf.py decides: sequence classifiers, else embeddings."""
    if st:
        return "embedding", None
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        id2label = config.get("id2label")
        num = len(id2label) if isinstance(id2label, dict) and id2label else None
        num = num or int(config.get("num_labels") or 2)
        # Multi-label logits are independent sigmoids: matched as values, as hf.py does.
        if num == 1 or config.get("problem_type") in ("regression", "multi_label_classification"):
            return "regression", num
        return "classification", num
    refuse_per_token_heads(architectures)
    return "embedding", None


def refuse_per_token_heads(architectures: list[str]) -> None:
    """Raise :class:`TeacherIncompatible` for a token-classification, QA or multiple-choice head.

    Shared with hf.py, which loads what this module inspects.
    """
    per_token = [
        a
        for a in architectures
        if a.endswith(("ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice"))
    ]
    if per_token:
        raise TeacherIncompatible(
            f"{per_token[0]} outputs one prediction per token or choice; distillation supports "
            "sequence classifiers and encoders (embeddings)",
            field="teacher",
        )
