"""all-MiniLM-L6-v2 distilled to a quarter of its parameters, at full length.

The job ``tests/worker/engine/hf/test_minilm_quarter.py`` runs with a short
time budget, here with the whole transfer set the installed packages give and
the default ``training.max_minutes``: the engine CLI on the zipped teacher with
``student.compression: 4`` and every other setting the default. It prints, as
JSON, the student's mean cosine to the teacher on held-out sentences (the
exported ``student.onnx`` in onnxruntime, fed the teacher's tokenizer output,
against sentence-transformers' embeddings), the same for the student's
architecture trained from random weights for as many steps (the baseline),
parameters and compression, median batch-1 latency of teacher and student
files in onnxruntime under the same session options, and the training steps
and seconds.

    python bench/encoder_student.py                       # defaults: 60 minutes at most
    python bench/encoder_student.py --max-minutes 40 --transfer 3000 --epochs 6
    python bench/encoder_student.py --compression 10   # the default compression
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.worker.engine.hf.encoder_job import run_job, score, split_sentences
from tests.worker.engine.hf.sentences import installed_sentences

HELD_OUT_SENTENCES = 500


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-minutes", type=float, default=60.0)
    parser.add_argument("--transfer", type=int, default=0, help="sentences (0: all the rest)")
    parser.add_argument("--epochs", type=int, default=None, help='training.epochs (default "auto")')
    parser.add_argument("--compression", type=float, default=4.0, help="student.compression")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    available = len(installed_sentences()) - HELD_OUT_SENTENCES
    held_out, transfer = split_sentences(HELD_OUT_SENTENCES, args.transfer or available)
    with tempfile.TemporaryDirectory(prefix="encoder-bench-") as folder:
        work = Path(folder)
        training: dict[str, object] = {"max_minutes": args.max_minutes}
        if args.epochs is not None:
            training["epochs"] = args.epochs
        # One student at the asked compression (the default one would climb the ladder:
        # ``bench/ladder.py --encoder`` times that).
        out = run_job(work, transfer, training, args.compression, student={"ladder": False})
        print((work / "engine.log").read_text()[-3000:], file=sys.stderr)
        scored = score(
            out, held_out, work, baseline_texts=None if args.no_baseline else transfer[:2000]
        )
    print(json.dumps({"transfer_sentences": len(transfer), **scored.figures()}, indent=2))


if __name__ == "__main__":
    main()
