"""What ``overheard serve`` pays to open one archive-layout source by its id
(``overheard.layouts.open_by_id``, the /api/audio path before decoding), on the loopback S3 server
the tests use: a tar member (first request indexes the shard's headers; later ones hit the cache),
a .tar.gz member (streamed to), an HF Parquet row (its row group's audio column). No Ray.

    .venv/bin/python bench/serve_layouts.py --members 1000 --member-kb 20

Prints one table: per case, the median wall time of opening and reading the member's bytes.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=1000, help="members per shard / rows per file")
    ap.add_argument("--member-kb", type=int, default=20, help="bytes per member, KB")
    ap.add_argument("--row-group", type=int, default=100, help="Parquet rows per row group")
    ap.add_argument("--repeat", type=int, default=11, help="requests per case (median)")
    a = ap.parse_args()
    from tests.s3server import S3Server, _free_port

    port = _free_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    srv = S3Server(port).start()
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from overheard import layouts

        data = os.urandom(a.member_kb * 1000)
        n, mid, last = a.members, f"k{a.members // 2:06d}.flac", f"k{a.members - 1:06d}.flac"
        fs = srv.fs()
        fs.mkdir("bench-serve")
        with tempfile.TemporaryDirectory() as d:
            for name, mode in (("s.tar", "w"), ("s.tar.gz", "w:gz")):
                with tarfile.open(os.path.join(d, name), mode) as tf:
                    for i in range(n):
                        ti = tarfile.TarInfo(f"k{i:06d}.flac")
                        ti.size = len(data)
                        tf.addfile(ti, io.BytesIO(data))
            audio = pa.array([{"bytes": data, "path": str(i)} for i in range(n)],
                             pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
            pq.write_table(pa.table({"audio": audio}), os.path.join(d, "h.parquet"),
                           row_group_size=a.row_group)
            for name in ("s.tar", "s.tar.gz", "h.parquet"):
                fs.put(os.path.join(d, name), f"bench-serve/{name}")
        base = "s3://bench-serve"

        def timed(uri: str, repeat: int) -> float:
            ts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                with layouts.open_by_id(uri) as f:
                    assert f.read() == data
                ts.append(time.perf_counter() - t0)
            return sorted(ts)[len(ts) // 2] * 1000

        rows = [
            (f"tar member, first request (indexes {n} headers)", timed(f"{base}/s.tar#{last}", 1)),
            ("tar member, shard indexed (cached)", timed(f"{base}/s.tar#{mid}", a.repeat)),
            ("tar.gz member in the middle (streamed to)",
             timed(f"{base}/s.tar.gz#{mid}", a.repeat)),
            (f"HF Parquet row (row group of {a.row_group})", timed(f"{base}/h.parquet#{n // 2}",
                                                                   a.repeat)),
        ]
    finally:
        srv.stop()
    print(f"{n} members of {a.member_kb} KB, loopback S3 server, median of {a.repeat}:\n")
    print("| open_by_id + read | ms |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")
    print(f"\n.venv/bin/python bench/serve_layouts.py --members {n} --member-kb {a.member_kb} "
          f"--row-group {a.row_group} --repeat {a.repeat}")


if __name__ == "__main__":
    main()
