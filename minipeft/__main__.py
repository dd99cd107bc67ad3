"""python -m minipeft compare: the course's main job."""
import argparse

from .backbones.encoder import Encoder
from .tasks import TASKS, load_task


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minipeft")
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser("compare", help="train the registered methods on one task and compare them")
    compare.add_argument("--task", default="sentiment", choices=sorted(TASKS))
    args = parser.parse_args(argv)
    encoder = Encoder.from_pretrained()
    print(encoder.describe())
    dd = load_task(args.task)
    print(f"task {args.task}: {TASKS[args.task].description}; "
          + ", ".join(f"{split} {len(ds)}" for split, ds in dd.items()))


if __name__ == "__main__":
    main()
