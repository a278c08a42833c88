#!/usr/bin/env python3
"""Which pages a SQLite store's group commits write, from a copy of its WAL.

Usage: scripts/wal-pages.py DIR [COMMITS]

DIR holds a copy of `scrip.db` and `scrip.db-wal`, taken while the server
was stopped (`kill -STOP <pid>`, copy both, `kill -CONT <pid>`). The script
reads the WAL's frame headers, splits them into commits (a frame with a
non-zero "database size" ends one), and names each page's b-tree and page
type through SQLite's `dbstat` table. It prints the frames per commit and,
for the last COMMITS commits (300 by default), the pages per commit of
each b-tree. Only the frames of the WAL's current generation (its salt) are
read. The copy is opened read-only.
"""

import collections
import sqlite3
import struct
import sys


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    directory = sys.argv[1]
    last = int(sys.argv[2]) if len(sys.argv) == 3 else 300
    with open(f"{directory}/scrip.db-wal", "rb") as f:
        wal = f.read()
    if len(wal) < 32:
        print("the WAL is empty", file=sys.stderr)
        return 1
    page_size = struct.unpack(">I", wal[8:12])[0]
    salt = wal[16:24]
    frames = []
    offset = 32
    while offset + 24 + page_size <= len(wal):
        page, db_size = struct.unpack(">II", wal[offset : offset + 8])
        if wal[offset + 8 : offset + 16] != salt:
            break
        frames.append((page, db_size))
        offset += 24 + page_size
    commits, current = [], []
    for page, db_size in frames:
        current.append(page)
        if db_size:
            commits.append(current)
            current = []
    if not commits:
        print("no commit in the WAL", file=sys.stderr)
        return 1
    print(f"page size {page_size}, {len(frames)} frames, {len(commits)} commits, "
          f"{sum(map(len, commits)) / len(commits):.1f} frames per commit")
    db = sqlite3.connect(f"file:{directory}/scrip.db?mode=ro", uri=True)
    owner = {page: (name, kind) for name, page, kind in
             db.execute("SELECT name, pageno, pagetype FROM dbstat")}
    counts = collections.Counter()
    tail = commits[-last:]
    for commit in tail:
        for page in commit:
            counts[owner.get(page, ("(not in the database file yet)", ""))] += 1
    print(f"pages per commit, last {len(tail)} commits:")
    for (name, kind), n in counts.most_common():
        print(f"  {n / len(tail):5.2f}  {name} {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
