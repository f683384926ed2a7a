"""``forge-ray add-items --sids SIDS_DIR --data NEW_DATASET --out NEW_SIDS_DIR``: cold start.

New items (a canonical dataset with embeddings from the same embedder) get SIDs from
the table's own quantizer, placed against the items already there under the table's
collision rule; the result is a new version of the table that a GR model trained on
the old one answers with (``forge-ray recommend --model GR_DIR --sids NEW_SIDS_DIR``).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sids", required=True, help="existing SIDS_DIR (from assign or add-items)")
    parser.add_argument("--data", required=True, help="canonical dataset of the NEW items (with embeddings)")
    parser.add_argument("--out", required=True, help="new SIDS_DIR to write (the next table version)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    from forge_ray.serving.add_items import add_items

    m = add_items(args.sids, args.data, args.out, overwrite=args.overwrite)
    added = m["added"]
    print(f"added {added['items']:,} items -> {args.out} (version {m['version']}, {m['counts']['items']:,} "
          f"items in all); moved off a full SID {added['moved']:,}, fallback {added['fallback']:,}")
    return 0
