"""`u-mask config`: print the fully resolved config, or just validate it."""
from trainer.cli import add_config_arguments, config_from_args
from trainer.config import to_yaml


def register(commands) -> None:
    parser = commands.add_parser("config", help="print the resolved config (validates it)")
    add_config_arguments(parser)
    parser.set_defaults(handler=_show)


def _show(args) -> int:
    print(to_yaml(config_from_args(args)), end="")
    return 0
