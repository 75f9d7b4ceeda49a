"""The package's commands: ``python -m normrnn <command> [options]``.

check FILE...       check config files as the workflow would (file:line of a YAML error)
plan CONFIG         a config's runs, steps and hours before it starts
bench [options]     every norm × quantizer against the fused nn.LSTM/GRU
overhead [options]  what a run costs beside its training (from finished results)
"""

import importlib
import sys

COMMANDS = {
    "check": "normrnn.pipeline.check",
    "plan": "normrnn.outputs.plan",
    "bench": "normrnn.outputs.bench",
    "overhead": "normrnn.outputs.overhead",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
