"""Triton python-backend model serving a training export (TorchScript text classifier), tokenizer inside.

The repository writer copies this file into each version directory next to the export's files. One file plays
one of three steps, chosen by the config parameter AIDC_STEP:

    classify  TEXT or INPUT_IDS (+ ATTENTION_MASK) -> LOGITS, LABEL   the python flavour: the whole model
    tokenize  TEXT -> INPUT_IDS, ATTENTION_MASK (padded to the max)    libtorch flavour, before pytorch_libtorch
    label     LOGITS -> LABEL                                          libtorch flavour, after pytorch_libtorch

Every step takes a whole dynamic batch (several requests, each of one or more rows) in one pass and answers a bad
request with its own error (INVALID_ARGUMENT), never failing the others. A batch may mix text and id requests, each
kind then runs as one forward; Triton 2.51's batcher in fact only puts requests sending the same set of inputs
together, so a batch is all-text or all-ids in practice. Only the classify step imports torch, so the libtorch
flavour's CPU-side steps stay small. The tokenizer is the fast `tokenizers` one from tokenizer.json (no
transformers import), set up to give the ids Hugging Face's AutoTokenizer gives with truncation to the export's
max_sequence_length.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

TEXT, INPUT_IDS, ATTENTION_MASK, LOGITS, LABEL = "TEXT", "INPUT_IDS", "ATTENTION_MASK", "LOGITS", "LABEL"

#: [rows, tokens] token ids and attention mask
IdRows = tuple[np.ndarray, np.ndarray]


class BadRequest(ValueError):
    """The request itself is wrong; its message goes back to the client."""


class ExportFiles:
    """The export's files in one version directory: model_config.json and what it points at. Every path read comes
    from inside the version directory, whatever model_config.json says (TorchScript can read and write files: only
    the export's own model may be loaded)."""

    def __init__(self, version_dir: Path) -> None:
        self.dir = version_dir
        self.config: dict[str, Any] = json.loads(self.path("model_config.json").read_text())
        self.max_length = int(self.config["max_sequence_length"])
        self.pad_id = int(self.config["tokenizer"]["pad_token_id"])

    def path(self, relative: str) -> Path:
        """``relative`` inside the version directory: no absolute path, no '..', no link on the way."""
        parts = Path(relative).parts
        if not parts or Path(relative).is_absolute() or ".." in parts:
            raise ValueError(f"{relative!r} is not a path inside the version directory")
        path = self.dir
        for part in parts:
            path = path / part
            if path.is_symlink():
                raise ValueError(f"{relative!r} is a link: the export's files must be in the version directory")
        if not path.resolve().is_relative_to(self.dir.resolve()):
            raise ValueError(f"{relative!r} leads outside the version directory")
        return path

    def labels(self) -> list[bytes]:
        return [label.encode() for label in json.loads(self.path("labels.json").read_text())]

    def tokenizer(self, pad_to_max: bool) -> Any:
        """Truncating like AutoTokenizer(truncation=True, max_length=...); padding to the longest text of a batch,
        or always to max_sequence_length (fixed shapes let the libtorch model batch every request together)."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.path(f"{self.config['tokenizer']['dir']}/tokenizer.json")))
        tokenizer.enable_truncation(self.max_length)
        tokenizer.enable_padding(
            pad_id=self.pad_id,
            pad_token=tokenizer.id_to_token(self.pad_id),
            length=self.max_length if pad_to_max else None,
        )
        return tokenizer


# ---- reading requests ------------------------------------------------------------------------------------------


def _input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _rows(array: np.ndarray, name: str) -> np.ndarray:
    """The input, checked to be [rows, ...]: with or without batching the leading dimension is the rows."""
    if array.ndim != 2:
        raise BadRequest(f"{name} must have shape [rows, {'1' if name == TEXT else 'tokens'}], got {list(array.shape)}")
    if array.shape[0] == 0:
        raise BadRequest(f"{name} has no rows")
    return array


def read_texts(request: Any) -> list[str]:
    texts = _input(request, TEXT)
    if texts is None:
        raise BadRequest(f"send {TEXT} (strings) or {INPUT_IDS} (int64 token ids)")
    texts = _rows(texts, TEXT)
    if texts.shape[1] != 1:
        raise BadRequest(f"{TEXT} must hold one string per row, got shape {list(texts.shape)}")
    try:
        return [value.decode("utf-8") if isinstance(value, bytes) else str(value) for value in texts[:, 0]]
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{TEXT} must be UTF-8: {exc}") from exc


def read_ids(request: Any, ids: np.ndarray, vocab_size: int, max_length: int, pad_id: int) -> IdRows:
    """The ids checked against the vocabulary and the length, with their attention mask (default: ids != pad)."""
    ids = _rows(ids, INPUT_IDS)
    if ids.shape[1] == 0 or ids.shape[1] > max_length:
        raise BadRequest(f"{INPUT_IDS} must hold 1 to {max_length} tokens per row, got {ids.shape[1]}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = int(ids.min() if ids.min() < 0 else ids.max())
        raise BadRequest(f"{INPUT_IDS} holds token id {bad}, outside this model's vocabulary [0, {vocab_size})")
    mask = _input(request, ATTENTION_MASK)
    if mask is None:
        mask = (ids != pad_id).astype(np.int64)
    elif mask.shape != ids.shape:
        raise BadRequest(f"{ATTENTION_MASK} shape {list(mask.shape)} differs from {INPUT_IDS} shape {list(ids.shape)}")
    return ids, mask


def read_logits(request: Any) -> np.ndarray:
    logits = _input(request, LOGITS)
    if logits is None:
        raise BadRequest(f"send {LOGITS}")
    return _rows(logits, LOGITS)


# ---- answering a batch -----------------------------------------------------------------------------------------


def read_each(requests: Sequence[Any], read: Callable[[Any], Any]) -> tuple[list[Any], list[tuple[int, Any]]]:
    """(responses with an error for each request read() rejected and None elsewhere, [(index, what read() read)])."""
    responses: list[Any] = [None] * len(requests)
    items = []
    for index, request in enumerate(requests):
        try:
            items.append((index, read(request)))
        except BadRequest as exc:
            responses[index] = _bad_request(exc)
    return responses, items


def _error(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def _bad_request(exc: BadRequest) -> Any:
    """The client's mistake: INVALID_ARGUMENT, as Triton answers requests that do not fit the config."""
    return _error(str(exc), pb_utils.TritonError.INVALID_ARG)


def answer_together(
    items: Sequence[tuple[int, Any]],
    rows: Callable[[Any], int],
    compute: Callable[[list[Any]], Sequence[np.ndarray]],
    respond: Callable[[Sequence[np.ndarray]], Any],
    responses: list[Any],
) -> None:
    """One computation over the rows of several requests, split back per request into responses[index].

    compute gets the items in order and returns arrays whose first dimension is the rows of all items together.
    If it fails, every request of this group gets the error (other groups are not affected).
    """
    if not items:
        return
    try:
        outputs = compute([item for _, item in items])
    except Exception as exc:  # noqa: BLE001 - reported to each request of the group
        pb_utils.Logger.log_error(f"batch of {len(items)} request(s) failed: {type(exc).__name__}: {exc}")
        for index, _ in items:
            responses[index] = _error(f"inference failed: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)
        return
    start = 0
    for index, item in items:
        end = start + rows(item)
        responses[index] = respond([output[start:end] for output in outputs])
        start = end


def label_tensor(labels: Sequence[bytes], logits: np.ndarray) -> Any:
    return pb_utils.Tensor(LABEL, np.array([[labels[i]] for i in logits.argmax(axis=1)], dtype=np.object_))


def pad_ids(requests: Sequence[IdRows], pad_id: int) -> IdRows:
    """Several requests' ids and masks padded to the longest and stacked, for one forward over all of them."""
    longest = max(ids.shape[1] for ids, _ in requests)
    rows = sum(ids.shape[0] for ids, _ in requests)
    all_ids = np.full((rows, longest), pad_id, dtype=np.int64)
    all_mask = np.zeros((rows, longest), dtype=np.int64)
    start = 0
    for ids, mask in requests:
        end = start + ids.shape[0]
        all_ids[start:end, : ids.shape[1]] = ids
        all_mask[start:end, : ids.shape[1]] = mask
        start = end
    return all_ids, all_mask


def encode(tokenizer: Any, requests: Sequence[list[str]]) -> IdRows:
    """The texts of several requests tokenized in one call (padded to the longest, or to the fixed length)."""
    encodings = tokenizer.encode_batch([text for texts in requests for text in texts])
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask


# ---- the steps -------------------------------------------------------------------------------------------------


class Classify:
    """The whole classifier: text requests are tokenized together, id requests padded together, one forward each."""

    def __init__(self, files: ExportFiles) -> None:
        import torch

        torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "1")))
        self.torch = torch
        self.model = torch.jit.load(str(files.path(files.config.get("file", "model.pt"))), map_location="cpu")
        self.model.eval()
        self.labels = files.labels()
        self.tokenizer = files.tokenizer(pad_to_max=False)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.max_length = files.max_length
        self.pad_id = files.pad_id

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        responses, items = read_each(requests, self.read)
        texts = [(index, item) for index, item in items if isinstance(item, list)]
        ids = [(index, item) for index, item in items if not isinstance(item, list)]
        answer_together(texts, len, self.classify_texts, self.respond, responses)
        answer_together(ids, lambda rows: rows[0].shape[0], self.classify_ids, self.respond, responses)
        return responses

    def read(self, request: Any) -> list[str] | IdRows:
        """A text request's texts, or an id request's checked ids and mask."""
        ids = _input(request, INPUT_IDS)
        if ids is None:
            if _input(request, ATTENTION_MASK) is not None:
                raise BadRequest(f"{ATTENTION_MASK} goes with {INPUT_IDS}; with {TEXT} the model makes its own")
            return read_texts(request)
        if _input(request, TEXT) is not None:
            raise BadRequest(f"send {TEXT} or {INPUT_IDS}, not both")
        return read_ids(request, ids, self.vocab_size, self.max_length, self.pad_id)

    def classify_texts(self, requests: Sequence[list[str]]) -> tuple[np.ndarray]:
        return self.forward(*encode(self.tokenizer, requests))

    def classify_ids(self, requests: Sequence[IdRows]) -> tuple[np.ndarray]:
        return self.forward(*pad_ids(requests, self.pad_id))

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray]:
        with self.torch.inference_mode():
            logits = self.model(self.torch.from_numpy(ids), self.torch.from_numpy(mask))
        return (logits.float().contiguous().numpy(),)

    def respond(self, outputs: Sequence[np.ndarray]) -> Any:
        (logits,) = outputs
        return pb_utils.InferenceResponse([pb_utils.Tensor(LOGITS, logits), label_tensor(self.labels, logits)])


class Tokenize:
    """Text to fixed-length ids for the libtorch flavour's pytorch_libtorch step."""

    def __init__(self, files: ExportFiles) -> None:
        self.tokenizer = files.tokenizer(pad_to_max=True)

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        responses, texts = read_each(requests, read_texts)
        answer_together(texts, len, lambda items: encode(self.tokenizer, items), self.respond, responses)
        return responses

    @staticmethod
    def respond(outputs: Sequence[np.ndarray]) -> Any:
        ids, mask = outputs
        return pb_utils.InferenceResponse([pb_utils.Tensor(INPUT_IDS, ids), pb_utils.Tensor(ATTENTION_MASK, mask)])


class Label:
    """Logits to class names for the libtorch flavour (pytorch_libtorch returns logits only)."""

    def __init__(self, files: ExportFiles) -> None:
        self.labels = files.labels()

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        responses, logits = read_each(requests, read_logits)
        answer_together(logits, len, lambda items: (np.concatenate(items),), self.respond, responses)
        return responses

    def respond(self, outputs: Sequence[np.ndarray]) -> Any:
        return pb_utils.InferenceResponse([label_tensor(self.labels, outputs[0])])


STEPS: dict[str, Callable[[ExportFiles], Any]] = {"classify": Classify, "tokenize": Tokenize, "label": Label}


class TritonPythonModel:
    """Triton's entry point: builds the configured step from the files of this version directory."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        step = config.get("parameters", {}).get("AIDC_STEP", {}).get("string_value", "classify")
        if step not in STEPS:
            raise ValueError(f"AIDC_STEP must be one of {sorted(STEPS)}, not {step!r}")
        self.step = STEPS[step](ExportFiles(Path(args["model_repository"]) / args["model_version"]))

    def execute(self, requests: list[Any]) -> list[Any]:
        return self.step.execute(requests)
