"""Raw app/location ids -> table rows, and the loader's per-slot id bags -> a KeyedJaggedTensor.

Contract ids are sparse int64 in [0, 2^63) (they may be hashes themselves), while a table has
num_embeddings rows. Every id is mapped with splitmix64 (Vigna's finaliser, applied to
id + golden gamma, so id 0 gives the generator's first output) and reduced mod the row count.
All of it is int64 tensor arithmetic, so CPU and GPU give the same rows and no id ever reaches
the lookup out of range: FBGEMM on GPU would silently patch such an id, on CPU it raises.
Negative ids break the contract; they are hashed like any other id but counted, so the trainer
can report them instead of crashing mid-run.
"""
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.config import EmbeddingsConfig


def _int64(unsigned: int) -> int:
    """A 64-bit constant as the signed value with the same bits (torch has no uint64 math)."""
    return unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned


_GAMMA = _int64(0x9E3779B97F4A7C15)
_MUL1 = _int64(0xBF58476D1CE4E5B9)
_MUL2 = _int64(0x94D049BB133111EB)


def _xor_shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """z ^= z >>> bits (logical shift), in place. torch's >> on int64 copies the sign bit in;
    the mask clears those copies."""
    shifted = z >> bits
    shifted &= (1 << (64 - bits)) - 1
    return z.bitwise_xor_(shifted)


def splitmix64(ids: torch.Tensor) -> torch.Tensor:
    """The splitmix64 mix of int64 ids, bits returned as int64 (products wrap mod 2^64)."""
    z = ids.to(torch.int64) + _GAMMA  # a new tensor, so the in-place steps leave ids alone
    _xor_shift_right(z, 30).mul_(_MUL1)
    _xor_shift_right(z, 27).mul_(_MUL2)
    return _xor_shift_right(z, 31)


def hash_rows(ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Rows in [0, num_rows) for int64 ids of any value: the top 63 mixed bits mod num_rows."""
    z = splitmix64(ids)
    z >>= 1
    z &= (1 << 63) - 1  # non-negative, so remainder is the plain modulus
    return z.remainder_(num_rows)


class IdMapper:
    """Turns the loader's id bags into the tables' KeyedJaggedTensor; counts off-contract ids.

    `out_of_contract()` gives the negative ids seen per key since construction.
    """

    KEYS = ("app", "loc")

    def __init__(self, cfg: EmbeddingsConfig):
        self.num_rows = {name: table.num_embeddings for name, table in cfg.tables().items()}
        self._negative: dict[str, torch.Tensor] = {}

    def to_kjt(self, app_values: torch.Tensor, app_lengths: torch.Tensor,
               loc_values: torch.Tensor, loc_lengths: torch.Tensor) -> KeyedJaggedTensor:
        """values: raw ids, all bags one after another; lengths: [B*T] bag sizes per slot."""
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
