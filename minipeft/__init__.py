"""minipeft: parameter-efficient fine-tuning, built from scratch for a course."""
__version__ = "0.1.0"
