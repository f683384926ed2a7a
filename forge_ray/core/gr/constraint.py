"""Trie-constrained ``model.generate`` for Hugging Face users.

:class:`SIDLogitsProcessor` is a ``transformers.LogitsProcessor``: at every step it
leaves finite only the tokens that extend the row's decoded prefix to a prefix of an
existing SID (:class:`~forge_ray.core.gr.trie.SIDTrie`), and after L codes only
``</s>``. HF applies processors to the log-softmax scores, so beam scores stay the
model's summed log-probs, the same as
:func:`~forge_ray.core.gr.decoding.constrained_beam_search`::

    proc = SIDLogitsProcessor.for_inputs(model, trie, vocab, input_ids)
    out = model.generate(input_ids, attention_mask=mask,
                         logits_processor=LogitsProcessorList([proc]))

The saved ``generation_config.json`` (:func:`sid_generation_config`) already asks for
exactly L new tokens, beam search and no length penalty.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor

from forge_ray.core.gr.trie import SIDTrie
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.core.sid.codes import pack_codes


def sid_generation_config(vocab: SIDVocab, encoder_decoder: bool, num_beams: int = 20,
                          num_return: int = 10) -> GenerationConfig:
    """Generation settings that decode one whole SID: L new tokens, beam search,
    summed log-probs (``length_penalty`` 0), ``num_return`` SIDs per prompt."""
    extra = {"decoder_start_token_id": vocab.bos_id} if encoder_decoder else {"bos_token_id": vocab.bos_id}
    return GenerationConfig(max_new_tokens=vocab.n_levels, min_new_tokens=vocab.n_levels,
                            num_beams=num_beams, num_return_sequences=min(num_return, num_beams),
                            do_sample=False, length_penalty=0.0, early_stopping=True,
                            eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id, **extra)


class SIDLogitsProcessor(LogitsProcessor):
    """Masks every token that does not continue a real SID.

    ``prompt_length`` is where the SID starts in the ``input_ids`` generate passes to
    processors: 1 for an encoder-decoder (after the decoder start token), the padded
    prompt length for a decoder-only model (left padding).
    """

    def __init__(self, trie: SIDTrie, vocab: SIDVocab, prompt_length: int):
        if tuple(trie.sizes) != tuple(vocab.sizes):
            raise ValueError(f"trie sizes {trie.sizes} differ from vocabulary sizes {vocab.sizes}")
        self.trie, self.vocab, self.start = trie, vocab, int(prompt_length)

    @classmethod
    def for_inputs(cls, model, trie: SIDTrie, vocab: SIDVocab, input_ids: torch.Tensor
                   ) -> "SIDLogitsProcessor":
        """The processor for ``model.generate(input_ids, ...)`` with this model."""
        start = 1 if model.config.is_encoder_decoder else int(input_ids.shape[1])
        return cls(trie, vocab, start)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """input_ids: (R, T) tokens so far; scores: (R, V) -> scores with -inf off the trie."""
        done = input_ids[:, self.start:].cpu().numpy()
        depth = done.shape[1]
        allowed = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        if depth >= self.vocab.n_levels:  # a whole SID: only the end token
            allowed[:, self.vocab.eos_id] = True
        else:
            codes = self.vocab.ids_to_codes(done) if depth else np.zeros((len(done), 0), np.int64)
            ok = (codes >= 0).all(axis=1)
            keys = np.full(len(done), -1, dtype=np.int64)
            if depth:
                keys[ok] = pack_codes(codes[ok], self.trie.sizes[:depth])
            lo, hi = self.vocab.level_range(depth)
            allowed[:, lo:hi] = torch.from_numpy(self.trie.allowed(keys, depth)).to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))
