"""Plain classes and functions that Ray Data schedules (no Ray import here).

Each stage documents the batch columns it takes and returns. Audio travels between stages as
raw float32 bytes in a ``samples`` column (``large_binary``): one fixed schema for window rows
and failure rows alike (a failure row carries empty bytes), so Ray never has to unify
tensor-extension blocks of different shapes.
"""
