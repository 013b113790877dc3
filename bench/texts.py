"""Texts for calibrating and evaluating models. Word salad for synthetic models (which are not
language models: any token stream exercises their FFNs alike), seeded, so files are
reproducible; stdlib docstrings for real models (real prose, offline, on every machine).

    python -m bench.texts out/cal.txt --words 20000 --seed 1      # calibration text
    python -m bench.texts out/heldout.txt --words 400 --seed 2    # held-out text (another seed)
"""

from __future__ import annotations

import argparse
import random

WORDS = ("the of and to in is that it was for on are as with his they at be this from have or by one had "
         "not but what all were when we there can an your which their said if do will each about how up out "
         "them then she many some so these would other into has more her two like him see time could no make").split()


def stdlib_docstrings(modules: tuple[str, ...]) -> str:
    """Real English prose that every machine with Python has: the docstrings of `modules` and of
    the classes and functions they define, in order."""
    import importlib
    import inspect

    docs = []
    for name in modules:
        module = importlib.import_module(name)
        members = [m for m in vars(module).values() if getattr(m, "__module__", None) == name]
        docs += [d for d in map(inspect.getdoc, [module, *members]) if d]
    return "\n\n".join(docs)


def word_salad(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--words", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    opts = parser.parse_args()
    with open(opts.out, "w") as f:
        f.write(word_salad(opts.words, opts.seed))


if __name__ == "__main__":
    main()
