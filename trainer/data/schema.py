"""The Arrow schema of featurized examples, and where a features folder keeps its spec.

Featurize writes one row per (user, window) in EXAMPLES; the loader reads it back. The
layout of the dense channels and the split names are the feature spec's (umask/spec.py).
The normalized events featurize reads are umask.contract.NORMALIZED_EVENTS.
"""
import pyarrow as pa

# One example = one user over one window of T slots. Per-slot lists have length T;
# dense is row-major [T, F] flattened; id bags are flattened values with per-slot lengths.
EXAMPLES = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # one of umask.spec.SPLITS
        pa.field("window_start", pa.int64(), nullable=False),  # epoch seconds of slot 0
        pa.field("time_of_week", pa.list_(pa.int16()), nullable=False),  # [T] slot of week
        pa.field("observed", pa.list_(pa.bool_()), nullable=False),  # [T]
        pa.field("dense", pa.list_(pa.float32()), nullable=False),  # [T * F]
        pa.field("app_ids", pa.list_(pa.int64()), nullable=False),  # sum(app_lengths)
        pa.field("app_lengths", pa.list_(pa.int32()), nullable=False),  # [T]
        pa.field("loc_ids", pa.list_(pa.int64()), nullable=False),  # sum(loc_lengths)
        pa.field("loc_lengths", pa.list_(pa.int32()), nullable=False),  # [T]
    ]
)
