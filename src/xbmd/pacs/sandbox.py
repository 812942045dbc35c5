"""A throw-away Orthanc in a private network namespace, for the tests and the benchmark.

Orthanc 1.10 listens on every interface and has no bind-address option. Here it runs inside its
own network namespace (``ip netns``), joined to this host by one veth pair on a private /30: the
host reaches it at ``10.213.x.(4k+2)`` and nothing else can reach it at all. The DICOM port is
off; the REST port needs a user and password. Needs root (``ip netns``) and the Debian package
``orthanc`` (``make test`` installs it).

Names are unique per sandbox (the namespace ``xbmd-<pid>-<random>``); ``stop`` always removes the
namespace and the link, also after a failed start. ``outage`` stops Orthanc and starts it again
on the same storage, for the service's fault tests.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

PORT = 8042


def _program(name: str) -> str:
    """A program on PATH or in /usr/sbin, /sbin (root's tools, whatever PATH says)."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/sbin/{name}"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise RuntimeError(
        f"the Orthanc sandbox needs `{name}` (Debian packages orthanc, iproute2: `make test`)"
    )


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_program("ip"), *args], check=check, capture_output=True, text=True, timeout=20
    )


class OrthancSandbox:
    """``with OrthancSandbox(folder) as orthanc: orthanc.url ...`` (module docstring)."""

    def __init__(self, folder: str | Path, username: str = "xbmd", password: str | None = None):
        self.folder = Path(folder)
        self.username = username
        self.password = password or secrets.token_hex(12)
        tag = secrets.token_hex(3)
        self.netns = f"xbmd-{os.getpid()}-{tag}"
        self.host_if, self.ns_if = f"xbh{tag}", f"xbn{tag}"
        third, fourth = secrets.randbelow(256), 4 * secrets.randbelow(64)
        self.host_ip = f"10.213.{third}.{fourth + 1}"
        self.ns_ip = f"10.213.{third}.{fourth + 2}"
        self.process: subprocess.Popen | None = None
        self._linked = False

    @property
    def url(self) -> str:
        return f"http://{self.ns_ip}:{PORT}"

    def __enter__(self) -> OrthancSandbox:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- network

    def _link(self) -> None:
        _program("Orthanc")
        _ip("netns", "add", self.netns)
        self._linked = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.netns)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        ns = ("netns", "exec", self.netns, "ip")
        _ip(*ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _ip(*ns, "link", "set", self.ns_if, "up")
        _ip(*ns, "link", "set", "lo", "up")

    def _unlink(self) -> None:
        if self._linked:
            _ip("link", "del", self.host_if, check=False)
            _ip("netns", "del", self.netns, check=False)
            self._linked = False

    # ---- Orthanc

    def _write_config(self) -> Path:
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "xbmd-sandbox",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": PORT,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": True,  # the host comes over the veth link, not loopback
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "Plugins": [],
            "HttpTimeout": 60,
            "OverwriteInstances": False,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def start(self, timeout_s: float = 30.0) -> None:
        """Start Orthanc (and the link, the first time); wait until it answers."""
        import requests

        if not self._linked:
            self._link()
        config = self._write_config()
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [_program("ip"), "netns", "exec", self.netns, _program("Orthanc"), str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start; see {self.folder / 'orthanc.log'}")
            try:
                r = requests.get(
                    f"{self.url}/system", auth=(self.username, self.password), timeout=2
                )
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {timeout_s:.0f} s")

    def halt(self, timeout_s: float = 20.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL), keeping its storage and the link."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout_s)
        self.process = None

    def outage(self, seconds: float) -> None:
        """Orthanc is gone for ``seconds``, then back with the same storage."""
        self.halt()
        time.sleep(seconds)
        self.start()

    def stop(self) -> None:
        """Stop Orthanc and remove the namespace and the link (always safe to call)."""
        try:
            self.halt()
        finally:
            self._unlink()


def radiograph_copies(source: str | Path, count: int, seed: int = 0) -> list[bytes]:
    """``count`` copies of a DICOM radiograph, each a new study (new Study, Series and SOP
    Instance UIDs, derived from ``seed`` and the copy's number), as DICOM files in memory."""
    import io

    import pydicom

    from xbmd.pacs.uids import derived_uid

    template = pydicom.dcmread(source)
    copies = []
    for k in range(count):
        ds = template.copy()
        ds.StudyInstanceUID = derived_uid("copy-study", seed, k)
        ds.SeriesInstanceUID = derived_uid("copy-series", seed, k)
        ds.SOPInstanceUID = derived_uid("copy-instance", seed, k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"A{seed % 10000:04d}{k:05d}"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        copies.append(buffer.getvalue())
    return copies
