"""Engine training throughput against a naive KD loop and the student trained alone.

Runs, in one process, on the same teacher, student, data, batch size and epochs:

1. naive: a plain PyTorch KD loop: fp32, a DataLoader, the teacher called every step;
2. engine: the teacher's ONNX export loaded as a job loads it, its outputs computed
   once (the pass is timed too), ``worker.engine.training`` with the data kept as
   tensors and bf16 autocast on CUDA;
3. alone: the same student trained on labels alone with the engine's loop.

It prints samples/s for each and the ratios engine/naive (target on a GPU: at
least 1.7x) and engine/alone (target: at least 0.95x).

    python bench/engine_throughput.py                 # CPU, small ResNets on 16x16 images
    python bench/engine_throughput.py --device cuda   # ResNet-50-like teacher, ResNet-18 student
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.losses import LabelsOnlyLoss, build_loss
from worker.engine.planning import batch_size_for
from worker.engine.spec import DistillationSpec, TrainingSpec
from worker.engine.teachers import TeacherRuntime, load_teacher
from worker.engine.training import (
    TrainingData,
    compute_teacher_outputs,
    resolve_device,
    train,
)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, four stages, global pool, linear head."""

    def __init__(
        self, block: type[BasicBlock | Bottleneck], layers: list[int], base: int, classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base), nn.ReLU()
        )
        stages: list[nn.Module] = []
        cin = base
        for i, n in enumerate(layers):
            width = base * 2**i
            for j in range(n):
                stages.append(block(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(inputs))
        return self.head(x.mean((2, 3)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_loop(
    teacher: nn.Module,
    student: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    device: torch.device,
    temperature: float = 4.0,
) -> float:
    """The loop most tutorials write: fp32, DataLoader, teacher every step."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=True,
        pin_memory=device.type == "cuda",
    )
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    student.train()
    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        for xb, _yb in loader:
            xb = xb.to(device, non_blocking=True)
            with torch.no_grad():
                t = teacher(xb)
            s = student(xb)
            loss = (
                nn.functional.kl_div(
                    torch.log_softmax(s / temperature, -1),
                    torch.log_softmax(t / temperature, -1),
                    reduction="batchmean",
                    log_target=True,
                )
                * temperature**2
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sync(device)
    return epochs * len(x) / (time.perf_counter() - start)


def engine_loop(
    teacher: TeacherRuntime,
    student: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    spec: TrainingSpec,
    device: torch.device,
    distil: bool,
) -> float:
    """The engine's loop; with ``distil`` the timed span includes the one teacher pass.

    ``teacher`` is the engine's own runtime for the teacher's ONNX export, as a
    job would load it (converted to torch after a check against onnxruntime).
    """
    val_x = x[:256]
    sync(device)
    start = time.perf_counter()
    loss: nn.Module
    if distil:
        outputs, _ = compute_teacher_outputs(teacher, {"inputs": x.numpy()}, batch_size=1024)
        targets = torch.from_numpy(outputs)
        loss = build_loss(DistillationSpec(), "classification", "logits", False, 1, None)
    else:
        targets = None
        loss = LabelsOnlyLoss("classification")
    data = TrainingData(
        train={"inputs": x.to(device)},
        train_teacher=targets.to(device) if targets is not None else None,
        train_labels=None if distil else y.to(device),
        val={"inputs": val_x.to(device)},
        val_teacher=(
            targets[:256].to(device)
            if targets is not None
            else nn.functional.one_hot(y[:256], 10).float().to(device)
        ),
    )
    result = train(
        student=student,
        loss_fn=loss,
        data=data,
        spec=spec,
        task="classification",
        teacher_output_kind="logits",
        device=device,
        use_teacher=distil,
    )
    sync(device)
    return result.steps * batch_size_for(spec, text=False) / (time.perf_counter() - start)


def engine_teacher(
    teacher: nn.Module, x: torch.Tensor, device: torch.device, work: Path
) -> TeacherRuntime:
    """Export ``teacher`` to ONNX and load it the way a job does."""
    path = work / "teacher.onnx"
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        teacher.cpu().eval(),
        (x[:2],),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
    )
    teacher.to(device)
    runtime = load_teacher(path, device=device, work_dir=work / "teacher")
    runtime.prepare({"inputs": x[:64].to(device)})
    return runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        n, size, epochs, bs = args.samples or 50_000, 32, args.epochs or 20, args.batch_size or 512
        make_teacher = lambda: ResNet(Bottleneck, [3, 4, 6, 3], 64)  # noqa: E731
        make_student = lambda: ResNet(BasicBlock, [2, 2, 2, 2], 64)  # noqa: E731
    else:
        n, size, epochs, bs = args.samples or 2048, 16, args.epochs or 10, args.batch_size or 128
        make_teacher = lambda: ResNet(BasicBlock, [2, 2, 2, 2], 32)  # noqa: E731
        make_student = lambda: ResNet(BasicBlock, [1, 1, 1, 1], 16)  # noqa: E731
    x = torch.randn(n, 3, size, size)
    y = torch.randint(0, 10, (n,))
    teacher = make_teacher().to(device).eval().requires_grad_(False)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    runtime = engine_teacher(teacher, x, device, work)
    spec = TrainingSpec(
        epochs=epochs,
        batch_size=bs,
        learning_rate=1e-3,
        checkpoint_every_minutes=None,
        grad_clip_norm=None,
    )
    results = {}
    torch.manual_seed(0)
    results["naive"] = naive_loop(
        teacher,
        make_student().to(device),
        x,
        y,
        epochs=epochs,
        batch_size=bs,
        lr=1e-3,
        device=device,
    )
    torch.manual_seed(0)
    results["engine"] = engine_loop(
        runtime, make_student(), x, y, spec=spec, device=device, distil=True
    )
    torch.manual_seed(0)
    results["alone"] = engine_loop(
        runtime, make_student(), x, y, spec=spec, device=device, distil=False
    )
    for name, rate in results.items():
        print(f"{name:>7}: {rate:10.1f} samples/s")
    print(f"engine / naive: {results['engine'] / results['naive']:.2f}x  (GPU target >= 1.7x)")
    print(f"engine / alone: {results['engine'] / results['alone']:.2f}x  (target >= 0.95x)")
    summary = {"device": str(device), "samples": n, "epochs": epochs, "batch_size": bs}
    print(json.dumps({**summary, "teacher_backend": runtime.backend, **results}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
