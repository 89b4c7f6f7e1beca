"""Arrow schemas that pass between the data stages: normalized events and featurized examples.

The contract (../shared/data-contract.md) admits many physical types; the contract reader
turns every valid input into NORMALIZED_EVENTS so later stages see exactly one layout.
Featurize writes one row per (user, window) in EXAMPLES; the loader reads it back. The
layout of the dense channels and the split names are the feature spec's (umask/spec.py).
"""
import pyarrow as pa

SPEC_DIR = "spec"  # the feature spec folder (umask/spec.py) inside a featurize output folder

# event codes, in NORMALIZED_EVENTS.event
EVENT_CODES = {"use": 0, "install": 1, "uninstall": 2}

NORMALIZED_EVENTS = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),  # epoch seconds, UTC
        pa.field("app_id", pa.int64()),
        pa.field("loc_id", pa.int64()),
        pa.field("traffic_bytes", pa.int64()),  # null when the column is absent
        pa.field("event", pa.int8(), nullable=False),  # EVENT_CODES
    ]
)

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
