"""The token vocabulary of a generative-retrieval model over semantic IDs.

Token ids: ``0..4`` are specials (``<pad>``, ``</s>`` end / history separator, ``<s>``
decoder start, ``<unk>``, ``<sep>`` item separator), then one token per (level, code)
in FORGE's C-token order: level l's code c is ``C{c + offset_l}`` (see
:mod:`forge_ray.core.sid.codes`) and has token id ``N_SPECIAL + c + offset_l``. So a
3 x 8192 SID vocabulary has 5 + 24576 tokens, and a 4-level one (de-dup suffix level
of size d) has 5 + 3 * 8192 + d.

The vocabulary is saved as ``sid_vocab.json`` and, when asked, as a Hugging Face
fast tokenizer (``tokenizer.json`` + config) so ``AutoTokenizer.from_pretrained(dir)``
reads the same ids offline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from forge_ray.core.sid.codes import level_offsets, parse_tokens
from forge_ray.errors import InputError

SPECIALS = ("<pad>", "</s>", "<s>", "<unk>", "<sep>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID, SEP_ID = range(len(SPECIALS))
N_SPECIAL = len(SPECIALS)
VOCAB_FILE = "sid_vocab.json"


@dataclass(frozen=True)
class SIDVocab:
    """Token ids for SIDs with ``sizes[l]`` codes at level l."""

    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"codebook sizes must be positive, got {list(self.sizes)}")

    # ---- sizes -------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return len(self.sizes)

    @property
    def offsets(self) -> np.ndarray:
        """(L,) int64 token id of code 0 at each level."""
        return level_offsets(self.sizes) + N_SPECIAL

    def __len__(self) -> int:
        return N_SPECIAL + sum(self.sizes)

    pad_id, eos_id, bos_id, unk_id, sep_id = PAD_ID, EOS_ID, BOS_ID, UNK_ID, SEP_ID

    def level_range(self, level: int) -> tuple[int, int]:
        """[lo, hi) token ids of ``level``'s codes."""
        lo = int(self.offsets[level])
        return lo, lo + self.sizes[level]

    # ---- codes <-> ids (vectorised) -----------------------------------------------
    def codes_to_ids(self, codes: np.ndarray) -> np.ndarray:
        """(..., L) codes -> (..., L) int64 token ids; ValueError if a code is off-range."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.shape[-1] != self.n_levels:
            raise ValueError(f"codes have {codes.shape[-1]} levels, vocabulary has {self.n_levels}")
        if codes.size and ((codes < 0).any() or (codes >= np.asarray(self.sizes)).any()):
            raise ValueError("code outside its level's codebook")
        return codes + self.offsets

    def ids_to_codes(self, ids: np.ndarray) -> np.ndarray:
        """(..., L) token ids -> (..., L) codes; -1 where an id is not its level's token."""
        ids = np.asarray(ids, dtype=np.int64)
        codes = ids - self.offsets[: ids.shape[-1]]
        bad = (codes < 0) | (codes >= np.asarray(self.sizes[: ids.shape[-1]]))
        return np.where(bad, -1, codes)

    # ---- strings -----------------------------------------------------------------
    def id_to_token(self, i: int) -> str:
        return SPECIALS[i] if i < N_SPECIAL else f"C{i - N_SPECIAL}"

    def tokens_to_ids(self, text: str) -> np.ndarray:
        """``"C12C8200..."`` (no specials) -> (T,) int64 ids; ValueError on a foreign token."""
        nums = np.asarray(parse_tokens(text), dtype=np.int64)
        if nums.size and nums.max() >= sum(self.sizes):
            raise ValueError(f"token C{int(nums.max())} is outside a vocabulary of {sum(self.sizes)} codes")
        return nums + N_SPECIAL

    def ids_to_text(self, ids: Sequence[int]) -> str:
        """Token ids -> concatenated C-tokens, specials dropped (FORGE's history format)."""
        return "".join(f"C{i - N_SPECIAL}" for i in np.asarray(ids).tolist() if i >= N_SPECIAL)

    # ---- persistence -------------------------------------------------------------
    def save(self, folder: str | os.PathLike, hf_tokenizer: bool = True) -> None:
        """Write ``sid_vocab.json`` (and the HF tokenizer files) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / VOCAB_FILE).write_text(json.dumps(
            {"sizes": list(self.sizes), "specials": list(SPECIALS)}, indent=1))
        if hf_tokenizer:
            self.hf_tokenizer().save_pretrained(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "SIDVocab":
        path = Path(folder) / VOCAB_FILE
        if not path.is_file():
            raise InputError(path, "SID vocabulary file not found")
        try:
            raw = json.loads(path.read_text())
            sizes = raw["sizes"]
        except (ValueError, KeyError, TypeError):
            raise InputError(path, "not a SID vocabulary (expected JSON with 'sizes')") from None
        if raw.get("specials") != list(SPECIALS):
            raise InputError(path, f"special tokens {raw.get('specials')} differ from {list(SPECIALS)}")
        return cls(tuple(sizes))

    def hf_tokenizer(self):
        """A ``PreTrainedTokenizerFast`` with exactly these ids (WordLevel over C-tokens)."""
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {self.id_to_token(i): i for i in range(len(self))}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        # "C12C8200" has no spaces: split every C-token (and special) out as a word.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"C\d+|<[a-z/]+>"), behavior="isolated")
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
            unk_token="<unk>", sep_token="<sep>")
