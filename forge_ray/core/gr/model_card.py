"""The model card (``README.md``) written into every GR model folder.

It says what a person picking the folder up needs: the data and SID table it was
trained on, the SID layout (levels, codebook sizes, collision strategy), the model,
the training budget and its validation result, and how to load and generate, with
forge_ray and with plain Hugging Face ``generate``.
"""

from __future__ import annotations

from typing import Any


def model_card(manifest: dict[str, Any], metrics: dict[str, Any], sid_manifest: dict[str, Any] | None) -> str:
    """Markdown for a ``gr_model`` manifest, its ``metrics.json`` and its SID table's manifest."""
    cfg = manifest.get("config", {})
    model, train, data = cfg.get("model", {}), cfg.get("train", {}), cfg.get("data", {})
    sizes = manifest.get("sizes", [])
    sid = sid_manifest or {}
    strategy = sid.get("strategy", "unknown (AL-GR input)")
    best = manifest.get("best", {})
    counts = manifest.get("counts", {})
    rows = [
        ("architecture", f"{model.get('arch')} (preset `{model.get('preset')}`, overrides {model.get('overrides') or {}})"),
        ("training data", f"`{manifest.get('data')}`: {counts.get('sequences', '?'):,} sequences, "
                          f"{counts.get('examples', '?'):,} training examples"
         if isinstance(counts.get("sequences"), int) else f"`{manifest.get('data')}`"),
        ("SID table", f"`{manifest.get('sids')}`" + (f" ({sid['counts']['items']:,} items)" if sid.get("counts") else "")),
        ("SID layout", f"{len(sizes)} tokens per item, codebook sizes {sizes}, collision strategy `{strategy}`"),
        ("history", f"last {data.get('max_history')} items, {len(sizes)} tokens each"
                    + (", then `</s>`" if model.get("arch") == "t5" else " (the model continues it)")),
        ("training examples", data.get("train_examples", "windows")),
        ("training", f"{manifest.get('steps')} optimizer steps, lr {train.get('lr')}, "
                     f"micro-batch {train.get('micro_batch')} x {cfg.get('scale', {}).get('num_workers')} workers"),
        ("validation", ", ".join(f"{k} {v:.4f}" for k, v in best.items() if isinstance(v, (int, float))) or "n/a"),
        ("kept checkpoint", (manifest.get("selected") or {}).get("why", "n/a")),
        ("stopped early", str(metrics.get("stopped_early", False))),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# Generative-retrieval model (forge_ray)

A {model.get('arch')} model that, given a user's history of items written as semantic IDs
(SIDs), generates the SIDs of the items they are likely to want next. Trained by
`forge-ray train-gr` (code {manifest.get('code_version')}, {manifest.get('created')}).

| | |
|---|---|
{table}

Test-split quality is not measured here: run `forge-ray eval-gr --model THIS_DIR --out DIR`
(Recall/NDCG@K next to most-popular and content-kNN baselines).

## Recommend

```python
from forge_ray import Recommender
rec = Recommender.from_dir("THIS_DIR")           # finds the SID table through manifest.json
rec.recommend([["ITEM_KEY_1", "ITEM_KEY_2"]], k=10)[0].keys
```

or `forge-ray recommend --model THIS_DIR --history ITEM_KEY_1 ITEM_KEY_2 -k 10`, or serve it:
`forge-ray serve --model THIS_DIR` then `POST /recommend {{"history": [...], "k": 10}}`.
New items get SIDs without retraining: `forge-ray add-items --sids SIDS_DIR --data NEW_ITEMS --out SIDS_V2`,
then `--sids SIDS_V2`.

## Plain Hugging Face

`generation_config.json` decodes one SID: {len(sizes)} new tokens, beam search, summed
log-probs. Constrain it to SIDs that exist with the logits processor:

```python
import torch
from transformers import AutoModelForSeq2SeqLM, AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList
from forge_ray.core.gr.constraint import SIDLogitsProcessor
from forge_ray.core.gr.trie import SIDTrie
from forge_ray.core.gr.vocab import SIDVocab
from forge_ray.sid_table import SidTable

tok = AutoTokenizer.from_pretrained("THIS_DIR")        # C-tokens, e.g. "C12C300C700</s>"
model = {'AutoModelForSeq2SeqLM' if model.get('arch') == 't5' else 'AutoModelForCausalLM'}.from_pretrained("THIS_DIR")
table = SidTable.open("{manifest.get('sids')}")
ids, codes = table.arrays()
trie = SIDTrie(codes, ids, table.sizes)
enc = tok(["<history SIDs as C-tokens>{'</s>' if model.get('arch') == 't5' else ''}"], return_tensors="pt", add_special_tokens=False)
proc = SIDLogitsProcessor.for_inputs(model, trie, SIDVocab.load("THIS_DIR"), enc.input_ids)
out = model.generate(**enc, logits_processor=LogitsProcessorList([proc]))
```

Token ids: 0-4 are `<pad> </s> <s> <unk> <sep>`; level l's code c is token `C{{c + offset_l}}`
with offset_l the sum of the codebook sizes before level l (`sid_vocab.json`).
"""
