"""minipeft.lab: the experiment harness on top of the library: tasks, training, compare, report, stats, transfer,
distributed runs and the command line (``python -m minipeft``). It imports the library, never ``minipeft.course``."""
from . import qlora, transfer  # noqa: F401  (register QLoRA's and fusion's recipes: each trains on the lab's terms)
