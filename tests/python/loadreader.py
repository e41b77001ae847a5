"""One load reader: random ranges of random view files, each compared with the
same range of the exported reference copy, until a deadline.

    python loadreader.py SEED SECONDS MNT_DIR REF_DIR FILE [FILE...]

FILE paths are relative to both MNT_DIR and REF_DIR. Every 16 reads the
kernel's cached pages of the file are dropped (posix_fadvise DONTNEED) so
reads keep reaching the daemon. Prints one JSON line
{"reads", "bytes", "mismatches", "errors", "max_read_s"} and exits 1 on any
mismatch or error. Never run this in the test process itself: a hung mount
would hang it; the caller runs it as a subprocess with a timeout.
"""

import json
import os
import random
import sys
import time


def main():
    seed, seconds, mnt, ref = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
    files = sys.argv[5:]
    rng = random.Random(seed)
    fds = {}
    refs = {}
    sizes = {}
    for f in files:
        fds[f] = os.open(os.path.join(mnt, f), os.O_RDONLY)
        refs[f] = os.open(os.path.join(ref, f), os.O_RDONLY)
        sizes[f] = os.fstat(refs[f]).st_size
    reads = nbytes = mismatches = errors = 0
    max_read = 0.0
    first_problem = None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        f = rng.choice(files)
        size = sizes[f]
        off = rng.randrange(0, size + 1)
        length = rng.choice([1, 7, 4096, 65536, 131072, 1 << 20, rng.randrange(1, 3 << 20)])
        t0 = time.monotonic()
        try:
            got = os.pread(fds[f], length, off)
        except OSError as e:
            errors += 1
            first_problem = first_problem or f"{f} @{off}+{length}: {e}"
            continue
        max_read = max(max_read, time.monotonic() - t0)
        want = os.pread(refs[f], length, off)
        reads += 1
        nbytes += len(got)
        if got != want:
            mismatches += 1
            first_problem = first_problem or f"{f} @{off}+{length}: {len(got)} bytes differ from the reference"
        if reads % 16 == 0:
            os.posix_fadvise(fds[f], 0, 0, os.POSIX_FADV_DONTNEED)
    print(json.dumps({"reads": reads, "bytes": nbytes, "mismatches": mismatches, "errors": errors,
                      "max_read_s": round(max_read, 3), "first_problem": first_problem}))
    sys.exit(1 if mismatches or errors else 0)


if __name__ == "__main__":
    main()
