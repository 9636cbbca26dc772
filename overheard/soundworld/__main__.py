"""``python -m overheard.soundworld OUT_DIR [--n N] [--seed S] [--split NAME]``: write a dataset."""

from overheard.soundworld import main

if __name__ == "__main__":  # imported (e.g. by the layering test) it does nothing
    main()
