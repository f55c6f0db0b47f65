"""selm: online preference alignment with Self-Exploring Language Models (SELM).

The library is split by stage (generate, rank, pair, train, evaluate); stages talk only through
files in a run folder, and ``selm.loop`` sequences them. ``selm.losses`` holds the objectives as pure
functions of log-prob tensors.
"""

__version__ = "0.1.0"
