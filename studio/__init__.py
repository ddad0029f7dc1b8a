"""histostudio core: colour and stain math, slides, datasets, metrics and the CLI.

``studio`` never imports ``pipelines`` or ``training`` (the CLI does, lazily), so the
core stays importable and fast without the generative stack.
"""

__version__ = "0.1.0"
