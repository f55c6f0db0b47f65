"""The stages of one iteration: generate, rank, pair, train, evaluate. Each reads files and writes
files in its own folder, with DONE.json last; the loop (selm/loop.py) only sequences them."""
