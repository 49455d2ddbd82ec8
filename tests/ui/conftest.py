"""A ``quantduo serve`` server for the UI tests: in this process, bound to 127.0.0.1 on a free port, closed at the
end of the session (it cannot outlive the tests)."""
from __future__ import annotations

import socket
import urllib.request

import pytest

pytest.importorskip("gradio")
pytest.importorskip("diffusers")

from quantduo.cli import build_parser  # noqa: E402

MAX_UPLOAD_MB = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """(base URL, cache dir) of a running server on the bundled tiny models."""
    from quantduo.ui import serve

    cache = tmp_path_factory.mktemp("ui-cache")
    port = free_port()
    args = build_parser().parse_args(["serve", "--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(cache),
                                      "--max-queue", "2", "--max-upload-mb", str(MAX_UPLOAD_MB)])
    demo = serve(args, block=False)
    url = f"http://127.0.0.1:{port}/"
    assert urllib.request.urlopen(url, timeout=10).status == 200
    yield url, cache
    demo.close()
