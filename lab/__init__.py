"""The lab: the study built on the tutorial (baselines, white-box variants, the comparison, its
records). Importing it registers its architectures in model.ARCHS."""
from lab import baselines  # noqa: F401  (registers gpt2, gemma3)
