"""A small client of Orthanc's REST API (requests), for what the service needs.

- ``changes``: the change feed (``GET /changes?since=&limit=``), the new instances;
- ``tags``: an instance's main tags (``GET /instances/{id}/simplified-tags``);
- ``file``: its DICOM file (``GET /instances/{id}/file``);
- ``lookup``: whether a SOP Instance UID is stored (``POST /tools/lookup``);
- ``store``: store a DICOM file (``POST /instances``; Orthanc answers 'AlreadyStored' for a UID it
  has, so storing twice keeps one copy).

Orthanc's own REST API is used rather than DICOMweb (STOW-RS): it is always there (DICOMweb is a
plugin), it has the change feed and the UID lookup the service needs anyway, and one protocol
means one set of credentials and errors. Errors: ``OrthancUnavailable`` for what waiting can cure
(no connection, time-out, HTTP 5xx, 429), ``OrthancError`` for the rest (a 404: the instance was
deleted).
"""

from __future__ import annotations

import requests

from xbmd.errors import XbmdError


class OrthancError(XbmdError):
    """Orthanc refused a request (HTTP 4xx)."""


class OrthancUnavailable(OrthancError):
    """Orthanc cannot be reached now (connection, time-out, HTTP 5xx or 429): try later."""


class OrthancClient:
    def __init__(
        self,
        url: str,
        username: str | None = None,
        password: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if username is not None:
            self.session.auth = (username, password or "")
        self.session.trust_env = False  # no proxies from the environment for a local PACS

    def close(self) -> None:
        self.session.close()

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            response = self.session.request(
                method, f"{self.url}{path}", timeout=self.timeout_s, **kwargs
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise OrthancUnavailable(
                f"Orthanc at {self.url} unreachable ({type(exc).__name__})"
            ) from None
        if response.status_code >= 500 or response.status_code == 429:
            raise OrthancUnavailable(f"Orthanc {method} {path}: HTTP {response.status_code}")
        if response.status_code >= 400:
            raise OrthancError(f"Orthanc {method} {path}: HTTP {response.status_code}")
        return response

    def system(self) -> dict:
        return self._request("GET", "/system").json()

    def last_change(self) -> int:
        """The sequence number of the newest change."""
        return int(self._request("GET", "/changes", params={"last": ""}).json()["Last"])

    def changes(self, since: int, limit: int = 200) -> tuple[list[str], int, bool]:
        """(new instance ids, last sequence number, done) of the feed after ``since``."""
        body = self._request("GET", "/changes", params={"since": since, "limit": limit}).json()
        ids = [
            c["ID"]
            for c in body.get("Changes", [])
            if c.get("ChangeType") == "NewInstance" and c.get("ResourceType") == "Instance"
        ]
        return ids, int(body["Last"]), bool(body.get("Done", True))

    def tags(self, instance_id: str) -> dict:
        return self._request("GET", f"/instances/{instance_id}/simplified-tags").json()

    def file(self, instance_id: str) -> bytes:
        return self._request("GET", f"/instances/{instance_id}/file").content

    def lookup(self, sop_instance_uid: str) -> str | None:
        """The Orthanc id of the instance with this SOP Instance UID, or None."""
        found = self._request("POST", "/tools/lookup", data=sop_instance_uid).json()
        for item in found:
            if item.get("Type") == "Instance":
                return str(item["ID"])
        return None

    def store(self, dicom: bytes) -> tuple[str, str]:
        """(Orthanc id, status 'Success' or 'AlreadyStored') of a stored DICOM file."""
        body = self._request(
            "POST", "/instances", data=dicom, headers={"Content-Type": "application/dicom"}
        ).json()
        return str(body["ID"]), str(body.get("Status", ""))
