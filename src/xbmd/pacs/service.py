"""``xbmd serve``: Orthanc's new radiographs -> queue -> estimate -> SR and SC back into Orthanc.

Threads of one process (all loops wait on one stop event, so SIGTERM ends them within a poll
interval, and a job in progress is finished or, if killed, redone at the next start):

- the poller reads Orthanc's change feed and queues every new instance (``jobs.JobQueue``);
- ``workers`` workers take jobs: the instance's tags are checked against the filters (SOP Class,
  Modality, Body Part, View Position; others are 'skipped' with the reason), the file is fetched,
  estimated (``xbmd.estimation.estimator.Estimator``), its SR and SC made
  (``xbmd.pacs.outputs``), the worklist's images written, and the SC then the SR stored into
  Orthanc, each only if Orthanc does not have its (deterministic) UID yet;
- the worklist (``xbmd.pacs.web``) is served by uvicorn in the main thread.

Errors: Orthanc unavailable -> the job waits (retried with a growing delay up to
``retry_max_delay_s``, not counted as an attempt); unusable input (a corrupt file, no hip found)
-> 'failed' with the reason, at once; anything else -> retried, 'failed' after ``max_attempts``.

Logs name jobs by their id and UIDs, never by patient name or id.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from xbmd.errors import XbmdError
from xbmd.pacs.config import ServiceConfig
from xbmd.pacs.jobs import Job, JobQueue
from xbmd.pacs.orthanc import OrthancClient, OrthancError, OrthancUnavailable

log = logging.getLogger("xbmd.serve")

#: DICOM keywords of the source recorded on the job (never the patient's name or id)
_ID_TAGS = {
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "accession_number": "AccessionNumber",
    "study_date": "StudyDate",
}
FEED_BATCH = 200


class Service:
    """The loops of ``xbmd serve`` around one queue, one Orthanc client and one estimator."""

    def __init__(self, config: ServiceConfig, estimator=None) -> None:
        self.config = config
        self.queue = JobQueue(config.database)
        self.orthanc = OrthancClient(
            config.orthanc.url,
            config.orthanc.username,
            config.orthanc.password,
            config.orthanc.timeout_s,
        )
        self.stop = threading.Event()
        self._estimator = estimator
        self._estimator_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.images_dir = config.state_dir / "jobs"
        self.tmp_dir = config.state_dir / "tmp"

    # ---- set-up

    @property
    def estimator(self):
        with self._estimator_lock:
            if self._estimator is None:
                import torch

                from xbmd.estimation.estimator import Estimator
                from xbmd.tscore import DEFAULT_REFERENCE

                torch.set_num_threads(self.config.torch_threads)
                self._estimator = Estimator(
                    self.config.model,
                    reference=self.config.reference or DEFAULT_REFERENCE,
                    site_calibration=self.config.site_calibration,
                )
            return self._estimator

    @property
    def model_id(self) -> str:
        from xbmd.pacs.uids import model_identity

        return model_identity(self.estimator.model_info)

    def start(self) -> None:
        """Recover interrupted jobs, load the model, start the poller and the workers."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        recovered = self.queue.recover()
        if recovered:
            log.info("%d interrupted jobs back in the queue", recovered)
        _ = self.estimator  # load before taking jobs
        log.info("model %s loaded", self.model_id)
        self._threads = [threading.Thread(target=self._poll_loop, name="poller", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work_loop, name=f"worker-{k}", daemon=True)
            for k in range(self.config.workers)
        ]
        for t in self._threads:
            t.start()

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop the loops, let a job in progress finish (bounded), close the queue."""
        self.stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("still busy at shutdown (redone at the next start): %s", ", ".join(alive))
        self.orthanc.close()
        if not alive:
            self.queue.close()

    # ---- the change feed

    def poll_once(self) -> tuple[int, bool]:
        """Read one batch of the change feed; (jobs added, feed read to its end)."""
        since = self.queue.last_seq()
        if since is None:
            since = 0 if self.config.backlog else self.orthanc.last_change()
            self.queue.add_from_feed([], since)
            log.info("change feed: starting after change %d", since)
        ids, last, done = self.orthanc.changes(since, FEED_BATCH)
        added = self.queue.add_from_feed(ids, last) if last != since or ids else 0
        if added:
            log.info("%d new instances queued (feed at %d)", added, last)
        return added, done

    def _poll_loop(self) -> None:
        delay = self.config.poll_interval_s
        while not self.stop.is_set():
            try:
                _, done = self.poll_once()
                delay = self.config.poll_interval_s
            except OrthancUnavailable as exc:
                log.warning("change feed: %s; retrying in %.0f s", exc, delay)
                done, delay = True, min(delay * 2, self.config.retry_max_delay_s)
            except Exception:  # a service loop logs and goes on
                log.exception("change feed: unexpected error")
                done = True
            if done:
                self.stop.wait(delay)

    # ---- jobs

    def _work_loop(self) -> None:
        while not self.stop.is_set():
            if not self.work_once():
                self.stop.wait(min(0.2, self.config.poll_interval_s))

    def work_once(self) -> bool:
        """Take one due job and process it; False when none was due."""
        job = self.queue.claim()
        if job is None:
            return False
        try:
            self.process(job)
        except OrthancUnavailable as exc:
            delay = min(2.0 ** min(job.attempts, 10), self.config.retry_max_delay_s)
            log.warning("job %d: %s; waiting %.0f s", job.id, exc, delay)
            self.queue.retry_later(job.id, delay, str(exc), count=False)
        except (XbmdError, OrthancError) as exc:  # unusable input, deleted instance
            log.info("job %d failed: %s", job.id, exc)
            self.queue.finish(job.id, "failed", reason=str(exc))
        except Exception as exc:  # one job's bug must not stop the service
            log.exception("job %d: unexpected error", job.id)
            if job.attempts + 1 >= self.config.max_attempts:
                self.queue.finish(job.id, "failed", reason=f"{type(exc).__name__}: {exc}")
            else:
                self.queue.retry_later(job.id, 1.0, f"{type(exc).__name__}: {exc}", count=True)
        return True

    def process(self, job: Job) -> None:
        """Filter, estimate, make and store the SR and SC of one job (module docstring)."""
        from xbmd.pacs.outputs import dicom_outputs, read_header, to_bytes
        from xbmd.pacs.uids import output_uids

        tags = self.orthanc.tags(job.orthanc_id)
        ids = {key: _text(tags.get(keyword)) for key, keyword in _ID_TAGS.items()}
        self.queue.describe(job.id, ids)
        why = self.config.filters.reason(tags)
        if why is not None:
            self.queue.finish(job.id, "skipped", reason=why)
            log.debug("job %d (%s) skipped: %s", job.id, ids["sop_instance_uid"], why)
            return
        study, sop = ids["study_instance_uid"], ids["sop_instance_uid"]
        if not study or not sop:
            raise XbmdError("the instance has no Study or SOP Instance UID")
        _, sr_uid = output_uids(study, sop, self.model_id, "sr")
        if job.results is not None and self.orthanc.lookup(sr_uid):
            self.queue.finish(job.id, "done", results=job.results, sr_uid=sr_uid)
            return
        data = self.orthanc.file(job.orthanc_id)
        path = self.tmp_dir / f"job{job.id}.dcm"
        path.write_bytes(data)
        try:
            results = self.estimator.estimate(path)
        except XbmdError as exc:  # the message names the temporary file: say the job instead
            raise type(exc)(str(exc).replace(f"{path}: ", "")) from None
        finally:
            path.unlink(missing_ok=True)
        for r in results:
            r.image = f"orthanc:{job.orthanc_id}"
        outputs = dicom_outputs(read_header(data), results)
        self._write_images(job.id, results, outputs.overlay_rgb)
        dicts = [_slim(r.to_dict()) for r in results]
        if self.config.store:
            for dataset in (outputs.sc, outputs.sr):  # the SR last: its presence means complete
                uid = str(dataset.SOPInstanceUID)
                if self.orthanc.lookup(uid) is None:
                    self.orthanc.store(to_bytes(dataset))
        self.queue.finish(
            job.id, "done", results=dicts, sr_uid=outputs.sr_uid, sc_uid=outputs.sc_uid
        )
        log.info(
            "job %d done: study %s instance %s -> SR %s (%.2f s after it was seen)",
            job.id,
            study,
            sop,
            outputs.sr_uid,
            time.time() - job.received_at,
        )

    def _write_images(self, job_id: int, results: list, overlay) -> None:
        """The worklist's images of a job (``web.IMAGES``): the radiograph and the overlay as
        JPEG previews (4 ms against 50 ms for PNG; the lossless overlay is the SC in PACS), each
        hip's virtual X-ray as PNG."""
        from PIL import Image

        from xbmd.pacs.render import radiograph_display, render_virtual_xray

        folder = self.images_dir / str(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        grey, _ = radiograph_display(results[0].xray.pixels)
        images = {"radiograph.jpg": grey, "overlay.jpg": overlay}
        for r in results:
            images[f"virtual_xray_{r.side}.png"] = render_virtual_xray(r)
        for name, pixels in images.items():
            tmp = folder / f".{name}"
            if name.endswith(".jpg"):
                Image.fromarray(pixels).save(tmp, format="JPEG", quality=92)
            else:
                Image.fromarray(pixels).save(tmp, format="PNG", compress_level=1)
            tmp.replace(folder / name)


def _text(value) -> str | None:
    return None if value in (None, "") else str(value)


def _slim(result: dict) -> dict:
    """A result for the queue and the worklist: no file paths, no affines."""
    drop = {"crop_to_image", "model_to_image", "head_px", "image"}
    return {k: v for k, v in result.items() if k not in drop and not k.endswith(("_npy", "_png"))}


# ------------------------------------------------------------------------------------------------
# The process


def serve(config: ServiceConfig, estimator=None) -> None:
    """Run the service until SIGTERM or SIGINT: worklist in the foreground, loops in threads."""
    import uvicorn

    from xbmd.pacs.web import create_app

    service = Service(config, estimator)
    service.start()
    app = create_app(service.queue, config.worklist, service.images_dir)
    server = _Server(
        uvicorn.Config(
            app,
            host=config.worklist.host,
            port=config.worklist.port,
            limit_concurrency=config.worklist.max_concurrent_requests,
            log_level="warning",
            access_log=False,
            server_header=False,
        )
    )

    def stop(signum, _frame) -> None:
        log.info("signal %d: stopping", signum)
        server.should_exit = True
        service.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "worklist on http://%s:%d, Orthanc %s",
        config.worklist.host,
        config.worklist.port,
        config.orthanc.url,
    )
    try:
        server.run()
    finally:
        service.shutdown()
    log.info("stopped")


def _server_class():
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its own signal handling: ``serve`` handles SIGTERM and SIGINT (and
        then stops the loops and returns, instead of re-raising the signal)."""

        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server


def _Server(config):  # a lazily built class
    return _server_class()(config)
