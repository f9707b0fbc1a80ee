"""Small real teachers and transfer sets, built in the tests (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
    from torch import nn
    from transformers import BertConfig, PreTrainedTokenizerBase


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: 1797 samples, 64 float32 features in [0, 1], 10 classes."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def train_mlp_teacher(
    x: np.ndarray,
    y: np.ndarray,
    hidden: tuple[int, ...] = (256, 256),
    epochs: int = 60,
    seed: int = 0,
) -> nn.Sequential:
    """A torch MLP classifier trained on (x, y); returns the module in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = x.shape[1]
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, int(y.max()) + 1))
    return _fit(nn.Sequential(*layers), x, y, epochs, seed)


def _fit(
    model: nn.Sequential, x: np.ndarray, y: np.ndarray, epochs: int, seed: int
) -> nn.Sequential:
    """Adam (lr 1e-3) on cross-entropy, shuffled minibatches of 64; returns ``model.eval()``."""
    import torch
    from torch import nn

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class SmallCNN:
    """Factory for a small CNN classifier on (N, 1, 8, 8) digit images."""

    @staticmethod
    def train(x_img: np.ndarray, y: np.ndarray, epochs: int = 30, seed: int = 0) -> nn.Sequential:
        import torch
        from torch import nn

        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
        return _fit(model, x_img, y, epochs, seed)


def export_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
) -> Path:
    """Export with PyTorch's current (dynamo) exporter, dynamic batch axis on every input.

    The exporter writes weights to an external ``<name>.data`` file beside the graph.
    """
    import torch

    input_names = input_names or ["input"]
    output_names = output_names or ["logits"]
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} for _ in example)
    path = Path(path)
    torch.onnx.export(
        module.eval(),
        example,
        str(path),
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic,
    )
    return path


def export_onnx_legacy(
    module: nn.Module, example: tuple[torch.Tensor, ...], path: str | Path, opset: int = 17
) -> Path:
    """Export with the TorchScript-based exporter (weights inside the graph file)."""
    import torch

    path = Path(path)
    torch.onnx.export(
        module.eval(),
        example,
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )
    return path


def sklearn_forest_onnx(
    x: np.ndarray, y: np.ndarray, path: str | Path, zipmap: bool = False, n_estimators: int = 100
) -> tuple[Path, RandomForestClassifier]:
    """A RandomForestClassifier on (x, y), converted with skl2onnx; returns (path, model)."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=n_estimators, random_state=0, n_jobs=1).fit(x, y)
    options = {id(model): {"zipmap": zipmap}}
    onx = to_onnx(model, x[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    path = Path(path)
    path.write_bytes(onx.SerializeToString())
    return path, model


def sklearn_regressor_onnx(
    x: np.ndarray, y: np.ndarray, path: str | Path
) -> tuple[Path, GradientBoostingRegressor]:
    """A GradientBoostingRegressor on (x, y), converted with skl2onnx."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingRegressor

    model = GradientBoostingRegressor(random_state=0, n_estimators=50).fit(x, y)
    onx = to_onnx(model, x[:1].astype(np.float32), target_opset={"": 17, "ai.onnx.ml": 3})
    path = Path(path)
    path.write_bytes(onx.SerializeToString())
    return path, model


def write_npz(path: str | Path, inputs: np.ndarray, labels: np.ndarray | None = None) -> Path:
    path = Path(path)
    arrays = {"inputs": inputs}
    if labels is not None:
        arrays["labels"] = labels
    with open(path, "wb") as f:
        # numpy's stub lets **arrays reach savez's allow_pickle: bool; the keys are array names.
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return path


def write_image_folders_zip(
    path: str | Path,
    images: np.ndarray,
    labels: np.ndarray | None,
    class_names: list[str] | None = None,
    top: str | None = None,
    fmt: str = "PNG",
) -> Path:
    """A zip of images (float (N, H, W) or (N, H, W, 3) in [0, 1]), one folder per class.

    Without ``labels`` the images lie at the top level (an unlabelled set).
    """
    import io
    import zipfile

    from PIL import Image

    path = Path(path)
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    with zipfile.ZipFile(path, "w") as zf:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(buf, format=fmt)
            name = f"{i:05d}.{ext}"
            if labels is not None:
                folder = class_names[labels[i]] if class_names else str(labels[i])
                name = f"{folder}/{name}"
            zf.writestr(f"{top}/{name}" if top else name, buf.getvalue())
    return path


class TeacherZoo:
    """Real ONNX teachers on digits, built once per test process (see :func:`teacher_zoo`)."""

    def __init__(self, folder: Path) -> None:
        import torch

        self.folder = folder
        self.x, self.y = digits()
        self.images = self.x.reshape(-1, 1, 8, 8)
        example = (torch.from_numpy(self.x[:2]),)
        self.mlp = _full_batch_mlp(self.x, self.y, hidden=64, steps=150)
        self.mlp_dynamo = export_onnx(self.mlp, example, folder / "mlp_dynamo.onnx")
        self.mlp_legacy = export_onnx_legacy(self.mlp, example, folder / "mlp_legacy.onnx")
        self.cnn = SmallCNN.train(self.images, self.y, epochs=1)
        self.cnn_dynamo = export_onnx(
            self.cnn, (torch.from_numpy(self.images[:2]),), folder / "cnn_dynamo.onnx"
        )
        self.forest_zipmap, self.forest = sklearn_forest_onnx(
            self.x, self.y, folder / "forest_zipmap.onnx", zipmap=True, n_estimators=10
        )
        self.forest_plain, _ = sklearn_forest_onnx(
            self.x, self.y, folder / "forest_plain.onnx", zipmap=False, n_estimators=10
        )
        self.targets = (self.x[:, 20] + 2 * self.x[:, 43]).astype(np.float32)
        self.regressor_path, self.regressor = sklearn_regressor_onnx(
            self.x, self.targets, folder / "gbr.onnx"
        )


def _full_batch_mlp(
    x: np.ndarray, y: np.ndarray, hidden: int, steps: int, seed: int = 0
) -> nn.Sequential:
    """A one-hidden-layer MLP classifier fitted with full-batch Adam (fast on a busy CPU)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, int(y.max()) + 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


class DigitCNN:
    """A BatchNorm CNN trained to full quality on 8x8 digit images, as an image user uploads it.

    The teacher trains on the first :attr:`TRAIN_ROWS` of the shuffled digits and is
    exported by PyTorch's current exporter (input ``image``, NCHW float32; output
    ``logits``; weights in ``teacher.onnx.data`` beside the graph). Its transfer set is
    those same rows as a zip of PNG folders, one per class; the other rows are held out
    from both the teacher and the engine.
    """

    TRAIN_ROWS = 1300
    EPOCHS = 20

    def __init__(self, folder: Path) -> None:
        import torch

        self.folder = folder
        x, y = digits()
        order = np.random.default_rng(0).permutation(len(x))
        images, labels = x[order].reshape(-1, 1, 8, 8), y[order]
        rows = self.TRAIN_ROWS
        self.train_images, self.train_labels = images[:rows], labels[:rows]
        self.held_out_images, self.held_out_labels = images[rows:], labels[rows:]
        self.module = self._train(self.train_images, self.train_labels)
        self.teacher = export_onnx(
            self.module,
            (torch.from_numpy(images[:2]),),
            folder / "teacher.onnx",
            input_names=["image"],
            output_names=["logits"],
        )
        self.transfer_zip = write_image_folders_zip(
            folder / "transfer.zip", self.train_images[:, 0], self.train_labels
        )

    def bundle(self, dest: Path) -> Path:
        """The teacher's graph and its weights file as one zip, as the API takes them."""
        files: dict[str, bytes | Path] = {
            "teacher.onnx": self.teacher,
            "teacher.onnx.data": external_data(self.teacher),
        }
        return zip_files(dest, files)

    @classmethod
    def _train(cls, images: np.ndarray, labels: np.ndarray) -> nn.Sequential:
        """Three conv-BN-ReLU stages, two max-pools and an MLP head; AdamW, one-cycle."""
        import torch
        from torch import nn

        torch.manual_seed(0)
        model = nn.Sequential(
            *(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()),
            *(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)),
            *(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)),
            *(nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10)),
        )
        batches = -(-len(images) // 64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, 3e-3, total_steps=cls.EPOCHS * batches
        )
        xt, yt = torch.from_numpy(images), torch.from_numpy(labels)
        generator = torch.Generator().manual_seed(0)
        for _ in range(cls.EPOCHS):
            for rows in torch.randperm(len(xt), generator=generator).split(64):
                loss = nn.functional.cross_entropy(model(xt[rows]), yt[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        return model.eval()


_DIGIT_CNN: list[DigitCNN] = []


def digit_cnn() -> DigitCNN:
    """The shared :class:`DigitCNN`: trained and exported on first use, removed at exit."""
    if not _DIGIT_CNN:
        import atexit
        import shutil
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="distillery-digit-cnn-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        with one_torch_thread():
            _DIGIT_CNN.append(DigitCNN(folder))
    return _DIGIT_CNN[0]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one intra-op thread inside the block.

    Small models train many times faster so on a CPU shared with other processes:
    two threads contending for two busy cores made a small CNN's steps 15 times slower.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_ZOO: list[TeacherZoo] = []


def teacher_zoo() -> TeacherZoo:
    """The shared :class:`TeacherZoo`: trained and exported on first use, removed at exit."""
    if not _ZOO:
        import atexit
        import shutil
        import tempfile

        import torch

        folder = Path(tempfile.mkdtemp(prefix="distillery-teachers-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        # Tiny models train faster on one thread, and much faster when the CPU is shared.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _ZOO.append(TeacherZoo(folder))
        finally:
            torch.set_num_threads(threads)
    return _ZOO[0]


def zip_files(path: str | Path, files: dict[str, bytes | Path]) -> Path:
    """A zip holding ``files`` (member name -> bytes or a file to copy)."""
    import zipfile

    path = Path(path)
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            zf.writestr(name, data)
    return path


def external_data(onnx_path: Path) -> Path:
    """The external-data file ``<name>.data`` beside ``onnx_path`` (dynamo exports write one)."""
    return onnx_path.with_name(onnx_path.name + ".data")


def escaping_bundle(onnx_path: Path, dest: Path) -> Path:
    """A zip of ``onnx_path`` whose weights' location is ``../outside.bin``, outside the bundle.

    The real data file is in the zip too, as ``outside.bin``.
    """
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../outside.bin"
    files = {"model.onnx": model.SerializeToString(), "outside.bin": external_data(onnx_path)}
    return zip_files(dest, files)


TINY_WORDS = [
    *("the", "a", "cat", "dog", "sat", "on", "mat", "is", "good", "bad"),
    *("movie", "film", "great", "awful", "i", "liked", "it", "not", "very"),
]


def tiny_bert_tokenizer(folder: Path, lowercase: bool = True) -> PreTrainedTokenizerBase:
    """A BERT WordPiece tokenizer over a tiny vocabulary written into ``folder``."""
    # transformers 5 resolves this alias lazily; its __init__ does not declare it for type checkers.
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]) + "\n")
    # transformers 5 takes the vocabulary as ``vocab`` (``vocab_file`` is ignored).
    return BertTokenizerFast(vocab=str(vocab), do_lower_case=lowercase)


def tiny_bert_config(**kw: Any) -> BertConfig:
    """A 4-layer, 32-wide BERT config: big enough to distil, small enough to train in seconds."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        **kw,
    )


def zip_folder(folder: Path, dest: Path) -> Path:
    """Zip ``folder`` with its own name as the top folder, as users zip a saved model."""
    import zipfile

    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder.parent))
    return dest


def write_jsonl(path: Path, texts: list[str], labels: list[Any] | None = None) -> Path:
    import json

    with open(path, "w") as f:
        for i, text in enumerate(texts):
            row: dict[str, Any] = {"text": text}
            if labels is not None:
                row["label"] = labels[i]
            f.write(json.dumps(row) + "\n")
    return path


def random_sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(TINY_WORDS, size=rng.integers(3, 9))) for _ in range(n)]


def run_engine_cli(work: Path, *args: str, timeout: float = 300) -> Any:
    """``python -m worker.engine run spec.json --out out`` in ``work``, as a user runs it.

    ``args`` follow (e.g. ``--quiet``); returns the finished process, output as text,
    after asserting that it succeeded (its stderr is the message if not).
    """
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "worker.engine", "run", "spec.json", "--out", "out", *args],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc
