"""``python -m overheard.soundworld OUT_DIR [--n N] [--seed S] [--split NAME]``: write a dataset."""

from overheard.soundworld import main

main()
