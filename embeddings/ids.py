"""Raw app/location ids -> table rows, and the loader's per-slot id bags -> a KeyedJaggedTensor.

Contract ids are sparse int64 in [0, 2^63) (they may be hashes themselves), while a table has
num_embeddings rows. Every id is mapped by the feature spec's id hashing rule
(umask.spec.table_rows: splitmix64, reduced mod the row count), the one definition that
featurize, synth and the export bundle share. It runs on the host, where the loader's ids
already are, so no id ever reaches the lookup out of range (FBGEMM on GPU would silently patch
such an id, on CPU it raises) and the device never waits on a host copy. Negative ids break
the contract; they are hashed like any other id but counted, so the trainer can report them
instead of crashing mid-run. No map of the ids seen is kept anywhere: a row is a function of the id.

With collision=zch (embeddings/tables.py) the lookup's managed-collision modules assign rows,
so the ids are hashed over the whole int64 range instead (ZCH_ID_RANGE, the modules'
input_hash_size): the same splitmix64, which spreads them evenly over the modules' per-rank
buckets, with no reduction onto the table's rows.
"""
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.config import EmbeddingsConfig
from umask.spec import table_rows

ZCH_ID_RANGE = 2**63 - 1  # MCHManagedCollisionModule's default input_hash_size


def hash_rows(ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Rows [n] int64 in [0, num_rows) of raw int64 ids [n] of any value (umask.spec.table_rows),
    computed on the host and returned on the ids' device."""
    rows = torch.from_numpy(table_rows(ids.detach().to("cpu", torch.int64).numpy(), num_rows))
    return rows.to(ids.device)


class IdMapper:
    """Turns the loader's id bags into the tables' KeyedJaggedTensor; counts off-contract ids.

    `out_of_contract()` gives the negative ids seen per key since construction.
    """

    KEYS = ("app", "loc")

    def __init__(self, cfg: EmbeddingsConfig):
        # what a key's ids are hashed onto: the table's rows, or for zch the modules' id range
        self.num_rows = {name: ZCH_ID_RANGE if table.collision == "zch" else table.num_embeddings
                         for name, table in cfg.tables().items()}
        self._negative: dict[str, torch.Tensor] = {}

    def to_kjt(self, app_values: torch.Tensor, app_lengths: torch.Tensor,
               loc_values: torch.Tensor, loc_lengths: torch.Tensor) -> KeyedJaggedTensor:
        """values: raw ids, all bags one after another; lengths: [B*T] bag sizes per slot.

        Give it the loader's host tensors and move the result (KeyedJaggedTensor.to) to the device."""
        bags = {"app": (app_values, app_lengths), "loc": (loc_values, loc_lengths)}
        if app_lengths.numel() != loc_lengths.numel():
            raise ValueError(f"app and loc have different slot counts: "
                             f"{app_lengths.numel()} vs {loc_lengths.numel()} lengths")
        rows, lengths = [], []
        for key in self.KEYS:
            values, lens = bags[key]
            if values.dtype != torch.int64:
                raise ValueError(f"{key} ids must be int64, got {values.dtype}")
            if int(lens.sum()) != values.numel():
                raise ValueError(f"{key}: lengths sum to {int(lens.sum())} "
                                 f"but there are {values.numel()} ids")
            negative = (values < 0).sum()
            self._negative[key] = self._negative.get(key, 0) + negative
            rows.append(hash_rows(values, self.num_rows[key]))
            lengths.append(lens.to(torch.int32))
        # values: [n_app + n_loc] rows; lengths: [2 * B*T], app slots first (key-major).
        return KeyedJaggedTensor(keys=list(self.KEYS), values=torch.cat(rows),
                                 lengths=torch.cat(lengths))

    def out_of_contract(self) -> dict[str, int]:
        """Negative (off-contract) ids seen per key so far."""
        return {key: int(self._negative.get(key, 0)) for key in self.KEYS}
