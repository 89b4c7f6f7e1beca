"""`python -m umask embed-users`: the bundle loader's one command, for teams that installed only
umask/ (`u-mask embed-users` of the training system is this same command).

    python -m umask embed-users --bundle BUNDLE --events EVENTS --out FILE [--processes N]

Only argparse is imported here; the command imports torch when it runs.
"""
from __future__ import annotations

import argparse
import sys
import time

from umask.errors import UserError


def add_embed_users(commands) -> None:
    """Adds the embed-users subcommand (its arguments and handler) to an argparse subparsers."""
    parser = commands.add_parser("embed-users", help="write z_u of every user of an events file with a bundle",
                                 description="Write (or refresh) a Parquet file of user vectors: one row per "
                                             "user of the events, from the user's latest window, with the "
                                             "bundle version, the window and when it was computed. An "
                                             "existing --out is refreshed: only users whose window changed "
                                             "(or that another bundle computed) are computed again.")
    parser.add_argument("--bundle", required=True, help="an export bundle folder (u-mask export)")
    parser.add_argument("--events", required=True,
                        help="contract events: a dataset folder, an events directory or a Parquet file")
    parser.add_argument("--out", required=True, help="the Parquet file to write or refresh")
    parser.add_argument("--processes", type=int, default=1, help="worker processes")
    parser.add_argument("--batch-size", type=int, default=512, help="users per model call")
    parser.set_defaults(handler=embed_users)


def embed_users(args) -> int:
    for name in ("processes", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    from umask.user_embeddings import embed_users_file

    progress = _Progress()
    done = embed_users_file(args.bundle, args.events, args.out, args.processes, args.batch_size,
                            progress=progress.add)
    progress.close()
    print(f"wrote {args.out}: {done['users']} users, {done['recomputed']} computed and {done['kept']} kept "
          f"as they were, {done['buckets']} buckets, {done['seconds']:.1f} s")
    return 0


class _Progress:
    """Users done so far: a tqdm bar on a terminal where tqdm is installed, else a line on
    stderr at most every 10 s (job logs)."""

    def __init__(self):
        self.users, self.shown = 0, time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            self.bar = tqdm(unit=" users", desc="embedding") if tqdm else None

    def add(self, users: int) -> None:
        self.users += users
        if self.bar is not None:
            self.bar.update(users)
        elif time.monotonic() - self.shown >= 10:
            print(f"embedded {self.users} users", file=sys.stderr, flush=True)
            self.shown = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m umask", description="Use a U-MASK export bundle.")
    add_embed_users(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as err:
        print(f"umask: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
