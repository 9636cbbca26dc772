"""Ray Train scripts: one file per model, each with a dataclass config and ``main(argv)``."""
