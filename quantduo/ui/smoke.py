"""Start ``quantduo serve`` on a free local port, draw images through Gradio's client, print the timings, stop.

    python -m quantduo.ui.smoke --model random-flux --size 1024 --steps 4 --execution int4 --compare

Used to check the UI on a GPU (e.g. with the full-size random-weight FLUX transformer); prints one JSON line per
image: wall time of the request, the page's metrics (time per step, weight memory, PSNR vs bf16).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from gradio_client import Client

from quantduo.cli import build_parser
from quantduo.ui import serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random-flux")
    p.add_argument("--prompt", default="a photo of a cat")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--execution", action="append", help="repeatable (default: auto)")
    p.add_argument("--compare", action="store_true", help="also draw with bf16 (side by side, PSNR)")
    p.add_argument("--repeat", type=int, default=2, help="images per execution (the first includes warm-up)")
    args = p.parse_args(argv)
    port = _free_port()
    start = time.perf_counter()
    demo = serve(build_parser().parse_args(["serve", "--model", args.model, "--port", str(port)]), block=False)
    print(json.dumps({"startup_s": round(time.perf_counter() - start, 1)}), flush=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        for execution in args.execution or ["auto"]:
            for i in range(args.repeat):
                t0 = time.perf_counter()
                _, _, metrics, status = client.predict(args.model, args.prompt, "from prompt", i, args.steps,
                                                       args.size, execution, args.compare, *("",) * 4, *(1.0,) * 4,
                                                       api_name="/generate")
                print(json.dumps({"execution": execution, "image": i, "request_s": round(time.perf_counter() - t0, 2),
                                  "status": status, "metrics": metrics}), flush=True)
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
