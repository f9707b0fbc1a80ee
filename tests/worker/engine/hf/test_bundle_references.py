"""Every file a transformers bundle's index or configs name stays inside the bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from tests.worker.engine.factories import zip_folder
from tests.worker.engine.hf.factories import copy_classifier, load_on_cpu
from worker.engine.errors import ArchiveUnsafe, TeacherInvalid

SHARD = "model-00001-of-00001.safetensors"


def sharded(models: dict[str, Any], name: str, entry: str | None = None) -> Path:
    """The classifier with its weights under an index naming ``entry`` (default: the shard)."""
    folder = copy_classifier(models, name)
    weights = folder / "model.safetensors"
    keys = list(load_file(str(weights)))
    weights.rename(folder / SHARD)
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, entry or SHARD)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_an_index_inside_the_bundle_loads(models: dict[str, Any], tmp_path: Path) -> None:
    folder = sharded(models, "inside")
    runtime = load_on_cpu(zip_folder(folder, tmp_path / "t.zip"), tmp_path / "work")
    assert runtime.signature.num_classes == 3


@pytest.mark.parametrize("where", ["absolute", "absolute_missing", "parent"])
def test_an_index_naming_a_file_outside_is_refused_alike(
    models: dict[str, Any], tmp_path: Path, where: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    # Weights the worker can read, outside the bundle: the index must not reach them.
    shutil.copy(models["classifier_dir"] / "model.safetensors", outside / "w.safetensors")
    entry = {
        "absolute": str(outside / "w.safetensors"),
        "absolute_missing": str(outside / "nothing.safetensors"),
        "parent": "../outside/w.safetensors",
    }[where]
    folder = sharded(models, f"escape-{where}", entry)
    with pytest.raises(ArchiveUnsafe) as error:
        load_on_cpu(zip_folder(folder, tmp_path / "t.zip"), tmp_path / "work")
    assert error.value.message == (
        f"model.safetensors.index.json names {entry!r}, "
        + ("not a path inside the bundle" if where != "parent" else "outside the bundle")
    )


def test_a_tokenizer_config_naming_an_outside_file_is_refused(
    models: dict[str, Any], tmp_path: Path
) -> None:
    folder = copy_classifier(models, "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["vocab_file"] = "/etc/passwd"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ArchiveUnsafe, match=r"tokenizer_config\.json \(vocab_file\)"):
        load_on_cpu(zip_folder(folder, tmp_path / "t.zip"), tmp_path / "work")


def test_an_index_naming_a_missing_member_is_invalid(
    models: dict[str, Any], tmp_path: Path
) -> None:
    folder = sharded(models, "missing", "model-00002-of-00002.safetensors")
    with pytest.raises(TeacherInvalid, match="which the bundle lacks"):
        load_on_cpu(zip_folder(folder, tmp_path / "t.zip"), tmp_path / "work")
