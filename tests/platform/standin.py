"""A stand-in supervised process for supervisor tests: answers GET /healthz, can fork a child, crash or hang.

Usage: python standin.py PORT [--child] [--exit CODE] [--never-ready] [--ready-for SECONDS] [--ignore-sigterm]
"""

from __future__ import annotations

import http.server
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> None:
    port = int(argv[0])
    if "--exit" in argv:
        sys.exit(int(argv[argv.index("--exit") + 1]))
    if "--ignore-sigterm" in argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--child" in argv:
        # Like Triton's python backend stub: a grandchild in the component's session that outlives a SIGKILL.
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    ready = "--never-ready" not in argv
    # With --ready-for it answers "not ready" (503) after that many seconds: alive and answering, but not ready.
    ready_until = time.monotonic() + float(argv[argv.index("--ready-for") + 1]) if "--ready-for" in argv else None

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            still = ready_until is None or time.monotonic() < ready_until
            self.send_response(200 if ready and still and self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    if "--ignore-sigterm" not in argv:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"standin listening on {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
