"""The broadcast pair join of train-sid: pairs -> both items' embeddings, unknown items dropped."""

import numpy as np
import pyarrow as pa

from forge_ray.data.schema import embeddings_to_numpy
from forge_ray.distributed.sid_outputs import _pair_embeddings


def test_pairs_take_both_embeddings_and_drop_unknown_items():
    ids = np.array([3, 7, 10, 42], np.int64)  # sorted, as load_embeddings returns them
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    pairs = pa.table({"item_a": np.array([7, 3, 5, 42, 10], np.int64),
                      "item_b": np.array([42, 10, 7, 99, 3], np.int64)})
    out = _pair_embeddings(pairs, ids, x)
    assert out.column_names == ["emb_a", "emb_b"] and len(out) == 3  # 5 and 99 are unknown
    np.testing.assert_array_equal(embeddings_to_numpy(out["emb_a"]), x[[1, 0, 2]])
    np.testing.assert_array_equal(embeddings_to_numpy(out["emb_b"]), x[[3, 2, 0]])
