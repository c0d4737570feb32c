#!/usr/bin/env python3
"""Read a VHDX (or a differencing chain) with libvhdi's pyvhdi and write its media as a raw file.

Usage: pyvhdi_read.py OUT.raw IMAGE [PARENT ...]

IMAGE is the leaf; each PARENT is the parent of the file before it (immediate parent first,
base image last). The chain is linked with pyvhdi's `file.set_parent(parent_file)`, which checks
the child's parent_linkage against the parent's DataWriteGuid ("mismatch in identifier").

All-zero chunks are skipped with a seek, so OUT.raw is sparse and a huge empty disk costs
little. pyvhdi does NOT replay the VHDX log: an image with a dirty log reads as it is on disk.

Prints "media_size N" on success. Exit status: 0 ok, 1 pyvhdi error, 2 usage, 3 pyvhdi missing.
"""
import sys

CHUNK = 4 * 1024 * 1024


def main(argv):
    if len(argv) < 3:
        print("usage: pyvhdi_read.py OUT.raw IMAGE [PARENT ...]", file=sys.stderr)
        return 2
    try:
        import pyvhdi
    except ImportError as e:
        print(f"pyvhdi_read.py: cannot import pyvhdi ({e}) with {sys.executable}; "
              "run contrib/setup-test-deps.sh", file=sys.stderr)
        return 3
    out_path, chain_paths = argv[1], argv[2:]

    files = []
    for path in chain_paths:
        f = pyvhdi.file()
        try:
            f.open(path)
        except (OSError, IOError) as e:
            print(f"pyvhdi_read.py: cannot open {path}: {e}", file=sys.stderr)
            return 1
        files.append(f)
    # Innermost first: leaf.set_parent(parent), parent.set_parent(grandparent), ...
    # (libvhdi resolves the chain lazily at read time, so the order does not matter to it,
    # but every link must be set before the first read of a block the child lacks).
    for child, parent, cpath, ppath in zip(files, files[1:], chain_paths, chain_paths[1:]):
        try:
            child.set_parent(parent)
        except (OSError, IOError) as e:
            print(f"pyvhdi_read.py: cannot set {ppath} as parent of {cpath}: {e}", file=sys.stderr)
            return 1

    leaf = files[0]
    size = leaf.media_size
    zero = bytes(CHUNK)
    offset = 0
    try:
        with open(out_path, "wb") as out:
            while offset < size:
                n = min(CHUNK, size - offset)
                data = leaf.read_buffer_at_offset(n, offset)
                if len(data) != n:
                    print(f"pyvhdi_read.py: short read at offset {offset}: wanted {n}, got {len(data)}",
                          file=sys.stderr)
                    return 1
                if data == zero[:n]:
                    out.seek(n, 1)
                else:
                    out.write(data)
                offset += n
            out.truncate(size)
    except (OSError, IOError) as e:
        print(f"pyvhdi_read.py: reading {chain_paths[0]} at offset {offset}: {e}", file=sys.stderr)
        return 1
    finally:
        for f in files:
            f.close()
    print(f"media_size {size}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
