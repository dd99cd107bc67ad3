"""The command line, `python -m minipeft <command>` (`minipeft/__main__.py` hands over to `main` here).

    python -m minipeft compare [--tasks T ...] [--seeds S ...] [--fast] [--methods M ...] [--out DIR]
    python -m minipeft report [--results DIR]
    python -m minipeft transfer [--sizes N ...] [--seeds S ...] [--arms A ...] [--fast] [--out DIR]
    python -m minipeft train --method M [--task T] [--seed S] [--fast] [--device cpu|cuda] [--bf16] [--out DIR]
    torchrun --nproc_per_node 2 -m minipeft train --method M ...     (DistributedDataParallel, minipeft.lab.distributed)
"""
import sys

COMMANDS = {"compare": "train the registered methods on one or more tasks, one folder each (minipeft.lab.compare)",
            "transfer": "AdapterFusion's two stages and its controls on a small target task (minipeft.lab.transfer)",
            "report": "the design document's table from results/ (minipeft.lab.report)",
            "train": "train one method on one task, on one or several processes (minipeft.lab.distributed)"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: python -m minipeft <command> [options]\n\ncommands:\n" + "".join(
            f"  {name:10s} {text}\n" for name, text in COMMANDS.items())
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"unknown command {argv[0]!r}; allowed: {sorted(COMMANDS)}\n\n{usage}")
        print(usage)
        return
    if argv[0] == "report":
        from .report_command import main as report_main

        return report_main(argv[1:])
    if argv[0] == "transfer":
        from .transfer import main as transfer_main

        return transfer_main(argv[1:])
    if argv[0] == "train":
        from .distributed import main as train_main

        return train_main(argv[1:])
    from .compare import main as compare_main

    compare_main(argv[1:])
