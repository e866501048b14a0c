"""Starts a loraplane-server process on 127.0.0.1 with an ephemeral port for the GPU scripts
(serve_check.py, smollm2_check.py). Standard library only."""
import os
import re
import subprocess
import threading
import time


def start(args, timeout=180):
    """Runs `args` (the binary and its flags, without --host/--port) and returns (process,
    "ip:port") once the server logs its address; its stderr keeps being read so it never blocks."""
    proc = subprocess.Popen(args + ["--host", "127.0.0.1", "--port", "0"], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "RUST_LOG": "info"})
    found, log = [], []

    def read():
        for line in proc.stderr:
            log.append(line)
            m = re.search(r"serving on http://([0-9.:]+)", line)
            if m and not found:
                found.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + timeout
    while time.time() < deadline and not found and proc.poll() is None:
        time.sleep(0.05)
    if found:
        return proc, found[0]
    proc.kill()
    raise SystemExit("server did not start:\n" + "".join(log[-20:]))
