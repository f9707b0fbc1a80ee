"""Transfer-set readers, split and tokenize, on digits written in every supported format."""

from __future__ import annotations

import io
import json
import pickle
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.worker.engine.factories import digits, write_image_folders_zip, write_npz
from worker.engine.data import (
    DATASET_READERS,
    DataLimits,
    TransferSet,
    inspect_dataset,
    load_transfer_set,
    sniff_dataset,
    split,
    tokenize,
)
from worker.engine.errors import ArchiveUnsafe, DatasetInvalid, UnsupportedFormat
from worker.engine.spec import DataSpec

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def xy() -> tuple[np.ndarray, np.ndarray]:
    return digits()


def write_csv(path: Path, x: np.ndarray, labels=None, sep: str = ",", label_name="label") -> Path:
    header = [f"f{j}" for j in range(x.shape[1])] + ([label_name] if labels is not None else [])
    lines = [sep.join(header)]
    for i, row in enumerate(x):
        cells = [repr(float(v)) for v in row]
        if labels is not None:
            cells.append(str(labels[i]))
        lines.append(sep.join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def raises(exc_type, *needles: str, field: str | None = None):
    """Context checking the error class and that its message (or field) names the problem."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc_type)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            for needle in needles:
                assert needle in message, f"{needle!r} not in {message!r}"
            if field is not None:
                assert self.info.value.field == field
            return handled

    return _Check()


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("with_labels", [True, False])
def test_npz_round_trip(tmp_path, xy, with_labels):
    x, y = xy
    path = write_npz(tmp_path / "d.bin", x, y if with_labels else None)
    assert sniff_dataset(path) == "npz"
    ts = load_transfer_set(path)
    assert ts.modality == "tabular"
    assert ts.arrays["inputs"].dtype == np.float32
    np.testing.assert_array_equal(ts.arrays["inputs"], x)
    assert len(ts) == len(x)
    if with_labels:
        assert ts.labels is not None and ts.labels.dtype == np.int64
        np.testing.assert_array_equal(ts.labels, y)
        assert ts.label_kind == "class" and ts.num_classes == 10
    else:
        assert ts.labels is None and ts.label_kind is None
    assert len(ts.digest) == 64


def test_npz_images_and_sequences(tmp_path, xy):
    x, y = xy
    nchw = x.reshape(-1, 1, 8, 8)
    ts = load_transfer_set(write_npz(tmp_path / "a.npz", nchw.astype(np.float64), y))
    assert ts.modality == "image" and ts.arrays["inputs"].dtype == np.float32
    np.testing.assert_array_equal(ts.arrays["inputs"], nchw)
    # Channels-last images are recognised by their trailing 1/3/4 axis and made NCHW.
    ts = load_transfer_set(write_npz(tmp_path / "b.npz", nchw.transpose(0, 2, 3, 1), y))
    assert ts.arrays["inputs"].shape == (len(x), 1, 8, 8)
    np.testing.assert_array_equal(ts.arrays["inputs"], nchw)
    assert ts.arrays["inputs"].flags["C_CONTIGUOUS"]
    # Rank 3 is a sequence (N, T, F).
    ts = load_transfer_set(write_npz(tmp_path / "c.npz", x.reshape(-1, 8, 8)))
    assert ts.modality == "sequence" and ts.feature_shape == (8, 8)


def test_npz_float_labels_are_targets_and_class_names_kept(tmp_path, xy):
    x, y = xy
    ts = load_transfer_set(write_npz(tmp_path / "r.npz", x, y.astype(np.float64) / 2))
    assert ts.label_kind == "value" and ts.labels.dtype == np.float32 and ts.num_classes is None
    path = tmp_path / "n.npz"
    np.savez(path, inputs=x, labels=y, class_names=np.array(NAMES))
    assert load_transfer_set(path).class_names == NAMES


@pytest.mark.parametrize("with_labels", [True, False])
def test_safetensors_round_trip(tmp_path, xy, with_labels):
    from safetensors.numpy import save_file

    x, y = xy
    path = tmp_path / "d.data"
    save_file({"inputs": x, **({"labels": y} if with_labels else {})}, str(path))
    assert sniff_dataset(path) == "safetensors"
    ts = load_transfer_set(path)
    np.testing.assert_array_equal(ts.arrays["inputs"], x)
    if with_labels:
        np.testing.assert_array_equal(ts.labels, y)
    else:
        assert ts.labels is None


def test_csv_with_header_and_label_column(tmp_path, xy):
    x, y = xy
    path = write_csv(tmp_path / "d.csv", x, y)
    assert sniff_dataset(path) == "csv"
    ts = load_transfer_set(path)
    assert ts.modality == "tabular" and ts.arrays["inputs"].shape == x.shape
    np.testing.assert_allclose(ts.arrays["inputs"], x)
    np.testing.assert_array_equal(ts.labels, y)
    assert ts.class_names is None


def test_csv_string_labels_and_semicolons(tmp_path, xy):
    x, y = xy
    names = np.array(NAMES)[y]
    ts = load_transfer_set(write_csv(tmp_path / "d.txt", x, names, sep=";"))
    assert ts.class_names == sorted(NAMES)
    np.testing.assert_array_equal(np.array(ts.class_names)[ts.labels], names)
    np.testing.assert_allclose(ts.arrays["inputs"], x)


def test_csv_without_labels_float_targets_and_chosen_columns(tmp_path, xy):
    x, y = xy
    ts = load_transfer_set(write_csv(tmp_path / "a.csv", x[:50]))
    assert ts.labels is None and ts.arrays["inputs"].shape == (50, 64)
    ts = load_transfer_set(write_csv(tmp_path / "b.csv", x[:50], y[:50] + 0.5, sep="\t"))
    assert ts.label_kind == "value" and ts.labels.dtype == np.float32
    spec = DataSpec(feature_columns=["f3", "f1"], label_column="target")
    ts = load_transfer_set(write_csv(tmp_path / "c.csv", x[:50], y[:50], label_name="target"), spec)
    np.testing.assert_allclose(ts.arrays["inputs"], x[:50, [3, 1]])
    np.testing.assert_array_equal(ts.labels, y[:50])


@pytest.mark.parametrize("with_labels", [True, False])
def test_parquet_round_trip(tmp_path, xy, with_labels):
    import pyarrow as pa

    x, y = xy
    columns = {f"f{j}": x[:, j] for j in range(x.shape[1])}
    if with_labels:
        # Categorical (dictionary-encoded) strings, as pandas writes them.
        columns["label"] = pa.array(np.array(NAMES)[y]).dictionary_encode()
    path = write_parquet(tmp_path / "d.bin", columns)
    assert sniff_dataset(path) == "parquet"
    ts = load_transfer_set(path)
    np.testing.assert_array_equal(ts.arrays["inputs"], x)
    if with_labels:
        assert ts.class_names == sorted(NAMES)
        np.testing.assert_array_equal(np.array(ts.class_names)[ts.labels], np.array(NAMES)[y])
    else:
        assert ts.labels is None


def test_jsonl_string_int_and_no_labels(tmp_path, xy):
    _, y = xy
    rows = [{"text": f"digit {NAMES[c]} number {i}", "label": NAMES[c]} for i, c in enumerate(y)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert sniff_dataset(path) == "jsonl"
    ts = load_transfer_set(path)
    assert ts.modality == "text" and ts.arrays == {} and len(ts) == len(y)
    assert ts.texts[0] == rows[0]["text"] and ts.class_names == sorted(NAMES)
    np.testing.assert_array_equal(np.array(ts.class_names)[ts.labels], np.array(NAMES)[y])
    ts = load_transfer_set(
        write_jsonl(
            tmp_path / "i.jsonl", [{"text": "a", "label": 2}, "", {"text": "b", "label": 0}]
        )
    )
    np.testing.assert_array_equal(ts.labels, [2, 0])
    assert ts.class_names is None and ts.texts == ["a", "b"]
    ts = load_transfer_set(write_jsonl(tmp_path / "u.jsonl", [{"text": "a"}, {"text": "b"}]))
    assert ts.labels is None and ts.texts == ["a", "b"]


@pytest.mark.parametrize("top", [None, "digits"])
def test_image_folders_round_trip(tmp_path, xy, top):
    x, y = xy
    keep = np.flatnonzero(y < 3)[:120]
    images, labels = x[keep].reshape(-1, 8, 8), y[keep]
    path = write_image_folders_zip(tmp_path / "d.zip", images, labels, NAMES[:3], top=top)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("README.txt", "not an image")  # skipped
        zf.writestr("__MACOSX/._x.png", "junk")
    assert sniff_dataset(path) == "image_folders"
    ts = load_transfer_set(path)
    assert ts.modality == "image" and ts.arrays["inputs"].shape == (len(keep), 1, 8, 8)
    assert ts.class_names == sorted(NAMES[:3])
    # Members are read in path order: grouped by class folder, then by file name.
    expected = sorted(range(len(keep)), key=lambda i: (NAMES[labels[i]], i))
    np.testing.assert_array_equal(
        np.array(ts.class_names)[ts.labels], np.array(NAMES)[labels[expected]]
    )
    np.testing.assert_allclose(ts.arrays["inputs"][:, 0], images[expected], atol=1 / 255)


def test_image_folders_rgb_resize_and_unlabelled(tmp_path, xy):
    x, y = xy
    rgb = np.stack([x[:20].reshape(-1, 8, 8)] * 3, axis=-1)
    path = write_image_folders_zip(tmp_path / "c.zip", rgb, y[:20] % 2, ["even", "odd"], fmt="JPEG")
    ts = load_transfer_set(path, DataSpec(image_size=16))
    assert ts.arrays["inputs"].shape == (20, 3, 16, 16)
    assert ts.arrays["inputs"].min() >= 0.0 and ts.arrays["inputs"].max() <= 1.0
    assert ts.class_names == ["even", "odd"]
    # Images at the top level, or all in one wrapping folder, make an unlabelled set.
    for top in (None, "images"):
        path = write_image_folders_zip(tmp_path / "u.zip", x[:10].reshape(-1, 8, 8), None, top=top)
        ts = load_transfer_set(path)
        assert ts.labels is None and ts.arrays["inputs"].shape == (10, 1, 8, 8)


def test_partial_labels_mark_rows_without_a_label(tmp_path, xy):
    import pyarrow as pa

    x, y = xy
    partial = y.copy()
    partial[::2] = -1
    ts = load_transfer_set(write_npz(tmp_path / "a.npz", x, partial))
    assert ts.labelled_rows == len(y) // 2 and ts.num_classes == 10
    targets = y.astype(np.float32)
    targets[:3] = np.nan
    ts = load_transfer_set(write_npz(tmp_path / "b.npz", x, targets))
    assert ts.label_kind == "value" and ts.labelled_rows == len(y) - 3
    targets[5] = np.inf
    with raises(DatasetInvalid, "'labels'", "infinite", "row 5"):
        load_transfer_set(write_npz(tmp_path / "c.npz", x, targets))
    path = write_parquet(
        tmp_path / "d.parquet",
        {"a": [1.0, 2.0, 3.0], "label": pa.array(["cat", None, "dog"])},
    )
    ts = load_transfer_set(path)
    np.testing.assert_array_equal(ts.labels, [0, -1, 1])
    assert ts.class_names == ["cat", "dog"] and inspect_dataset(path)["labelled_rows"] == 2
    path = tmp_path / "e.csv"
    path.write_text("a,label\n1,0.5\n2,\n")
    ts = load_transfer_set(path)
    assert ts.labels[0] == 0.5 and np.isnan(ts.labels[1])
    path.write_text("a,label\n1,\n2,\n")
    assert load_transfer_set(path).labels is None
    rows = [{"text": "a", "label": "pos"}, {"text": "b"}, {"text": "c", "label": None}]
    ts = load_transfer_set(write_jsonl(tmp_path / "f.jsonl", rows))
    np.testing.assert_array_equal(ts.labels, [0, -1, -1])
    ts = load_transfer_set(
        write_jsonl(tmp_path / "g.jsonl", [{"text": "a"}, {"text": "b", "label": 2}])
    )
    np.testing.assert_array_equal(ts.labels, [-1, 2])


def test_every_reader_is_registered():
    assert set(DATASET_READERS.names()) == {
        "npz",
        "safetensors",
        "csv",
        "parquet",
        "jsonl",
        "image_folders",
    }


def test_inspect_dataset(tmp_path, xy):
    x, y = xy
    path = write_npz(tmp_path / "d.npz", x.reshape(-1, 1, 8, 8), y)
    info = inspect_dataset(path)
    assert info == {
        "format": "npz",
        "rows": len(x),
        "modality": "image",
        "feature_shape": [1, 8, 8],
        "has_labels": True,
        "labelled_rows": len(x),
        "label_kind": "class",
        "num_classes": 10,
        "class_names": None,
        "bytes": path.stat().st_size,
    }
    info = inspect_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1.5}]))
    assert info["modality"] == "text" and info["feature_shape"] is None
    assert info["label_kind"] == "value" and info["num_classes"] is None


def test_digest_follows_content_and_options(tmp_path, xy):
    x, y = xy
    a = load_transfer_set(write_csv(tmp_path / "a.csv", x[:30], y[:30]))
    b = load_transfer_set(write_csv(tmp_path / "b.csv", x[:30], y[:30]))
    c = load_transfer_set(tmp_path / "a.csv", DataSpec(feature_columns=["f1"]))
    assert a.digest == b.digest != c.digest
    train, val = split(a, 0.2, seed=0)
    assert len({a.digest, train.digest, val.digest}) == 3


# --- split --------------------------------------------------------------------------------


def test_split_is_deterministic_stratified_disjoint_and_covering(xy):
    x, y = xy
    ts = TransferSet(arrays={"inputs": x, "row": np.arange(len(x))}, labels=y, modality="tabular")
    train, val = split(ts, 0.2, seed=7)
    assert len(val) == round(len(x) * 0.2) and len(train) + len(val) == len(x)
    rows_t, rows_v = train.arrays["row"], val.arrays["row"]
    assert not set(rows_t) & set(rows_v)
    np.testing.assert_array_equal(np.sort(np.concatenate([rows_t, rows_v])), np.arange(len(x)))
    np.testing.assert_array_equal(val.labels, y[rows_v])
    # Each class gives its share of the validation set, within one row.
    for c in range(10):
        share = (y == c).sum() * len(val) / len(x)
        assert abs((val.labels == c).sum() - share) < 1
    again_t, again_v = split(ts, 0.2, seed=7)
    np.testing.assert_array_equal(again_v.arrays["row"], rows_v)
    np.testing.assert_array_equal(again_t.arrays["row"], rows_t)
    _, other = split(ts, 0.2, seed=8)
    assert not np.array_equal(other.arrays["row"], rows_v)


def test_split_unlabelled_texts_and_tiny_sets():
    ts = TransferSet(arrays={}, labels=None, modality="text", texts=[f"t{i}" for i in range(10)])
    train, val = split(ts, 0.1, seed=0)
    assert len(val) == 1 and len(train) == 9 and set(train.texts) | set(val.texts) == set(ts.texts)
    # A class with one row cannot be stratified; the split falls back to a plain shuffle.
    ts = TransferSet(
        arrays={"inputs": np.zeros((3, 2), np.float32)},
        labels=np.array([0, 1, 1]),
        modality="tabular",
    )
    train, val = split(ts, 0.5, seed=0)
    assert len(train) == 1 and len(val) == 2
    one = TransferSet(
        arrays={"inputs": np.zeros((1, 2), np.float32)}, labels=None, modality="tabular"
    )
    with raises(DatasetInvalid, "at least 2"):
        split(one, 0.1, seed=0)


# --- tokenize -----------------------------------------------------------------------------


def test_tokenize_with_a_tiny_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"]
    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]"
    )
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"text": "the cat"}, {"text": "the cat sat on the mat dog"}]
    )
    ts = load_transfer_set(path)
    out = tokenize(ts, word_level, max_length=4, batch_size=1)
    assert set(out.arrays) == {"input_ids", "attention_mask"} and len(out) == 2
    np.testing.assert_array_equal(out.arrays["input_ids"], [[5, 6, 0, 0], [5, 6, 7, 8]])
    np.testing.assert_array_equal(out.arrays["attention_mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])
    assert out.arrays["input_ids"].dtype == np.int64 and out.feature_shape == (4,)
    assert ts.arrays == {}  # the input set is left as it was

    bert = BertTokenizerFast(vocab=vocab)
    out = tokenize(ts, bert, max_length=6)
    assert set(out.arrays) == {"input_ids", "attention_mask", "token_type_ids"}
    np.testing.assert_array_equal(out.arrays["input_ids"][0], [2, 5, 6, 3, 0, 0])
    assert all(a.dtype == np.int64 and a.shape == (2, 6) for a in out.arrays.values())
    numeric = TransferSet(
        arrays={"inputs": np.zeros((2, 2), np.float32)}, labels=None, modality="tabular"
    )
    with raises(DatasetInvalid, "text dataset"):
        tokenize(numeric, bert, max_length=6)


# --- malformed input ----------------------------------------------------------------------


def test_npz_without_inputs(tmp_path, xy):
    path = tmp_path / "d.npz"
    np.savez(path, features=xy[0])
    with raises(DatasetInvalid, "'inputs'", "features", field="dataset"):
        load_transfer_set(path)


def test_npz_labels_length_mismatch(tmp_path, xy):
    x, y = xy
    with raises(DatasetInvalid, "'labels'", str(len(y) - 1), str(len(x))):
        load_transfer_set(write_npz(tmp_path / "d.npz", x, y[:-1]))


def test_npz_object_array_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with raises(DatasetInvalid, "'inputs'", "object array", "unpickling"):
        load_transfer_set(path)


def test_npz_non_numeric_and_non_finite(tmp_path, xy):
    x, y = xy
    with raises(DatasetInvalid, "'inputs'", "numeric"):
        load_transfer_set(write_npz(tmp_path / "s.npz", np.array([["a", "b"]])))
    bad = x.copy()
    bad[5, 3] = np.nan
    with raises(DatasetInvalid, "'inputs'", "NaN", "row 5"):
        load_transfer_set(write_npz(tmp_path / "n.npz", bad))
    with raises(DatasetInvalid, "'labels'", "negative class id -2"):
        load_transfer_set(write_npz(tmp_path / "l.npz", x, y - 2))
    with raises(DatasetInvalid, "no rows"):
        load_transfer_set(write_npz(tmp_path / "e.npz", np.zeros((0, 4), np.float32)))


def test_safetensors_without_inputs(tmp_path, xy):
    from safetensors.numpy import save_file

    path = tmp_path / "d.safetensors"
    save_file({"x": xy[0]}, str(path))
    with raises(DatasetInvalid, "'inputs'", "x"):
        load_transfer_set(path)


def test_csv_text_feature_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,name,label\n1.0,alice,0\n2.0,bob,1\n")
    with raises(DatasetInvalid, "'name'", "not numeric"):
        load_transfer_set(path)
    # Leaving it out by listing the feature columns works.
    ts = load_transfer_set(path, DataSpec(feature_columns=["a"]))
    np.testing.assert_array_equal(ts.arrays["inputs"], [[1.0], [2.0]])


def test_csv_missing_value_names_column_and_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n1,2,0\n3,4,1\n5,,0\n")
    with raises(DatasetInvalid, "'b'", "missing", "row 3"):
        load_transfer_set(path)
    # A missing label is a row without a label, not an error.
    path.write_text("a,b,label\n1,2,0\n3,4,\n")
    np.testing.assert_array_equal(load_transfer_set(path).labels, [0, -1])


def test_unknown_columns_name_the_spec_field(tmp_path, xy):
    path = write_csv(tmp_path / "d.csv", xy[0][:10], xy[1][:10])
    with raises(DatasetInvalid, "'nope'", field="data.feature_columns"):
        load_transfer_set(path, DataSpec(feature_columns=["f0", "nope"]))
    with raises(DatasetInvalid, "'target'", field="data.label_column"):
        load_transfer_set(path, DataSpec(label_column="target"))
    with raises(DatasetInvalid, "'label'", field="data.feature_columns"):
        load_transfer_set(path, DataSpec(feature_columns=["f0", "label"]))
    parquet = write_parquet(tmp_path / "d.parquet", {"a": [1.0, 2.0]})
    with raises(DatasetInvalid, "'b'", field="data.feature_columns"):
        load_transfer_set(parquet, DataSpec(feature_columns=["b"]))


def test_csv_without_header_or_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("1,2,3\n4,5,6\n")
    with raises(DatasetInvalid, "header"):
        load_transfer_set(path)
    path.write_text("a,b,label\n")
    with raises(DatasetInvalid, "no rows"):
        load_transfer_set(path)


def test_jsonl_bad_line_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "c",'])
    with raises(DatasetInvalid, "line 3", "not valid JSON"):
        load_transfer_set(path)


def test_jsonl_missing_text_and_inconsistent_labels(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"body": "b"}])
    with raises(DatasetInvalid, "line 2", '"text"'):
        load_transfer_set(path)
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": [1]}, {"text": "b"}])
    with raises(DatasetInvalid, "line 1", '"label"'):
        load_transfer_set(path)
    path = write_jsonl(
        tmp_path / "f.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "x"}]
    )
    with raises(DatasetInvalid, "mixes"):
        load_transfer_set(path)
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": 3}])
    with raises(DatasetInvalid, "line 1", "string"):
        load_transfer_set(path)


@pytest.mark.parametrize("content", [b"", b"  \n\n"])
def test_empty_files(tmp_path, content):
    path = tmp_path / "d"
    path.write_bytes(content)
    with raises(DatasetInvalid, "empty" if not content else "whitespace"):
        load_transfer_set(path)
    empty_zip = tmp_path / "e.zip"
    zipfile.ZipFile(empty_zip, "w").close()
    with raises(DatasetInvalid, "no files"):
        load_transfer_set(empty_zip)


def test_zip_with_escaping_member_is_unsafe(tmp_path, xy):
    path = write_image_folders_zip(
        tmp_path / "d.zip", xy[0][:4].reshape(-1, 8, 8), np.array([0, 0, 1, 1])
    )
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("../evil.png", b"x")
    with raises(ArchiveUnsafe, "../evil.png"):
        load_transfer_set(path)


def test_zip_with_symlink_member_is_unsafe(tmp_path, xy):
    path = write_image_folders_zip(
        tmp_path / "d.zip", xy[0][:4].reshape(-1, 8, 8), np.array([0, 0, 1, 1])
    )
    link = zipfile.ZipInfo("0/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    with raises(ArchiveUnsafe, "symbolic link"):
        load_transfer_set(path)


def test_zip_without_images_or_with_loose_and_huge_images(tmp_path, xy):
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("cats/readme.txt", "no images here")
    with raises(DatasetInvalid, "no PNG or JPEG"):
        load_transfer_set(path)
    path = write_image_folders_zip(
        tmp_path / "m.zip", xy[0][:4].reshape(-1, 8, 8), np.array([0, 0, 1, 1])
    )
    with zipfile.ZipFile(path, "a") as zf, zipfile.ZipFile(path) as src:
        zf.writestr("loose.png", src.read(src.namelist()[0]))
    with raises(DatasetInvalid, "'loose.png'", "outside the class folders"):
        load_transfer_set(path)
    small = tmp_path / "s.zip"
    write_image_folders_zip(small, xy[0][:4].reshape(-1, 8, 8), np.array([0, 0, 1, 1]))
    with raises(DatasetInvalid, "pixels"):
        load_transfer_set(small, limits=DataLimits(max_image_pixels=63))


def test_pickle_and_random_bytes_are_refused(tmp_path, xy):
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps({"inputs": xy[0][:5]}))
    with raises(UnsupportedFormat, "pickle", "refused"):
        load_transfer_set(path)
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with raises(UnsupportedFormat, "unrecognised dataset format", "expected one of"):
        load_transfer_set(path)
    buf = io.BytesIO()
    np.save(buf, xy[0])
    path.write_bytes(buf.getvalue())
    with raises(DatasetInvalid, ".npy", "numpy.savez"):
        load_transfer_set(path)


def test_caps_are_enforced(tmp_path, xy):
    x, y = xy
    with raises(DatasetInvalid, "rows", "limit"):
        load_transfer_set(write_npz(tmp_path / "d.npz", x, y), limits=DataLimits(max_rows=100))
    with raises(DatasetInvalid, "values per row"):
        load_transfer_set(tmp_path / "d.npz", limits=DataLimits(max_features=10))
    with raises(DatasetInvalid, "line 2", "longer than"):
        load_transfer_set(
            write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b" * 200}]),
            limits=DataLimits(max_line_bytes=100),
        )


# --- no torch -----------------------------------------------------------------------------


def test_data_and_inspect_do_not_import_torch(tmp_path, xy):
    x, y = xy
    paths = [
        write_npz(tmp_path / "a.npz", x[:20], y[:20]),
        write_csv(tmp_path / "b.csv", x[:20], y[:20]),
        write_parquet(tmp_path / "c.parquet", {"a": [1.0, 2.0], "label": ["x", "y"]}),
        write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}]),
        write_image_folders_zip(
            tmp_path / "e.zip", x[:4].reshape(-1, 8, 8), np.array([0, 0, 1, 1])
        ),
    ]
    code = (
        "import sys\n"
        "from worker.engine.data import inspect_dataset\n"
        f"for p in {[str(p) for p in paths]!r}:\n"
        "    inspect_dataset(p)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_image_folders_mixed_depths_and_corrupt_images(tmp_path):
    from PIL import Image

    def png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    wide = np.full((4, 4), 65535 // 2, dtype=np.uint16)  # 16-bit gray: scaled, not clipped
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("gray/a.png", png(wide))
        zf.writestr("red/b.png", png(rgb))
    ts = load_transfer_set(path)
    x = ts.arrays["inputs"]
    assert x.shape == (2, 3, 4, 4) and ts.class_names == ["gray", "red"]
    np.testing.assert_allclose(x[0], 0.5, atol=1e-3)
    np.testing.assert_allclose(x[1, 0], 1.0)
    np.testing.assert_allclose(x[1, 1:], 0.0)

    broken = png(np.arange(4096, dtype=np.uint8).reshape(64, 64))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/ok.png", png(rgb))
        zf.writestr("b/cut.png", broken[: len(broken) // 2])
    with raises(DatasetInvalid, "'b/cut.png'", "cannot be decoded"):
        load_transfer_set(path)
