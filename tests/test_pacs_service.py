"""`xbmd serve` against a real Orthanc (in a private network namespace), its faults, and the
worklist in a real browser (headless Chromium through Selenium).

One Orthanc for the module. The scenario (fixture ``served``): radiographs, a corrupt instance
and a chest film are stored into Orthanc; `xbmd serve` starts, is SIGKILLed after its first
result, and is started again; every radiograph must then have exactly one SR and one SC in its
study. Needs root (network namespace) and the Debian packages that `make test` installs.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests

from xbmd.pacs.config import load_config
from xbmd.pacs.sandbox import OrthancSandbox, radiograph_copies
from xbmd.pacs.sr import read_sr

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "hip_vq0002.dcm"
TOKEN = "worklist-token-for-tests-0123456789"
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-SECRET-4711"
N_RADIOGRAPHS = 4
WAIT_S = 180  # bounded waits; the scenario takes about 30 s on 2 busy cores


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with OrthancSandbox(tmp_path_factory.mktemp("orthanc")) as sandbox:
        yield sandbox


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(folder: Path, orthanc: OrthancSandbox, port: int, backlog: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "orthanc-password").write_text(orthanc.password)
    path = folder / "xbmd.yaml"
    path.write_text(
        f"orthanc:\n  url: {orthanc.url}\n  username: {orthanc.username}\n"
        "  password_file: orthanc-password\n  timeout_s: 5\n"
        f"state_dir: state\nbacklog: {str(backlog).lower()}\npoll_interval_s: 0.2\n"
        "retry_max_delay_s: 1\n"
        f"worklist:\n  port: {port}\n  token: {TOKEN}\n"
    )
    return path


def _named(data: bytes, **attributes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _store(orthanc: OrthancSandbox, data: bytes) -> str:
    r = requests.post(
        f"{orthanc.url}/instances", data=data, auth=(orthanc.username, orthanc.password), timeout=30
    )
    r.raise_for_status()
    return r.json()["ID"]


def _outputs_of_study(orthanc: OrthancSandbox, study_uid: str) -> dict[str, list[str]]:
    """{modality: [SOP Instance UIDs]} of the study in Orthanc."""
    auth = (orthanc.username, orthanc.password)
    found = requests.post(
        f"{orthanc.url}/tools/find",
        json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        auth=auth,
        timeout=30,
    ).json()
    out: dict[str, list[str]] = {}
    for instance in found:
        tags = requests.get(
            f"{orthanc.url}/instances/{instance['ID']}/simplified-tags", auth=auth, timeout=30
        ).json()
        out.setdefault(tags["Modality"], []).append(tags["SOPInstanceUID"])
    return out


def _jobs(port: int) -> list[dict]:
    r = requests.get(
        f"http://127.0.0.1:{port}/api/jobs?all=1",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    r.raise_for_status()
    return r.json()


def _wait(predicate, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except requests.RequestException:
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _serve(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "xbmd.cli", "serve", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=config.parent,
        env=env,
    )


@pytest.fixture(scope="module")
def served(orthanc, tmp_path_factory):
    """The scenario of the module docstring; yields what the tests check."""
    folder = tmp_path_factory.mktemp("serve")
    port = _free_port()
    config = _config(folder, orthanc, port)
    copies = [
        _named(c, PatientName=PATIENT_NAME, PatientID=PATIENT_ID)
        for c in radiograph_copies(SAMPLE, N_RADIOGRAPHS + 2, seed=11)
    ]
    radiographs = copies[:N_RADIOGRAPHS]
    chest = _named(copies[N_RADIOGRAPHS], BodyPartExamined="CHEST")
    ds = pydicom.dcmread(io.BytesIO(copies[N_RADIOGRAPHS + 1]))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # well-formed file, pixels missing
    corrupt = io.BytesIO()
    ds.save_as(corrupt, enforce_file_format=True)
    ids = {"chest": _store(orthanc, chest), "corrupt": _store(orthanc, corrupt.getvalue())}
    for data in radiographs:
        _store(orthanc, data)
    log = folder / "serve.log"
    first = _serve(config, log)
    try:
        _wait(lambda: any(j["status"] == "done" for j in _jobs(port)), "a first result")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        at_kill = {j["orthanc_id"]: j["status"] for j in _jobs_from_db(config)}
    finally:
        if first.poll() is None:
            first.kill()
    second = _serve(config, log)
    try:
        sources = [pydicom.dcmread(io.BytesIO(d)) for d in radiographs]

        def settled():
            jobs = _jobs(port)
            open_jobs = [j for j in jobs if j["status"] in ("pending", "running")]
            done = {j["sop_instance_uid"] for j in jobs if j["status"] == "done"}
            own = [j for j in jobs if "not a radiograph" in (j["reason"] or "")]
            everything = {s.SOPInstanceUID for s in sources} <= done
            return not open_jobs and everything and len(own) == 2 * N_RADIOGRAPHS and jobs

        jobs = _wait(settled, "every radiograph done after the restart")
        yield {
            "port": port,
            "process": second,
            "sources": sources,
            "jobs": jobs,
            "ids": ids,
            "at_kill": at_kill,
            "log": log,
            "config": config,
        }
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(30)


def _jobs_from_db(config: Path) -> list[dict]:
    from xbmd.pacs.jobs import JobQueue

    queue = JobQueue(load_config(config).database)
    try:
        return [vars(j) for j in queue.jobs(include_skipped=True)]
    finally:
        queue.close()


def test_a_kill_loses_nothing_and_duplicates_nothing(served, orthanc):
    """SIGKILL after the first result, restart: every radiograph has exactly one SR and one SC
    in its own study, with the deterministic UIDs the jobs recorded."""
    at_kill = served["at_kill"]
    done_at_kill = sum(s == "done" for s in at_kill.values())
    assert 1 <= done_at_kill < N_RADIOGRAPHS, "the kill came after everything was done"
    by_sop = {j["sop_instance_uid"]: j for j in served["jobs"]}
    for source in served["sources"]:
        outputs = _outputs_of_study(orthanc, source.StudyInstanceUID)
        job = by_sop[source.SOPInstanceUID]
        assert outputs.get("SR") == [job["sr_uid"]]
        assert outputs.get("OT") == [job["sc_uid"]]
        assert outputs.get("DX") == [source.SOPInstanceUID]


def test_sr_in_orthanc_matches_the_worklist(served, orthanc):
    auth = (orthanc.username, orthanc.password)
    for job in served["jobs"]:
        if job["status"] != "done":
            continue
        orthanc_id = requests.post(
            f"{orthanc.url}/tools/lookup", data=job["sr_uid"], auth=auth, timeout=30
        ).json()[0]["ID"]
        data = requests.get(f"{orthanc.url}/instances/{orthanc_id}/file", auth=auth, timeout=30)
        sr = pydicom.dcmread(io.BytesIO(data.content))
        assert sr.StudyInstanceUID == job["study_instance_uid"]
        assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
        hips = read_sr(sr)
        assert [h["side"] for h in hips] == [r["side"] for r in job["results"]]
        for hip, result in zip(hips, job["results"], strict=True):
            assert hip["bmd_g_cm2"] == pytest.approx(result["bmd_g_cm2"])
            assert hip["t_score"] == pytest.approx(result["t_score"])


def test_corrupt_and_non_hip_instances(served):
    by_id = {j["orthanc_id"]: j for j in served["jobs"]}
    corrupt, chest = by_id[served["ids"]["corrupt"]], by_id[served["ids"]["chest"]]
    assert corrupt["status"] == "failed" and "pixel data" in corrupt["reason"]
    assert chest["status"] == "skipped" and "CHEST is not a hip" in chest["reason"]
    own = [
        j for j in served["jobs"] if j["status"] == "skipped" and "not a radiograph" in j["reason"]
    ]
    assert len(own) == 2 * N_RADIOGRAPHS  # the service's own SRs and SCs, seen in the feed


def test_logs_name_no_patient(served):
    text = served["log"].read_text()
    assert "job 1 done" in text or "done: study" in text
    assert PATIENT_NAME not in text and "Doe" not in text and PATIENT_ID not in text


def test_worklist_refuses_without_the_token(served):
    base = f"http://127.0.0.1:{served['port']}"
    job = next(j for j in served["jobs"] if j["status"] == "done")
    for path in ("/", "/api/jobs", f"/job/{job['id']}", f"/job/{job['id']}/overlay.jpg", "/nope"):
        r = requests.get(base + path, timeout=10)
        assert r.status_code == 401, path
        assert "Bearer" in r.headers.get("www-authenticate", "")
        wrong = requests.get(base + path, headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert wrong.status_code == 401, path
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(base + f"/job/{job['id']}/overlay.jpg", headers=bearer).status_code == 200
    big = requests.post(base + "/login", data={"token": "x" * 10_000}, timeout=10)
    assert big.status_code == 413
    assert requests.post(base + "/login", data={"token": "wrong"}, timeout=10).status_code == 401
    page = requests.get(base + "/", headers=bearer, timeout=10)
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert PATIENT_NAME not in page.text and PATIENT_ID not in page.text


def _chromium(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        assert Path(binary).exists(), f"{binary} missing: `make test` installs chromium"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_worklist_in_chromium(served, tmp_path):
    """The page loads, shows the numbers of the processed studies, refuses without the token."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base = f"http://127.0.0.1:{served['port']}"
    done = [j for j in served["jobs"] if j["status"] == "done"]
    driver = _chromium(tmp_path)
    try:
        driver.set_page_load_timeout(30)
        driver.get(base + "/")
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "Token required" in body and "BMD" not in body
        assert not driver.find_elements(By.ID, "worklist")
        driver.get(base + "/login")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "submit").click()
        table = WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "worklist"))
        text = table.text
        for job in done:
            for hip in job["results"]:
                assert f"{hip['bmd_g_cm2']:.3f}" in text
                assert f"{hip['t_score']:+.1f}" in text
        assert "RESEARCH USE ONLY" in driver.find_element(By.TAG_NAME, "body").text
        shots = Path(os.environ.get("XBMD_SCREENSHOTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shots / "worklist.png"))
        driver.set_window_size(1400, 1500)
        driver.get(f"{base}/job/{done[0]['id']}")
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 4  # radiograph, overlay, two virtual X-rays
        for img in images:
            assert driver.execute_script("return arguments[0].naturalWidth", img) > 100
        detail = driver.find_element(By.TAG_NAME, "body").text
        assert f"{done[0]['results'][0]['bmd_g_cm2']:.3f}" in detail
        driver.save_screenshot(str(shots / "detail.png"))
        # logging out: the token is needed again
        driver.get(base + "/logout")
        driver.get(base + "/")
        assert "Token required" in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()


def test_sigterm_stops_the_service_cleanly(served):
    process = served["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    assert "stopped" in served["log"].read_text().splitlines()[-1]


# ------------------------------------------------------------------------------------------------
# Faults, in process: Orthanc away, a crash between storing the SC and the SR


@pytest.fixture(scope="module")
def service(orthanc, tmp_path_factory):
    from xbmd.pacs.service import Service

    folder = tmp_path_factory.mktemp("inproc")
    config = load_config(_config(folder, orthanc, _free_port(), backlog=False))
    svc = Service(config)
    yield svc
    svc.shutdown(timeout_s=30)


def test_orthanc_outage_jobs_wait_and_complete(service, orthanc, caplog):
    caplog.set_level(logging.WARNING, logger="xbmd.serve")
    copies = radiograph_copies(SAMPLE, 2, seed=22)
    service.poll_once()  # the feed position before these
    for data in copies:
        _store(orthanc, data)
    added, _ = service.poll_once()
    assert added == 2
    orthanc.halt()  # Orthanc gone with the jobs queued
    try:
        assert service.work_once()  # the job cannot fetch its instance: it waits
        assert service.queue.counts()["pending"] == 2
    finally:
        orthanc.start()
    assert any("unreachable" in r.getMessage() for r in caplog.records)
    service.start()  # the loops (threads) take it from here
    _wait(lambda: service.queue.counts()["done"] >= 2, "both jobs done after the outage", 120)
    for data in copies:
        source = pydicom.dcmread(io.BytesIO(data))
        outputs = _outputs_of_study(orthanc, source.StudyInstanceUID)
        assert len(outputs.get("SR", [])) == 1 and len(outputs.get("OT", [])) == 1


def test_a_crash_between_sc_and_sr_is_completed_once(service, orthanc, monkeypatch):
    """A job dies after storing the SC: redone, it stores the SR and not the SC again."""
    service.stop.set()  # the loops of the previous test end; this test drives the steps
    for t in service._threads:
        t.join(30)
    service.poll_once()
    (data,) = radiograph_copies(SAMPLE, 1, seed=33)
    _store(orthanc, data)
    service.poll_once()
    stored, real_store = [], service.orthanc.store

    def store_then_die(dicom: bytes):
        stored.append(pydicom.dcmread(io.BytesIO(dicom)).Modality)
        result = real_store(dicom)
        if len(stored) == 1:
            raise RuntimeError("killed after storing the SC")
        return result

    monkeypatch.setattr(service.orthanc, "store", store_then_die)
    deadline = time.monotonic() + 60
    while service.queue.counts()["pending"] and time.monotonic() < deadline:
        if not service.work_once():
            time.sleep(0.1)  # the redone job is due after a short delay
    source = pydicom.dcmread(io.BytesIO(data))
    outputs = _outputs_of_study(orthanc, source.StudyInstanceUID)
    assert stored == ["OT", "SR"]  # the SC once, then (redone) only the SR
    assert len(outputs["SR"]) == 1 and len(outputs["OT"]) == 1


def test_sandbox_is_gone_after_use(tmp_path):
    """The namespace and the link are removed, also when Orthanc is stopped from outside."""
    with OrthancSandbox(tmp_path) as sandbox:
        netns = sandbox.netns
        os.killpg(sandbox.process.pid, signal.SIGKILL)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert netns not in namespaces
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert sandbox.host_if not in links
