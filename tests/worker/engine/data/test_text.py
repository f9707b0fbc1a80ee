"""The JSONL reader and tokenize."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.worker.engine.data.assertions import raises
from tests.worker.engine.data.factories import NAMES, write_jsonl
from worker.engine.data import TransferSet, load_transfer_set, sniff_dataset, tokenize
from worker.engine.errors import DatasetInvalid


def test_jsonl_string_int_and_no_labels(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    _, y = digit_arrays
    rows = [{"text": f"digit {NAMES[c]} number {i}", "label": NAMES[c]} for i, c in enumerate(y)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert sniff_dataset(path) == "jsonl"
    transfer_set = load_transfer_set(path)
    assert (
        transfer_set.modality == "text"
        and transfer_set.arrays == {}
        and len(transfer_set) == len(y)
    )
    assert transfer_set.texts is not None
    assert transfer_set.texts[0] == rows[0]["text"] and transfer_set.class_names == sorted(NAMES)
    np.testing.assert_array_equal(
        np.array(transfer_set.class_names)[transfer_set.labels], np.array(NAMES)[y]
    )
    transfer_set = load_transfer_set(
        write_jsonl(
            tmp_path / "i.jsonl", [{"text": "a", "label": 2}, "", {"text": "b", "label": 0}]
        )
    )
    np.testing.assert_array_equal(transfer_set.labels, [2, 0])
    assert transfer_set.class_names is None and transfer_set.texts == ["a", "b"]
    transfer_set = load_transfer_set(
        write_jsonl(tmp_path / "u.jsonl", [{"text": "a"}, {"text": "b"}])
    )
    assert transfer_set.labels is None and transfer_set.texts == ["a", "b"]


def test_jsonl_bad_line_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "c",'])
    with raises(DatasetInvalid, "line 3", "not valid JSON"):
        load_transfer_set(path)


def test_jsonl_missing_text_and_inconsistent_labels(tmp_path: Path) -> None:
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


def test_tokenize_with_a_tiny_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    # transformers 5 resolves this alias lazily; its __init__ does not declare it for type checkers.
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast  # type: ignore[attr-defined]

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
    transfer_set = load_transfer_set(path)
    out = tokenize(transfer_set, word_level, max_length=4, batch_size=1)
    assert set(out.arrays) == {"input_ids", "attention_mask"} and len(out) == 2
    np.testing.assert_array_equal(out.arrays["input_ids"], [[5, 6, 0, 0], [5, 6, 7, 8]])
    np.testing.assert_array_equal(out.arrays["attention_mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])
    assert out.arrays["input_ids"].dtype == np.int64 and out.feature_shape == (4,)
    assert transfer_set.arrays == {}  # the input set is left as it was

    bert = BertTokenizerFast(vocab=vocab)
    out = tokenize(transfer_set, bert, max_length=6)
    assert set(out.arrays) == {"input_ids", "attention_mask", "token_type_ids"}
    np.testing.assert_array_equal(out.arrays["input_ids"][0], [2, 5, 6, 3, 0, 0])
    assert all(a.dtype == np.int64 and a.shape == (2, 6) for a in out.arrays.values())
    numeric = TransferSet(
        arrays={"inputs": np.zeros((2, 2), np.float32)}, labels=None, modality="tabular"
    )
    with raises(DatasetInvalid, "text dataset"):
        tokenize(numeric, bert, max_length=6)
