"""Bad specs and bad data are refused with ValueError before any model is loaded; the pieces that decide it
(spec parsing, dataset parsing, the split, the metrics, the artifact store) do what they say."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers

from services.training.runner import FineTuneSpec, InvalidJob, LocalArtifactStore
from services.training.runner.data import BytesSource, StagedDataset, resolve_labels, split, stage_dataset
from services.training.runner.metrics import classification_report
from services.training.runner.preflight import check, prepare
from services.training.runner.tiny import keyword_dataset, to_csv, to_jsonl
from tests.training.runner.conftest import ROWS, TinyJob


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load weights or a tokenizer fails the test: preflight must not need them."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model or tokenizer was loaded for a job that should have been refused")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


BAD_SPECS: list[tuple[str, dict[str, Any], bytes | None, str]] = [
    ("lr zero", {"learning_rate": 0.0}, None, "learning_rate must be > 0"),
    ("lr negative", {"learning_rate": -1e-3}, None, "learning_rate must be > 0"),
    ("seq above model max", {"max_seq_length": 65}, None, "above the base model's maximum of 64"),
    ("missing label column", {"label_column": "sentiment"}, None, "no column(s) 'sentiment'"),
    ("missing text column", {"text_column": "body"}, None, "no column(s) 'body'"),
    ("unknown label values", {"labels": ["positive", "negative"]}, None, "not in the spec's labels"),
    ("empty dataset", {}, b"text,label\n", "is empty"),
    ("blank rows only", {}, b"text,label\n ,x\ny,\n", "is empty"),
    ("single class", {}, to_csv([("a", "x"), ("b", "x")]), "at least 2"),
    ("too small to split", {"eval_fraction": 0.1}, to_csv([("a", "x"), ("b", "y")]), "too small to split"),
    ("zero epochs", {"epochs": 0}, None, "epochs must be >= 1"),
    ("zero batch", {"batch_size": 0}, None, "batch_size must be >= 1"),
    ("eval fraction 1", {"eval_fraction": 1.0}, None, "eval_fraction must be in (0, 1)"),
    ("unknown method", {"method": "prefix"}, None, "method must be one of"),
    ("bad lora rank", {"method": "lora", "lora": {"r": 0}}, None, "lora.r must be >= 1"),
    ("dp epsilon", {"privacy": {"target_epsilon": 0}}, None, "target_epsilon must be > 0"),
    ("dp delta", {"privacy": {"delta": 1.5}}, None, "delta must be in (0, 1)"),
    ("dp with bf16", {"privacy": {}, "mixed_precision": "bf16"}, None, "differential privacy runs in fp32"),
    ("missing base model", {"base_model": "/nonexistent/model"}, None, "no config.json"),
]


@pytest.mark.parametrize(("overrides", "data", "message"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_refused_before_any_compute(
    tiny: TinyJob, no_model_loading: None, overrides: dict[str, Any], data: bytes | None, message: str
) -> None:
    # Before any compute: no model or tokenizer is loaded (no_model_loading), nothing is checkpointed.
    with pytest.raises(ValueError) as caught:
        tiny.run(tiny.spec(**overrides), "bad", data=data)
    assert isinstance(caught.value, InvalidJob)
    assert message in str(caught.value)
    assert not (tiny.tmp / "bad" / "checkpoints").exists()


@pytest.mark.parametrize(("overrides", "data", "message"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_the_services_check_refuses_what_the_runner_refuses(
    tiny: TinyJob, no_model_loading: None, overrides: dict[str, Any], data: bytes | None, message: str
) -> None:
    """The service checks a job without loading its examples (check); it must refuse exactly what the runner's
    prepare refuses, with the same message."""
    spec = tiny.spec(**overrides)
    source = BytesSource("data.csv", data if data is not None else to_csv(ROWS))
    with pytest.raises(InvalidJob) as by_runner, prepare(spec, source, tiny.tmp / "staged"):
        pass
    with pytest.raises(InvalidJob) as by_service:
        check(spec, source)
    assert message in str(by_service.value) and str(by_service.value) == str(by_runner.value)


def test_the_services_check_agrees_with_the_runner_and_keeps_no_examples(tiny: TinyJob) -> None:
    """On a valid job check and prepare agree (hash, size, labels, rows kept and skipped); check's memory stays
    bounded while the examples of the same dataset take many times more."""
    spec = tiny.spec(labels=["bad", "good"])
    checked = check(spec, _GeneratedSource(2 * 1024 * 1024))
    with prepare(spec, _GeneratedSource(2 * 1024 * 1024), tiny.tmp / "staged") as prepared:
        loaded = prepared.dataset.summary
        assert checked.dataset == loaded and checked.fingerprint == prepared.fingerprint
        assert checked.labels == prepared.labels == ("bad", "good")
        assert checked.dataset.examples == len(prepared.dataset) == len(prepared.train) + len(prepared.held_out)
        assert checked.dataset.rows_skipped == loaded.rows_skipped == 0
    assert not (tiny.tmp / "staged").exists()  # the staged texts go with the job
    source = _GeneratedSource(8 * 1024 * 1024)
    tracemalloc.start()
    try:
        checked = check(spec, source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert checked.dataset.examples == source.rows and checked.dataset.label_counts == {
        "good": source.rows // 2,
        "bad": source.rows // 2,
    }
    assert peak < checked.dataset.size_bytes / 4, (peak, checked.dataset.size_bytes)


def test_validate_lists_every_problem() -> None:
    spec = FineTuneSpec(base_model="m", learning_rate=0, batch_size=0, max_seq_length=1000)
    with pytest.raises(ValueError) as caught:
        spec.validate(model_max_len=512)
    text = str(caught.value)
    for fragment in ("learning_rate must be > 0", "batch_size must be >= 1", "max_seq_length 1000 is above"):
        assert fragment in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"base_model": "m", "learning_rte": 1e-4}, "unknown field(s) learning_rte"),
        ({"base_model": "m", "epochs": "3"}, "epochs must be int"),
        ({"base_model": "m", "epochs": True}, "epochs must be int"),
        ({"base_model": "m", "lora": {"rank": 4}}, "unknown field(s) lora.rank"),
        ({"base_model": "m", "labels": "a,b"}, "labels must be str of list"),
        ({"epochs": 3}, "base_model is required"),
    ],
)
def test_spec_json_is_checked_strictly(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FineTuneSpec.from_dict(data)


def test_spec_round_trips_through_json() -> None:
    spec = FineTuneSpec.from_dict(
        {
            "base_model": "m",
            "labels": ["a", "b"],
            "method": "lora",
            "lora": {"r": 4, "target_modules": ["query"]},
            "privacy": {"target_epsilon": 3.0},
            "max_steps": 10,
        }
    )
    again = FineTuneSpec.from_json(json.dumps(spec.to_dict()))
    assert again == spec
    assert again.fingerprint() == spec.fingerprint()
    assert again.lora.target_modules == ("query",) and again.privacy is not None and again.privacy.target_epsilon == 3.0


def _examples(dataset: StagedDataset) -> list[tuple[str, str]]:
    return [(dataset.text(i), dataset.label(i)) for i in range(len(dataset))]


def test_csv_and_jsonl_read_the_same_examples_and_hash_the_bytes(tmp_path: Path) -> None:
    rows = keyword_dataset(30, seed=3)
    from_csv = stage_dataset(BytesSource("d.csv", to_csv(rows)), "text", "label", tmp_path / "csv")
    from_jsonl = stage_dataset(BytesSource("d.jsonl", to_jsonl(rows)), "text", "label", tmp_path / "jsonl")
    assert _examples(from_csv) == _examples(from_jsonl) == rows
    assert (from_csv.summary.format, from_jsonl.summary.format) == ("csv", "jsonl")
    assert from_csv.summary.sha256 == hashlib.sha256(to_csv(rows)).hexdigest()


def test_invalid_utf8_is_replaced_not_fatal(tmp_path: Path) -> None:
    data = b"text,label\nnice car \xe9\xff,positive\nbad,negative\n"
    loaded = stage_dataset(BytesSource("d.csv", data), "text", "label", tmp_path)
    assert loaded.text(0).startswith("nice car ") and loaded.label(0) == "positive"


class _GeneratedSource:
    """A CSV dataset made as it is read, in 64 KiB chunks (never whole in memory), hashed as it goes."""

    name = "generated.csv"

    def __init__(self, size: int) -> None:
        self.size = size
        self.digest = hashlib.sha256()
        self.rows = 0

    def chunks(self) -> Iterator[bytes]:
        yield b"\xef\xbb\xbfid,text,label\r\n"  # with a byte order mark and CRLF, as spreadsheets write it
        self.digest.update(b"\xef\xbb\xbfid,text,label\r\n")
        sent = 0
        while sent < self.size:
            block = "".join(
                f'{self.rows + i},"review {self.rows + i}: the car, quite ""fast"" ",{("good", "bad")[i % 2]}\r\n'
                for i in range(500)
            ).encode()
            self.rows += 500
            self.digest.update(block)
            sent += len(block)
            for start in range(0, len(block), 64 * 1024):
                yield block[start : start + 64 * 1024]


def test_a_dataset_is_staged_as_it_streams_and_never_held(tmp_path: Path) -> None:
    """stage_dataset keeps neither the file nor its texts in memory: the texts go to disk, memory holds an offset
    and a label per example (12 bytes, for rows of about 53), and the most it ever held is a small part of the
    file's size (it used to hold every example's text, and before that the bytes and a copy of them too)."""
    source = _GeneratedSource(8 * 1024 * 1024)
    tracemalloc.start()
    try:
        staged = stage_dataset(source, "text", "label", tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(staged) == source.rows and staged.summary.rows_skipped == 0
    assert (staged.text(7), staged.label(7)) == ('review 7: the car, quite "fast" ', "bad")
    assert (staged.summary.sha256, staged.summary.format) == (source.digest.hexdigest(), "csv")
    assert staged.summary.size_bytes > source.size
    # The texts are on disk in a file without a name: nothing of the dataset is left behind however the runner ends.
    assert list(tmp_path.iterdir()) == []
    # 12 bytes an example, twice while an array grows (old and new buffer), plus the 1 MiB read and write buffers.
    assert peak < 24 * len(staged) + (3 << 20), (peak, len(staged))
    assert peak < staged.summary.size_bytes / 1.5, (peak, staged.summary.size_bytes)


def test_split_is_seeded_stratified_and_disjoint(tmp_path: Path) -> None:
    dataset = stage_dataset(BytesSource("d.csv", to_csv(keyword_dataset(300, seed=2))), "text", "label", tmp_path)
    train, held_out = split(dataset, 0.2, seed=5)
    assert (train, held_out) == split(dataset, 0.2, seed=5)
    assert held_out != split(dataset, 0.2, seed=6)[1]
    assert sorted({*train, *held_out}) == list(range(300)) and len(held_out) == 60
    assert {label: sum(dataset.label(i) == label for i in held_out) for label in dataset.label_names} == {
        "positive": 20,
        "negative": 20,
        "neutral": 20,
    }
    assert resolve_labels(dataset.summary.label_counts, ()) == ("negative", "neutral", "positive")
    assert resolve_labels(dataset.summary.label_counts, ("positive", "neutral", "negative", "extra")) == (
        "positive",
        "neutral",
        "negative",
        "extra",
    )


def test_classification_report_matches_hand_computed_values() -> None:
    # actual:    a a a b b c ; predicted: a a b b c c
    report = classification_report([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2], ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(4 / 6)
    a, b, c = (report["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"]) == (0.5, 0.5)
    assert (c["precision"], c["recall"], c["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert report["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_local_store_puts_atomically_and_refuses_escaping_names(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    assert store.put("a/b.bin", b"12345") == 5
    import io

    assert store.put("a/c.bin", io.BytesIO(b"xyz")) == 3
    assert store.get("a/b.bin") == b"12345" and store.open("a/c.bin").read() == b"xyz"
    assert store.list("a/") == ["a/b.bin", "a/c.bin"] and store.size("a/c.bin") == 3
    (tmp_path / ".work").mkdir()
    (tmp_path / ".work" / "scratch").write_bytes(b"")
    assert ".work/scratch" not in store.list()
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    with pytest.raises(KeyError):
        store.get("a/b.bin")
    for name in ("../x", "/etc/passwd", ""):
        with pytest.raises(ValueError):
            store.put(name, b"")


def test_validating_a_job_does_not_import_torch(tmp_path: Path) -> None:
    """The service validates specs in its own process: preflight must stay free of torch and transformers."""
    import subprocess
    import sys

    code = (
        "import sys; from services.training.runner import FineTuneSpec, prepare, InvalidJob, LocalArtifactStore; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'opacus') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])
