"""selm: online preference alignment with Self-Exploring Language Models (SELM).

Layers, top to bottom; each imports only from its own layer and those below it
(tests/test_import_graph.py holds the full table and checks it):

    selm/cli.py                         the command line
    selm/status.py                      `selm status`: what is done in a run, study or training folder
    selm/studies/                       several runs side by side: demo, sweep, report, analyses
    selm/loop.py                        one run: for t in 1..T, the stages in order, done-markers, resume
    selm/stages/  selm/run_changes.py   generate, rank, pair, train, evaluate: files in, files out |
                                        which stages a changed config redoes
    selm/objective/  selm/engines/      losses, log-probs, LM head | generation, rankers and judges
    selm/training/  selm/fsdp.py        the training engine, step plan, reference, metrics | FSDP2
    selm/data.py  selm/models.py        records and loading | model/tokenizer loading, GGUF, tiny model
    selm/config.py  selm/chat.py        typed config | chat templates | Hugging Face hub ids (hub.py)
    selm/io.py  selm/stats.py           atomic files, done-markers | win rates, intervals
    selm/layout.py  selm/quiet.py       where things are in a run and a study folder | a quiet screen
"""

__version__ = "0.1.0"
