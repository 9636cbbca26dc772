"""The caption job's decode input as a Ray Data Datasource (Ray imported here, in jobs/ only):
packed todo parts (jobs/sources.py writes them, jobs/blocks.py packs them) read by Ray tasks, one
task per part, each yielding the part as ONE row per decode block (``jobs.blocks.block_rows``:
block, sources). The driver holds the list of parts (paths), never the sources or the blocks.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask

from jobs.blocks import block_rows
from overheard import storage


class PackedTodo(Datasource):
    """``parts``: Parquet paths (local or any fsspec URL) or tables, each as
    ``jobs.blocks.pack_table`` returns it (rows ordered by ``block``)."""

    def __init__(self, parts: list):
        self.parts = list(parts)

    def estimate_inmemory_data_size(self):
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        return [ReadTask(lambda p=p: [block_rows(read_part(p))],
                         BlockMetadata(num_rows=None, size_bytes=None,
                                       input_files=(p,) if isinstance(p, str) else None,
                                       exec_stats=None))
                for p in self.parts]

    def get_name(self) -> str:
        return "PackedTodo"


def read_part(part) -> pa.Table:
    """A packed todo part: the Parquet file's table, or the table itself."""
    if isinstance(part, pa.Table):
        return part
    fs, path = storage.get_fs(part)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)
