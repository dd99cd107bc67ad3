"""One file per method; importing this package registers every method's config with the core API."""
from .bottleneck import BottleneckConfig  # noqa: F401
