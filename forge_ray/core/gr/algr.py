"""FORGE's AL-GR text format for GR examples: read and write.

A file is tab-separated with the header ``id system user answer`` (no quoting):

- ``system``: a fixed instruction (:data:`SYSTEM_PROMPT`);
- ``user``: :data:`USER_PREFIX` + the history as concatenated C-tokens (L per item,
  oldest first) + :data:`USER_SUFFIX`;
- ``answer``: in training files the target SID (``C1442C14117C19114``); in test
  files the true item ids separated by ``;``.

Rows map to the example columns of :mod:`forge_ray.core.gr.data`: ``id`` (object
str), ``input_ids`` (history token ids + ``</s>``), and ``labels`` (E, L) for
training rows or ``target_items`` (object array of int64 arrays) for test rows.
Reading streams blocks of rows (memory: one block, ``block_bytes``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from forge_ray.core.gr.data import history_input_ids
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.core.sid.codes import parse_sid_sequence
from forge_ray.errors import InputError

COLUMNS = ("id", "system", "user", "answer")
SYSTEM_PROMPT = ("你是一个推荐系统，根据用户的历史行为，预测用户在电商场景的下一步行为。"
                 "我会给你一串连续行为的语义编码，按照用户点击的时间顺序排列，每个行为用三个词表示。")
USER_PREFIX = "当前用户的历史行为如下："
USER_SUFFIX = "，请预测用户在电商推荐场景后续行为的语义编码"
_USER = re.compile(r"^(.*?)((?:C\d+)+)(.*)$", re.S)  # first run of C-tokens is the history

AnswerKind = Literal["sid", "items"]


def iter_algr(path: str | os.PathLike, block_bytes: int = 64 << 20) -> Iterator[dict[str, list[str]]]:
    """Stream an AL-GR file as batches of string columns ``id, system, user, answer``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "AL-GR file not found")
    with open(path, "rb") as f:
        header = f.readline().decode("utf-8", "replace").rstrip("\r\n").split("\t")
    if tuple(header) != COLUMNS:
        raise InputError(path, f"header is {header[:6]}, expected tab-separated {list(COLUMNS)}")
    try:  # opening parses the first block already: a bad row there raises here
        reader = pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(block_size=block_bytes),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS}))
        for batch in reader:
            yield {c: batch.column(c).to_pylist() for c in COLUMNS}
    except pa.ArrowInvalid as e:
        raise InputError(path, f"malformed AL-GR row: {' '.join(str(e).split())}") from None


def parse_rows(rows: dict[str, list[str]], vocab: SIDVocab, answer: AnswerKind,
               source: str = "<AL-GR>", add_eos: bool = True) -> dict[str, np.ndarray]:
    """AL-GR string columns -> example columns (see module doc).

    answer: ``"sid"`` for training rows, ``"items"`` for test rows.
    """
    histories = []
    for rid, user in zip(rows["id"], rows["user"]):
        m = _USER.match(user or "")
        try:
            if m is None:
                raise ValueError("no C-token history")
            histories.append(parse_sid_sequence(m.group(2), vocab.sizes))
        except ValueError as e:
            raise InputError(source, f"row {rid}: user field: {e}") from None
    out = {"id": np.asarray(rows["id"], dtype=object),
           "input_ids": history_input_ids(histories, vocab, add_eos)}
    if answer == "sid":
        labels = np.zeros((len(histories), vocab.n_levels), dtype=np.int64)
        for i, (rid, text) in enumerate(zip(rows["id"], rows["answer"])):
            try:
                codes = parse_sid_sequence(text or "", vocab.sizes)
                if codes.shape[0] != 1:
                    raise ValueError(f"answer holds {codes.shape[0]} SIDs, expected one")
            except ValueError as e:
                raise InputError(source, f"row {rid}: answer: {e}") from None
            labels[i] = vocab.codes_to_ids(codes[0])
        out["labels"] = labels
    else:
        targets = np.empty(len(histories), dtype=object)
        for i, (rid, text) in enumerate(zip(rows["id"], rows["answer"])):
            try:
                targets[i] = np.asarray([int(x) for x in (text or "").split(";") if x.strip()],
                                        dtype=np.int64)
            except (ValueError, OverflowError):  # not digits, or an id beyond int64
                raise InputError(source, f"row {rid}: answer {text[:40]!r} is not ';'-separated item ids") from None
            if not len(targets[i]):  # a query with nothing to find has no recall
                raise InputError(source, f"row {rid}: answer holds no item ids")
        out["target_items"] = targets
    return out


def read_algr(path: str | os.PathLike, vocab: SIDVocab, answer: AnswerKind,
              block_bytes: int = 64 << 20) -> Iterator[dict[str, np.ndarray]]:
    """Stream an AL-GR file as example batches (one per read block)."""
    for rows in iter_algr(path, block_bytes):
        yield parse_rows(rows, vocab, answer, source=os.fspath(path))


def to_rows(batch: dict[str, np.ndarray], vocab: SIDVocab, system: str = SYSTEM_PROMPT,
            user_prefix: str = USER_PREFIX, user_suffix: str = USER_SUFFIX) -> dict[str, list[str]]:
    """Example columns -> AL-GR string columns.

    The answer is the ``labels`` SID when present, else the ``;``-joined
    ``target_items``. Rows without an ``id`` column are numbered from 0.
    """
    n = len(batch["input_ids"])
    ids = [str(x) for x in batch["id"]] if "id" in batch else [str(i) for i in range(n)]
    if "labels" in batch:
        answers = [vocab.ids_to_text(row) for row in np.asarray(batch["labels"])]
    elif "target_items" in batch:
        answers = [";".join(str(int(x)) for x in t) for t in batch["target_items"]]
    else:
        raise ValueError("batch has neither 'labels' nor 'target_items' to write as answer")
    users = [user_prefix + vocab.ids_to_text(h) + user_suffix for h in batch["input_ids"]]
    return {"id": ids, "system": [system] * n, "user": users, "answer": answers}


def write_algr(path: str | os.PathLike, batches: Iterable[dict[str, np.ndarray]], vocab: SIDVocab,
               **text: str) -> int:
    """Write example batches as one AL-GR file; returns the number of rows written.

    ``text`` passes ``system`` / ``user_prefix`` / ``user_suffix`` to :func:`to_rows`.
    Callers write inside ``forge_ray.io.atomic_dir`` so a failure leaves no partial file.
    """
    written = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(COLUMNS) + "\n")
        for batch in batches:
            rows = to_rows(batch, vocab, **text)
            for values in zip(*(rows[c] for c in COLUMNS)):
                if any(("\t" in v) or ("\n" in v) for v in values):
                    raise ValueError(f"row {values[0]}: a field contains a tab or newline")
                f.write("\t".join(values) + "\n")
                written += 1
    return written
