"""`xbmd serve` under load and faults, against a real Orthanc (in a private network namespace).

Load: ``--radiographs`` copies of the DICOM sample (each a new study) are uploaded into Orthanc by
``--clients`` concurrent clients; the time from the start of each upload until its SR is in
Orthanc (seen in Orthanc's change feed) is its end-to-end latency. Prints radiographs per second
(first upload to last SR), p50/p95/max latency and the service's peak memory (VmHWM).

Faults (``--faults``): SIGKILL of the service after a few results and a restart (every radiograph
must end with exactly one SR and one SC); Orthanc stopped for ``--outage-s`` seconds with jobs
queued (they must wait and complete); a corrupt instance among radiographs (a failure record,
the rest done).

Run it alone on the machine (it is timed). Needs root and the Debian packages of `make test`.

    python benchmarks/bench_service.py --radiographs 200 --clients 8 --faults
    python benchmarks/bench_service.py --radiographs 20 --clients 8 --faults --outage-s 5  # dry run
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import requests

from xbmd.pacs.sandbox import OrthancSandbox, radiograph_copies
from xbmd.pacs.uids import model_identity, output_uids

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "hip_vq0002.dcm"
TOKEN = "benchmark-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    def __init__(self, out: Path, workers: int, threads: int) -> None:
        self.out = out.resolve()  # the service runs in it: paths must not be relative
        self.port = free_port()
        self.orthanc = OrthancSandbox(out / "orthanc")
        self.workers, self.threads = workers, threads
        self.process: subprocess.Popen | None = None
        self.auth = None
        self.seen: dict[str, float] = {}  # SOP Instance UID -> time seen in Orthanc's feed
        self._stop = threading.Event()

    # ---- set-up

    def config(self) -> Path:
        (self.out / "orthanc-password").write_text(self.orthanc.password)
        path = self.out / "xbmd.yaml"
        path.write_text(
            f"orthanc:\n  url: {self.orthanc.url}\n  username: {self.orthanc.username}\n"
            "  password_file: orthanc-password\n  timeout_s: 10\n"
            f"state_dir: state\nbacklog: false\npoll_interval_s: 0.1\nretry_max_delay_s: 2\n"
            f"workers: {self.workers}\ntorch_threads: {self.threads}\n"
            f"worklist:\n  port: {self.port}\n  token: {TOKEN}\n"
        )
        return path

    def start_service(self) -> float:
        """Start `xbmd serve`; seconds until its worklist answers (model loaded)."""
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "xbmd.cli", "serve", "--config", str(self.config())],
            stdout=(self.out / "serve.log").open("ab"),
            stderr=subprocess.STDOUT,
            cwd=self.out,
            env=env,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"xbmd serve exited; see {self.out / 'serve.log'}")
            try:
                if self.api("/api/jobs").status_code == 200:
                    time.sleep(0.5)  # the poller's first read of the feed
                    return time.perf_counter() - t0
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError("xbmd serve did not start within 180 s")

    def api(self, path: str) -> requests.Response:
        return requests.get(
            f"http://127.0.0.1:{self.port}{path}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )

    def peak_rss_mib(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    # ---- Orthanc

    def watch(self) -> None:
        """Record when each new instance appears in Orthanc (its change feed)."""
        session = requests.Session()
        session.auth = self.auth
        since = session.get(f"{self.orthanc.url}/changes", params={"last": ""}, timeout=10).json()
        since = since["Last"]
        while not self._stop.is_set():
            try:
                body = session.get(
                    f"{self.orthanc.url}/changes", params={"since": since, "limit": 500}, timeout=10
                ).json()
            except requests.RequestException:
                time.sleep(0.5)  # Orthanc away (the outage)
                continue
            now = time.perf_counter()
            for change in body["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    info = session.get(f"{self.orthanc.url}/instances/{change['ID']}", timeout=10)
                    self.seen[info.json()["MainDicomTags"]["SOPInstanceUID"]] = now
            since = body["Last"]
            if body["Done"]:
                time.sleep(0.05)

    def upload(self, files: list[bytes], clients: int) -> dict[str, float]:
        """Upload with ``clients`` concurrent clients; SOP UID -> upload start time."""
        started: dict[str, float] = {}

        def send(chunk: list[bytes]) -> None:
            with requests.Session() as session:
                session.auth = self.auth
                for data in chunk:
                    uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
                    started[uid] = time.perf_counter()
                    r = session.post(f"{self.orthanc.url}/instances", data=data, timeout=60)
                    r.raise_for_status()

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(send, [files[k::clients] for k in range(clients)]))
        return started

    def wait_for(self, uids: set[str], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if uids <= self.seen.keys():
                return True
            time.sleep(0.1)
        return False

    def outputs_per_study(self, study_uid: str) -> dict[str, int]:
        found = requests.post(
            f"{self.orthanc.url}/tools/find",
            json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
            auth=self.auth,
            timeout=30,
        ).json()
        counts: dict[str, int] = {}
        for series in found:
            modality = series["MainDicomTags"].get("Modality", "")
            counts[modality] = counts.get(modality, 0) + len(series["Instances"])
        return counts


def expected_sr(files: list[bytes], model_id: str) -> dict[str, str]:
    """Source SOP UID -> the SR's SOP UID the service will make (xbmd.pacs.uids)."""
    out = {}
    for data in files:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        out[ds.SOPInstanceUID] = output_uids(
            ds.StudyInstanceUID, ds.SOPInstanceUID, model_id, "sr"
        )[1]
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(bench: Bench, n: int, clients: int, model_id: str) -> None:
    files = radiograph_copies(SAMPLE, n, seed=1000)
    srs = expected_sr(files, model_id)
    t0 = time.perf_counter()
    started = bench.upload(files, clients)
    upload_s = time.perf_counter() - t0
    ok = bench.wait_for(set(srs.values()), timeout_s=60 + 5 * n)
    latencies = [bench.seen[srs[u]] - t for u, t in started.items() if srs[u] in bench.seen]
    last = max(bench.seen[s] for s in srs.values() if s in bench.seen)
    print(f"load: {n} radiographs by {clients} clients; uploads took {upload_s:.1f} s")
    print(f"  SRs stored: {len(latencies)}/{n}{'' if ok else ' (TIMED OUT)'}")
    print(
        f"  throughput: {len(latencies) / (last - t0):.2f} radiographs/s (first upload to last SR)"
    )
    print(
        f"  latency upload -> SR: p50 {statistics.median(latencies):.2f} s, "
        f"p95 {percentile(latencies, 0.95):.2f} s, max {max(latencies):.2f} s"
    )
    print(f"  service peak memory (VmHWM): {bench.peak_rss_mib():.0f} MiB")


def faults(bench: Bench, n: int, outage_s: float, model_id: str) -> None:
    # SIGKILL after a few results, restart
    files = radiograph_copies(SAMPLE, n, seed=2000)
    srs = expected_sr(files, model_id)
    bench.upload(files, 4)
    deadline = time.monotonic() + 120
    while sum(s in bench.seen for s in srs.values()) < max(1, n // 4):
        if time.monotonic() > deadline:
            raise RuntimeError("no results before the kill")
        time.sleep(0.05)
    before = sum(s in bench.seen for s in srs.values())
    bench.process.send_signal(signal.SIGKILL)
    bench.process.wait(30)
    restart_s = bench.start_service()
    complete = bench.wait_for(set(srs.values()), 60 + 5 * n)
    counts = [
        bench.outputs_per_study(pydicom.dcmread(io.BytesIO(f)).StudyInstanceUID) for f in files
    ]
    exact = sum(c.get("SR") == 1 and c.get("OT") == 1 for c in counts)
    print(
        f"kill: SIGKILL with {before}/{n} SRs stored, restart {restart_s:.1f} s; "
        f"{'all' if complete else 'NOT all'} SRs stored; exactly one SR and one SC: {exact}/{n}"
    )
    # Orthanc away with jobs queued
    files = radiograph_copies(SAMPLE, n, seed=3000)
    srs = expected_sr(files, model_id)
    bench.upload(files, 4)
    time.sleep(0.5)  # queued by the service's poller
    t0 = time.perf_counter()
    bench.orthanc.outage(outage_s)
    complete = bench.wait_for(set(srs.values()), 60 + 5 * n)
    last = max((bench.seen.get(s, 0.0) for s in srs.values()), default=0.0)
    counts = [
        bench.outputs_per_study(pydicom.dcmread(io.BytesIO(f)).StudyInstanceUID) for f in files
    ]
    exact = sum(c.get("SR") == 1 and c.get("OT") == 1 for c in counts)
    print(
        f"outage: Orthanc stopped {outage_s:.0f} s with {n} radiographs queued; "
        f"{'all' if complete else 'NOT all'} SRs stored {last - t0:.1f} s after the outage began; "
        f"exactly one SR and one SC: {exact}/{n}"
    )
    # a corrupt instance among radiographs
    files = radiograph_copies(SAMPLE, n, seed=4000)
    ds = pydicom.dcmread(io.BytesIO(files[0]))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    files[0] = buffer.getvalue()
    srs = expected_sr(files[1:], model_id)
    bench.upload(files, 4)
    complete = bench.wait_for(set(srs.values()), 60 + 5 * n)
    time.sleep(1.0)
    jobs = bench.api("/api/jobs").json()
    failed = [j for j in jobs if j["sop_instance_uid"] == ds.SOPInstanceUID]
    print(
        f"corrupt: {n - 1} radiographs {'all' if complete else 'NOT all'} done; the corrupt one: "
        f"{failed[0]['status'] if failed else 'no job'} ({failed[0]['reason'] if failed else ''})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--radiographs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="the service's worker threads")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the service")
    parser.add_argument("--faults", action="store_true")
    parser.add_argument("--fault-radiographs", type=int, default=12)
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path("bench_out/service"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    from xbmd.model.bundle import load_bundle

    bundle = load_bundle(None)
    model_id = model_identity({"path": str(bundle.source), "created": bundle.created})
    bench = Bench(args.out, args.workers, args.threads)
    with bench.orthanc:
        bench.auth = (bench.orthanc.username, bench.orthanc.password)
        watcher = threading.Thread(target=bench.watch, daemon=True)
        watcher.start()
        try:
            print(f"service start (model loaded): {bench.start_service():.1f} s")
            load(bench, args.radiographs, args.clients, model_id)
            if args.faults:
                faults(bench, args.fault_radiographs, args.outage_s, model_id)
        finally:
            bench._stop.set()
            if bench.process is not None and bench.process.poll() is None:
                bench.process.send_signal(signal.SIGTERM)
                print(f"SIGTERM: exit code {bench.process.wait(60)}")


if __name__ == "__main__":
    main()
