#!/usr/bin/env python3
"""Print what libvhdi's pyvhdi reports about a VHDX file, as one JSON object.

Usage: pyvhdi_info.py IMAGE

Keys: media_size, disk_type (2 fixed, 3 dynamic, 4 differential), disk_type_name,
bytes_per_sector, format_version ("1.0"), identifier (the header's DataWriteGuid),
parent_identifier (the parent_linkage of a differencing disk, else null), parent_filename
(from the parent locator, else null), pyvhdi_version.

Exit status: 0 ok, 1 pyvhdi error, 2 usage, 3 pyvhdi missing.
"""
import json
import sys


def main(argv):
    if len(argv) != 2:
        print("usage: pyvhdi_info.py IMAGE", file=sys.stderr)
        return 2
    try:
        import pyvhdi
    except ImportError as e:
        print(f"pyvhdi_info.py: cannot import pyvhdi ({e}) with {sys.executable}; "
              "run contrib/setup-test-deps.sh", file=sys.stderr)
        return 3
    names = {getattr(pyvhdi.disk_types, n): n.lower()
             for n in dir(pyvhdi.disk_types) if n.isupper()}
    f = pyvhdi.file()
    try:
        f.open(argv[1])
        info = {
            "media_size": f.media_size,
            "disk_type": f.disk_type,
            "disk_type_name": names.get(f.disk_type),
            "bytes_per_sector": f.bytes_per_sector,
            "format_version": f.format_version,
            "identifier": f.identifier,
            "parent_identifier": f.parent_identifier,
            "parent_filename": f.parent_filename,
            "pyvhdi_version": pyvhdi.get_version(),
        }
        f.close()
    except (OSError, IOError) as e:
        print(f"pyvhdi_info.py: {argv[1]}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
