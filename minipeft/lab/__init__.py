"""minipeft.lab: the experiment harness on top of the library: tasks, training, compare, report, stats, transfer,
distributed runs and the command line (``python -m minipeft``). It imports the library, never ``minipeft.course``."""
from . import transfer  # noqa: F401  (registers the fusion recipe: its sources are the lab's tasks, trained by stage 1)
