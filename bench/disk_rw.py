"""The disk as the state ring uses it: O_DIRECT, files overwritten in place, 8 MiB requests, 2 read and
2 write threads at once (runtime/nvme.py [Note: read and write lanes]).  Prints GB/s of reads + writes.

usage: python disk_rw.py DIR [MiB per direction, default 1024]
"""
import mmap
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

d = os.path.join(sys.argv[1], f"disk-rw-{os.getpid()}")
per_dir = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
CH, FS = 8 << 20, 64 << 20
nf = max(2, per_dir * 2 // 64)
os.makedirs(d)
bufs = [mmap.mmap(-1, CH) for _ in range(8)]
try:
    fds = [os.open(os.path.join(d, f"f{i}"), os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600) for i in range(nf)]
    for fd in fds:
        for off in range(0, FS, CH):
            os.pwrite(fd, bufs[0], off)

    def job(write, fd, off, b):
        (os.pwritev if write else os.preadv)(fd, [bufs[b]], off)

    def run(reads, writes):
        rp, wp = ThreadPoolExecutor(2), ThreadPoolExecutor(2)
        t, futs, n = time.perf_counter(), [], 0
        half = nf // 2
        for i in range(half):
            for off in range(0, FS, CH):
                if reads:
                    futs.append(rp.submit(job, False, fds[i], off, n % 4))
                if writes:
                    futs.append(wp.submit(job, True, fds[half + i], off, 4 + n % 4))
                n += reads + writes
        for f in futs:
            f.result()
        return n * CH / (time.perf_counter() - t) / 1e9

    print(f"read {run(1, 0):.2f} GB/s, write {run(0, 1):.2f} GB/s, read+write at once {run(1, 1):.2f} GB/s")
finally:
    shutil.rmtree(d, ignore_errors=True)
