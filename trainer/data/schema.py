"""Arrow schemas that pass between the data stages: normalized events and featurized examples.

The contract (../shared/data-contract.md) admits many physical types; the contract reader
turns every valid input into NORMALIZED_EVENTS so later stages see exactly one layout.
Featurize writes one row per (user, window) in EXAMPLES; the loader reads it back.
"""
import pyarrow as pa

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

SPLITS = ("train", "val", "test", "cold")

# One example = one user over one window of T slots. Per-slot lists have length T;
# dense is row-major [T, F] flattened; id bags are flattened values with per-slot lengths.
EXAMPLES = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # one of SPLITS
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


class DenseLayout:
    """Where each channel family sits in an example's F dense channels per slot.

    [0, C]        app-category usage, log1p(count or bytes); index C = unknown category
    [C+1, C+K+1]  share of the slot's location records per region; index C+1+K = unknown
    C+K+2         activity: log1p(number of events in the slot)
    C+K+3         volume: log1p(traffic bytes in the slot)
    """

    def __init__(self, num_categories: int, num_regions: int):
        self.num_categories = num_categories
        self.num_regions = num_regions
        self.category = slice(0, num_categories + 1)
        self.region = slice(num_categories + 1, num_categories + num_regions + 2)
        self.activity = num_categories + num_regions + 2
        self.volume = num_categories + num_regions + 3
        self.num_channels = num_categories + num_regions + 4
