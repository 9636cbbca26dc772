"""Ray jobs: one file per job, each with a dataclass config, ``build(cfg)`` and ``main(argv)``."""
