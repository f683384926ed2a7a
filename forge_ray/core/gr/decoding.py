"""Trie-constrained, batched beam search over SIDs, and HF ``generate`` for comparison.

:func:`constrained_beam_search` is model-agnostic: it asks a *step function* for the
next-token log-probs of every live beam and keeps, per query, the ``num_beams`` best
prefixes that exist in the :class:`~forge_ray.core.gr.trie.SIDTrie`. Scores are the
model's summed log-probs (no renormalisation over the allowed tokens), so with
``num_beams >=`` the number of SIDs the result is the exact top-k by joint
probability. Two step functions wrap HF models with a KV cache: :class:`Seq2SeqStep`
(T5: encoder once, one decoder token per step) and :class:`CausalStep` (decoder-only
on left-padded prompts). :class:`EnsembleStep` averages several models' next-token
probabilities, so :func:`generate_sids` decodes an ensemble of models trained on the
same SIDs (different seeds) as one model.

Memory per step: the (R, V) logits of R = queries x beams rows, plus an (R, size_l)
mask; chunk the queries to bound it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from forge_ray.core.gr.data import pad_sequences
from forge_ray.core.gr.trie import SIDTrie
from forge_ray.core.gr.vocab import SIDVocab

# step_fn(prefix, parent) -> (R, V) next-token log-probs. prefix: (R, t) token ids
# decoded so far (t = 0..L-1); parent: (R,) the row of the previous call each row
# extends (step 0: arange(batch)), so cached state can be gathered.
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BeamResult:
    """Per query, SIDs in rank order.

    codes: (B, n, L) int64; a row of -1 where fewer than n SIDs were found.
    scores: (B, n) float32 summed log-probs, -inf for a missing row.
    """

    codes: np.ndarray
    scores: np.ndarray

    @property
    def found(self) -> np.ndarray:
        """(B, n) bool: the row holds a generated SID."""
        return np.isfinite(self.scores)


@torch.no_grad()
def constrained_beam_search(step_fn: StepFn, batch_size: int, trie: SIDTrie, vocab: SIDVocab,
                            num_beams: int, num_return: int | None = None,
                            device: torch.device | str = "cpu") -> BeamResult:
    """Beam search that only ever extends prefixes of existing SIDs.

    Args:
        step_fn: see :data:`StepFn`.
        batch_size: number of queries B.
        trie: the valid SIDs (its sizes must equal the vocabulary's).
        num_beams: beams kept per query at every level.
        num_return: SIDs returned per query (default num_beams, at most num_beams).
    Returns:
        :class:`BeamResult` with n = num_return rows per query, best first.
    """
    num_return = num_beams if num_return is None else num_return
    if not 1 <= num_return <= num_beams:
        raise ValueError(f"num_return must be in [1, num_beams={num_beams}], got {num_return}")
    if tuple(trie.sizes) != tuple(vocab.sizes):
        raise ValueError(f"trie sizes {trie.sizes} differ from vocabulary sizes {vocab.sizes}")
    b, n_levels = batch_size, trie.n_levels
    prefix = torch.zeros((b, 0), dtype=torch.long, device=device)
    parent = torch.arange(b, device=device)
    scores = torch.zeros(b, device=device)
    keys = np.zeros(b, dtype=np.int64)  # packed prefix of each row, -1 = dead row
    for depth in range(n_levels):
        lo, hi = vocab.level_range(depth)
        logp = step_fn(prefix, parent)[:, lo:hi].float()
        allowed = torch.from_numpy(trie.allowed(keys, depth)).to(logp.device)
        cand = torch.where(allowed, logp + scores[:, None], float("-inf"))
        # a query's best k extensions are among each of its rows' best k
        k_row = min(num_beams, hi - lo)
        row_top, row_code = cand.topk(k_row, dim=1)
        per_query = row_top.shape[0] // b
        k = min(num_beams if depth < n_levels - 1 else num_return, per_query * k_row)
        scores, pos = row_top.view(b, -1).topk(k, dim=1)
        code = row_code.view(b, -1).gather(1, pos)
        parent = (pos // k_row + torch.arange(b, device=pos.device)[:, None] * per_query).flatten()
        scores, code = scores.flatten(), code.flatten()
        prefix = torch.cat([prefix[parent], (code + lo)[:, None]], dim=1)
        alive = torch.isfinite(scores).cpu().numpy()
        keys = np.where(alive, keys[parent.cpu().numpy()] * (hi - lo) + code.cpu().numpy(), -1)
    codes = vocab.ids_to_codes(prefix.cpu().numpy()).reshape(b, -1, n_levels)
    scores = scores.view(b, -1).cpu().numpy().astype(np.float32)
    codes[~np.isfinite(scores)] = -1
    missing = num_return - codes.shape[1]  # fewer SIDs in the trie than asked for
    if missing:
        codes = np.concatenate([codes, np.full((b, missing, n_levels), -1, np.int64)], axis=1)
        scores = np.concatenate([scores, np.full((b, missing), -np.inf, np.float32)], axis=1)
    return BeamResult(codes, scores)


class Seq2SeqStep:
    """Step function for an encoder-decoder (T5): encodes once, decodes with a KV cache."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start_id: int):
        self.model, self.start_id = model, start_id
        self.mask = attention_mask
        self.enc = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())

    @torch.no_grad()
    def __call__(self, prefix: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
        self.enc, self.mask = self.enc.index_select(0, parent), self.mask.index_select(0, parent)
        self.cache.reorder_cache(parent)
        last = prefix[:, -1:] if prefix.shape[1] else torch.full(
            (parent.shape[0], 1), self.start_id, dtype=torch.long, device=parent.device)
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=self.enc),
                         attention_mask=self.mask, decoder_input_ids=last,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


class CausalStep:
    """Step function for a decoder-only model on LEFT-padded prompts, with a KV cache."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model, self.ids, self.mask = model, input_ids, attention_mask
        self.cache = DynamicCache()

    @torch.no_grad()
    def __call__(self, prefix: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
        self.mask = self.mask.index_select(0, parent)
        if prefix.shape[1] == 0:
            ids = self.ids.index_select(0, parent)
            pos = (self.mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            self.cache.reorder_cache(parent)
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            ids, pos = prefix[:, -1:], self.mask.long().sum(-1, keepdim=True) - 1
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)


class EnsembleStep:
    """Step function of a mixture: the mean of the members' next-token probabilities.

    Averaging probabilities (not log-probs) keeps each step a distribution, as
    fairseq's and Marian's ensembles do; every member keeps its own KV cache, so an
    ensemble of n models costs n times the decoding of one.
    """

    def __init__(self, steps: Sequence[StepFn]):
        if not steps:
            raise ValueError("an ensemble needs at least one model")
        self.steps, self.log_n = list(steps), math.log(len(steps))

    @torch.no_grad()
    def __call__(self, prefix: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([step(prefix, parent) for step in self.steps])  # (n, R, V)
        return torch.logsumexp(logp, dim=0) - self.log_n


def _padded_prompts(model, vocab: SIDVocab, prompts: Sequence[np.ndarray]):
    device = next(model.parameters()).device
    side = "right" if model.config.is_encoder_decoder else "left"
    ids, mask = pad_sequences(prompts, vocab.pad_id, side=side)
    return ids.to(device), mask.to(device)


def _model_step(model, vocab: SIDVocab, ids: torch.Tensor, mask: torch.Tensor) -> StepFn:
    if model.config.is_encoder_decoder:
        return Seq2SeqStep(model, ids, mask, vocab.bos_id)
    return CausalStep(model, ids, mask)


@torch.no_grad()
def generate_sids(model, vocab: SIDVocab, trie: SIDTrie, prompts: Sequence[np.ndarray],
                  num_beams: int, num_return: int | None = None) -> BeamResult:
    """Constrained beam search with a HF T5 or decoder-only model, or an ensemble.

    model: one model, or a list of models of one kind (all T5 or all decoder-only, on
        one device) over ``vocab``, decoded as a mixture (:class:`EnsembleStep`).
    prompts: B 1-D token-id arrays (the ``input_ids`` of :mod:`forge_ray.core.gr.data`).
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if len({m.config.is_encoder_decoder for m in models}) > 1:
        raise ValueError("an ensemble mixes encoder-decoder and decoder-only models: their prompts differ")
    ids, mask = _padded_prompts(models[0], vocab, prompts)
    steps = [_model_step(m, vocab, ids, mask) for m in models]
    step = steps[0] if len(steps) == 1 else EnsembleStep(steps)
    return constrained_beam_search(step, len(prompts), trie, vocab, num_beams, num_return,
                                   device=ids.device)


@torch.no_grad()
def hf_generate_unconstrained(model, vocab: SIDVocab, prompts: Sequence[np.ndarray],
                              num_beams: int, num_return: int | None = None) -> BeamResult:
    """FORGE-reference decoding: plain HF beam search for exactly L tokens, no trie.

    Returned codes are -1 at levels whose token is not that level's C-token; use
    :func:`forge_ray.core.gr.metrics.invalid_rate` to count SIDs outside the trie.
    """
    num_return = num_beams if num_return is None else num_return
    ids, mask = _padded_prompts(model, vocab, prompts)
    n_levels = vocab.n_levels
    extra = {"decoder_start_token_id": vocab.bos_id} if model.config.is_encoder_decoder else {}
    out = model.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams,
                         num_return_sequences=num_return, max_new_tokens=n_levels,
                         min_new_tokens=n_levels, do_sample=False, length_penalty=0.0,
                         eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id,
                         return_dict_in_generate=True, output_scores=True, **extra)
    codes = vocab.ids_to_codes(out.sequences[:, -n_levels:].cpu().numpy())
    scores = out.sequences_scores.float().cpu().numpy()
    return BeamResult(codes.reshape(len(prompts), num_return, n_levels),
                      scores.reshape(len(prompts), num_return))
