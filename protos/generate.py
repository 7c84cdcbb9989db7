"""Generate the Python gRPC stubs from protos/ into server/api/v1/ (run by setup.py on every build).

Nothing generated is committed. protoc is run with `-Iprotos` so the proto package `s1serve.v1`
keeps its name on the wire; the one absolute import protoc writes into the *_grpc module is made
relative, so the stubs live inside our `server` package.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "server" / "api" / "v1"


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("s1serve/v1/*.proto"))
    staging = out_dir / "_staging"
    staging.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={staging}", f"--pyi_out={staging}",
            f"--grpc_python_out={staging}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[p.name for p in protos]}")
    written = []
    for src in sorted((staging / "s1serve" / "v1").glob("*.py*")):
        text = src.read_text().replace("from s1serve.v1 import ", "from . import ")
        dst = out_dir / src.name
        dst.write_text(text)
        written.append(dst)
    (out_dir / "__init__.py").write_text('"""Generated from protos/s1serve/v1 by protos/generate.py; do not edit."""\n')
    for path in sorted(staging.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    staging.rmdir()
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(path)
