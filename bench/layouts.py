"""What reading WebDataset shards costs: listing (driver) and decoding (tasks), .tar vs .tar.gz,
local and on the loopback S3 server. No Ray, no model: the listing and decode functions the
caption job calls (overheard.layouts, actors.windows.decode_sources).

    .venv/bin/python bench/layouts.py --members 200 --seconds 10 [--s3]

Prints one table: per layout, bytes the listing read (local: counted), listing wall time,
decode wall time for every member (decode_sources, 10-s windows), and windows decoded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(d: Path, members: int, seconds: float) -> tuple[Path, Path]:
    from tests import media_factory as mf

    clip = mf.make_speech(d / "clip.ogg", "a dog barks twice while a car passes in the rain")
    # one longer clip of the requested length: speech padded with a tone via concat
    tone = mf.make_tone(d / "tone.ogg", seconds=seconds, sr=48000, freq=523)
    data = [clip.read_bytes(), tone.read_bytes()]
    tar, tgz = d / "shard.tar", d / "shard.tar.gz"
    for path, mode in ((tar, "w"), (tgz, "w:gz")):
        with tarfile.open(path, mode) as tf:
            for i in range(members):
                for name, blob in ((f"{i:06d}.ogg", data[i % 2]),
                                   (f"{i:06d}.json", json.dumps({"i": i}).encode())):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(blob)
                    tf.addfile(ti, io.BytesIO(blob))
    return tar, tgz


class Counting:
    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, k=-1):
        b = self.f.read(k)
        self.n += len(b)
        return b

    def __getattr__(self, a):
        return getattr(self.f, a)

    def __enter__(self):
        return self

    def __exit__(self, *e):
        self.f.close()


def measure(uri: str, size: int, count_local: bool) -> dict:
    from actors.windows import decode_sources
    from jobs.caption import _layout_blocks
    from overheard import layouts
    from overheard.layouts import listing

    counters = []
    if count_local:
        def counting_open(p, mode="r", *a, **kw):
            c = Counting(open(p, mode, *a, **kw))
            counters.append(c)
            return c
        listing.open = counting_open  # the listing module's own open()
    t0 = time.perf_counter()
    srcs = layouts.list_located(uri, (".ogg",))
    t_list = time.perf_counter() - t0
    if count_local:
        del listing.open
    t0 = time.perf_counter()
    windows = 0
    for block in _layout_blocks(srcs, True):
        for t in decode_sources(block, window_s=10.0):
            windows += sum(1 for w in t.column("window_index").to_pylist() if w >= 0)
    t_dec = time.perf_counter() - t0
    return dict(sources=len(srcs), listed_bytes=sum(c.n for c in counters) if counters else None,
                size=size, list_s=t_list, decode_s=t_dec, windows=windows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--s3", action="store_true", help="also read the shards from the loopback "
                                                     "S3 server (tests/s3server.py)")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as td:
        tar, tgz = build(Path(td), a.members, a.seconds)
        for p in (tar, tgz):
            rows.append((f"local {p.name}", measure(str(p), p.stat().st_size, True)))
        if a.s3:
            from tests.s3server import S3Server, _free_port
            port = _free_port()
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1",
                              S3_ENDPOINT_URL=f"http://127.0.0.1:{port}")
            srv = S3Server(port).start()
            try:
                fs = srv.fs()
                fs.mkdir("bench")
                for p in (tar, tgz):
                    fs.put(str(p), f"bench/{p.name}")
                    rows.append((f"s3 {p.name}", measure(f"s3://bench/{p.name}",
                                                         p.stat().st_size, False)))
            finally:
                srv.stop()
    print(f"{'layout':<22}{'members':>8}{'shard MB':>10}{'listing read':>14}{'list s':>9}"
          f"{'decode s':>10}{'windows':>9}")
    for name, r in rows:
        lb = "-" if r["listed_bytes"] is None else f"{100 * r['listed_bytes'] / r['size']:.1f} %"
        print(f"{name:<22}{r['sources']:>8}{r['size'] / 1e6:>10.2f}{lb:>14}{r['list_s']:>9.2f}"
              f"{r['decode_s']:>10.2f}{r['windows']:>9}")
    print(f"\nreproduce: .venv/bin/python bench/layouts.py --members {a.members} "
          f"--seconds {a.seconds:g}{' --s3' if a.s3 else ''}")


if __name__ == "__main__":
    main()
