"""`python -m bench` (`make bench`): every bench/*_bench.py module's main(), one after another.

Each benchmark prints its one JSON line with its own defaults. A benchmark that fails is
reported on stderr and the others still run; the exit status is then 1.
"""
import importlib
import sys
import traceback
from pathlib import Path


def main() -> int:
    failed = []
    for path in sorted(Path(__file__).parent.glob("*_bench.py")):
        # a benchmark's own argparse must see no arguments meant for this runner
        sys.argv = [str(path)]
        try:
            importlib.import_module(f"bench.{path.stem}").main()
        except Exception:
            traceback.print_exc()
            failed.append(path.stem)
        sys.stdout.flush()
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
