"""Generate the Python stubs for protos/ into clients/python/keybroker_client/v1.

protoc names generated modules after the proto package (``keybroker.v1``);
the stubs ship inside the ``keybroker_client`` package, so the one import the
gRPC module makes of its sibling is rewritten to a package-relative one.
Run through ``make proto``; CI checks that the committed output is current.
"""

from __future__ import annotations

import pathlib
import re
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "clients" / "python" / "keybroker_client" / "v1"
GENERATED = ("keybroker_pb2.py", "keybroker_pb2.pyi", "keybroker_pb2_grpc.py")


def main() -> int:
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTOS / "keybroker" / "v1" / "keybroker.proto"),
        ]
        if protoc.main(args) != 0:
            print("protoc failed", file=sys.stderr)
            return 1
        src = pathlib.Path(tmp) / "keybroker" / "v1"
        OUT.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (src / name).read_text()
            text = re.sub(r"^from keybroker\.v1 import", "from . import", text, flags=re.M)
            (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
