"""Rebuild the committed sample export: a tiny BERT fine-tuned on keyword sentences into negative/neutral/positive.

    .venv/bin/python -m model_repository.sample.build        (from the repository root; about ten seconds)

It goes through the training runner's real code path (run_job: train, TorchScript export, parity check), so the
sample has exactly the layout and config of a training export, and replaces the committed files only if the
exported ones classify sentences the training never saw. Everything is seeded and runs on one thread, so this
file, run from the same checkout path, rebuilds the same bytes (TorchScript's debug info records the caller's file
and line numbers: editing this file changes model.pt's bytes, not its weights).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from services.training.runner import BytesSource, CancelToken, CollectingSink, FineTuneSpec, LocalArtifactStore, run_job
from services.training.runner.export import EXPORT_PREFIX
from services.training.runner.tiny import build_tiny_bert, keyword_dataset, to_csv

SAMPLE_DIR = Path(__file__).resolve().parent
LABELS = ("negative", "neutral", "positive")
EXPORT_FILES = ("model.pt", "model_config.json", "labels.json", "tokenizer")
MIN_ACCURACY = 0.9


def build(work_dir: Path) -> Path:
    """Train and export under work_dir; the export directory."""
    torch.set_num_threads(1)
    texts = [text for text, _ in keyword_dataset(2000, seed=99)]
    base = build_tiny_bert(work_dir / "base", texts, hidden_size=48, intermediate_size=96, max_position_embeddings=64)
    _canonical_vocabulary(base / "tokenizer.json", {word for text in texts for word in text.split()})
    spec = FineTuneSpec(
        base_model=str(base),
        labels=LABELS,
        epochs=3,
        batch_size=8,
        learning_rate=1e-3,
        warmup_ratio=0.1,
        max_seq_length=32,
        eval_fraction=0.2,
        seed=7,
    )
    job_dir = work_dir / "job"
    store = LocalArtifactStore(job_dir)
    data = BytesSource("keywords.csv", to_csv(keyword_dataset(900, seed=1)))
    run_job(spec, data, store, CollectingSink(), CancelToken(), job_dir / ".work", progress_interval=0)
    return job_dir / EXPORT_PREFIX.rstrip("/")


def _canonical_vocabulary(tokenizer_file: Path, words: set[str]) -> None:
    """Keep only the special tokens, the characters and the corpus's whole words, numbered in sorted order.

    The WordPiece trainer breaks ties between equally frequent pairs in hash order, so its intermediate subwords
    ("##ckag" in one run, "##age" in the next) and every token id change from run to run. What is kept here is a
    function of the corpus alone; the model's embedding keeps its size (rows past the vocabulary are never used).
    """
    data = json.loads(tokenizer_file.read_text())
    specials = [token["content"] for token in sorted(data["added_tokens"], key=lambda token: token["id"])]
    kept = {
        token
        for token in data["model"]["vocab"]
        if token in words or len(token.removeprefix(data["model"]["continuing_subword_prefix"])) == 1
    }
    order = specials + sorted(kept - set(specials))
    data["model"]["vocab"] = {token: index for index, token in enumerate(order)}
    tokenizer_file.write_text(json.dumps(data, ensure_ascii=False, indent=2))


def _replace_export(export_dir: Path, out_dir: Path) -> None:
    """Swap the export's files into out_dir, leaving the directory's own files (this script) alone."""
    for name in EXPORT_FILES:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        target.unlink(missing_ok=True)
        source = export_dir / name
        if source.is_dir():
            shutil.copytree(source, target, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(source, target)


def held_out_accuracy(export_dir: Path, count: int = 600, seed: int = 12345) -> float:
    """Accuracy of model.pt with its own tokenizer on keyword sentences drawn with a seed training never used."""
    from transformers import AutoTokenizer

    config = json.loads((export_dir / "model_config.json").read_text())
    labels = json.loads((export_dir / "labels.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(export_dir / "tokenizer")
    model = torch.jit.load(str(export_dir / "model.pt"), map_location="cpu")
    rows = keyword_dataset(count, seed=seed)
    batch = tokenizer(
        [text for text, _ in rows],
        truncation=True,
        max_length=config["max_sequence_length"],
        padding=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        predicted = model(batch["input_ids"], batch["attention_mask"]).argmax(dim=-1).tolist()
    return sum(labels[p] == label for p, (_, label) in zip(predicted, rows, strict=True)) / len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_repository.sample.build", description=__doc__)
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR, help="where the export goes (default: this folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        export_dir = build(Path(work))
        accuracy = held_out_accuracy(export_dir)
        if accuracy <= MIN_ACCURACY:
            print(
                f"held-out accuracy {accuracy:.3f} is not above {MIN_ACCURACY}: {args.out} left as it was",
                file=sys.stderr,
            )
            return 1
        args.out.mkdir(parents=True, exist_ok=True)
        _replace_export(export_dir, args.out)
    size = sum(p.stat().st_size for name in EXPORT_FILES for p in _files(args.out / name))
    print(f"sample export in {args.out}: held-out accuracy {accuracy:.3f}, {size / 1024:.0f} KiB")
    return 0


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


if __name__ == "__main__":
    sys.exit(main())
