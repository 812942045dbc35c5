"""The one configuration file of ``xbmd serve`` (YAML), read and checked.

Example (docs/pacs.md has every setting)::

    orthanc:
      url: http://127.0.0.1:8042
      username: xbmd
      password_file: /etc/xbmd/orthanc-password
    state_dir: /var/lib/xbmd
    worklist:
      port: 8765
      token_file: /etc/xbmd/worklist-token

Secrets can be given inline (``password``, ``token``) or, better, as files readable only by the
service (``password_file``, ``token_file``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from xbmd.errors import InputError
from xbmd.io.inputs import InputFilter

MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class OrthancSettings:
    url: str
    username: str | None = None
    password: str | None = None
    timeout_s: float = 30.0


@dataclass(frozen=True)
class WorklistSettings:
    token: str
    host: str = "127.0.0.1"
    port: int = 8765
    max_body_bytes: int = 4096
    max_concurrent_requests: int = 16
    login_attempts_per_minute: int = 10


@dataclass(frozen=True)
class ServiceConfig:
    orthanc: OrthancSettings
    worklist: WorklistSettings
    state_dir: Path
    model: Path | None = None
    reference: str | None = None
    site_calibration: Path | None = None
    filters: InputFilter = field(default_factory=InputFilter)
    backlog: bool = False
    store: bool = True
    workers: int = 1
    torch_threads: int = 2
    poll_interval_s: float = 1.0
    max_attempts: int = 3
    retry_max_delay_s: float = 10.0
    source: str = "config"

    @property
    def database(self) -> Path:
        return self.state_dir / "jobs.sqlite"


_TOP = {
    "orthanc", "worklist", "state_dir", "model", "reference", "site_calibration", "filters",
    "backlog", "store", "workers", "torch_threads", "poll_interval_s", "max_attempts",
    "retry_max_delay_s",
}  # fmt: skip


def _secret(section: dict, key: str, where: str, base: Path) -> str | None:
    if section.get(key) is not None and section.get(f"{key}_file") is not None:
        raise InputError(f"{where}: give {key} or {key}_file, not both")
    if section.get(f"{key}_file") is not None:
        path = base / str(section[f"{key}_file"])
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise InputError(f"{where}: cannot read {key}_file {path} ({exc.strerror})") from None
    value = section.get(key)
    return None if value is None else str(value)


def load_config(path: str | Path) -> ServiceConfig:
    """Read and check the configuration file; InputError naming the file and the setting."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a configuration file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; a configuration is a YAML file") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of settings")
    unknown = set(raw) - _TOP
    if unknown:
        raise InputError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    base = path.parent
    orthanc = raw.get("orthanc")
    if not isinstance(orthanc, dict) or not orthanc.get("url"):
        raise InputError(f"{path}: orthanc.url is missing")
    worklist = raw.get("worklist") or {}
    if not isinstance(worklist, dict):
        raise InputError(f"{path}: worklist must be a mapping of settings (port, token_file...)")
    token = _secret(worklist, "token", str(path), base)
    if token is None or len(token) < MIN_TOKEN_CHARS:
        raise InputError(
            f"{path}: worklist.token (or token_file) must hold at least {MIN_TOKEN_CHARS} "
            "characters"
        )
    try:
        filters = InputFilter.from_dict(raw.get("filters"))
        config = ServiceConfig(
            orthanc=OrthancSettings(
                url=str(orthanc["url"]).rstrip("/"),
                username=orthanc.get("username"),
                password=_secret(orthanc, "password", str(path), base),
                timeout_s=float(orthanc.get("timeout_s", 30.0)),
            ),
            worklist=WorklistSettings(
                token=token,
                host=str(worklist.get("host", "127.0.0.1")),
                port=int(worklist.get("port", 8765)),
                max_body_bytes=int(worklist.get("max_body_bytes", 4096)),
                max_concurrent_requests=int(worklist.get("max_concurrent_requests", 16)),
                login_attempts_per_minute=int(worklist.get("login_attempts_per_minute", 10)),
            ),
            state_dir=base / str(raw.get("state_dir", "xbmd_state")),
            model=None if raw.get("model") is None else base / str(raw["model"]),
            reference=raw.get("reference"),
            site_calibration=(
                None if raw.get("site_calibration") is None else base / str(raw["site_calibration"])
            ),
            filters=filters,
            backlog=bool(raw.get("backlog", False)),
            store=bool(raw.get("store", True)),
            workers=int(raw.get("workers", 1)),
            torch_threads=int(raw.get("torch_threads", 2)),
            poll_interval_s=float(raw.get("poll_interval_s", 1.0)),
            max_attempts=int(raw.get("max_attempts", 3)),
            retry_max_delay_s=float(raw.get("retry_max_delay_s", 10.0)),
            source=str(path),
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: {exc}") from None
    extra_keys = set(orthanc) - {"url", "username", "password", "password_file", "timeout_s"}
    extra_keys |= {f"worklist.{k}" for k in worklist} - {
        f"worklist.{k}" for k in (*WorklistSettings.__dataclass_fields__, "token_file")
    }
    if extra_keys:
        raise InputError(f"{path}: unknown settings {', '.join(sorted(extra_keys))}")
    if config.workers < 1 or config.poll_interval_s <= 0 or config.max_attempts < 1:
        raise InputError(f"{path}: workers and max_attempts must be >= 1, poll_interval_s > 0")
    if not 1 <= config.worklist.port <= 65535:
        raise InputError(f"{path}: worklist.port {config.worklist.port} is not 1-65535")
    if config.model is not None and not config.model.is_file():
        raise InputError(f"{path}: model {config.model} is not a file")
    if config.site_calibration is not None and not config.site_calibration.is_file():
        raise InputError(f"{path}: site_calibration {config.site_calibration} is not a file")
    return config
