"""Unpack cp312/py3 wheels into a site-packages tree as pip would for their purelib/platlib content: keep exec
bits, skip *.data/ (headers, pkgconfig, scripts: not needed at run time), make no console scripts.

    python3 unpack_wheels.py WHEELS_DIR SITE_DIR
"""

from __future__ import annotations

import os
import sys
import zipfile


def unpack(wheels_dir: str, site: str) -> None:
    os.makedirs(site, exist_ok=True)
    for name in sorted(os.listdir(wheels_dir)):
        if not name.endswith(".whl"):
            continue
        with zipfile.ZipFile(os.path.join(wheels_dir, name)) as z:
            for info in z.infolist():
                if info.filename.split("/")[0].endswith(".data") or info.is_dir():
                    continue
                dest = os.path.join(site, info.filename)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with z.open(info) as src, open(dest, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                mode = (info.external_attr >> 16) & 0o777
                os.chmod(dest, 0o755 if mode & 0o111 else 0o644)
            dist_info = next(n.split("/")[0] for n in z.namelist() if n.split("/")[0].endswith(".dist-info"))
            with open(os.path.join(site, dist_info, "INSTALLER"), "w") as f:
                f.write("devpkg\n")
        print("unpacked", name)


if __name__ == "__main__":
    unpack(sys.argv[1], sys.argv[2])
