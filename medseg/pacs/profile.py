"""PACS server profiles (YAML): addresses, AE titles, timeouts, retries and where credentials come from.

A profile names one PACS and how medseg talks to it::

    name: hospital-pacs
    protocol: dicomweb            # query/retrieve with dicomweb or dimse (default: dicomweb if configured)
    dicomweb:
      url: https://pacs.example.org/dicom-web
      auth: {type: bearer, token_file: ~/.config/medseg/pacs.token}
      verify_tls: true            # or the path of a CA bundle; false only for testing
      connect_timeout_s: 10
      read_timeout_s: 120
      retries: 3                  # per request, with exponential backoff (urllib3 Retry)
      backoff_s: 0.5
    dimse:
      host: pacs.example.org
      port: 104
      called_aet: PACS
      calling_aet: MEDSEG
      retrieve: get               # or move (needs move_aet/move_port known to the PACS)
    listener: {aet: MEDSEG, bind: 0.0.0.0, port: 11112, quiet_s: 30}
    store: {protocol: dicomweb}   # where results go (pacs run --store, medseg listen)

Credentials are never written in the profile and never accepted on the command line: a
password or token is read from an environment variable (``password_env``/``token_env``) or a
file (``password_file``/``token_file``, which must not be readable by other users).  Token
files are re-read when they change, so rotating tokens work in a long-running listener.
Secrets never appear in ``repr``, error messages or logs.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from medseg.errors import ConfigError
from medseg.types import PathLike

__all__ = [
    "AuthConfig",
    "DicomWebConfig",
    "DimseConfig",
    "ListenerConfig",
    "PacsProfile",
    "StoreConfig",
    "load_profile",
    "parse_profile",
    "read_secret",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash, 1-16 chars
_SECRET_KEYS = ("password", "token", "secret", "api_key", "apikey")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_ae(value: str, what: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value):
        raise ValueError(f"{what} must be 1-16 printable ASCII characters without backslash")
    return value


class AuthConfig(_Strict):
    """How to authenticate to a DICOMweb server."""

    type: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password_env: str | None = Field(default=None, description="environment variable holding the password")
    password_file: str | None = Field(default=None, description="file holding the password (not world-readable)")
    token_env: str | None = Field(default=None, description="environment variable holding the bearer token")
    token_file: str | None = Field(default=None, description="file holding the bearer token (re-read on change)")

    @model_validator(mode="after")
    def _complete(self) -> AuthConfig:
        if self.type == "basic":
            if not self.username:
                raise ValueError("basic auth needs a username")
            if (self.password_env is None) == (self.password_file is None):
                raise ValueError("basic auth needs exactly one of password_env or password_file")
        if self.type == "bearer" and (self.token_env is None) == (self.token_file is None):
            raise ValueError("bearer auth needs exactly one of token_env or token_file")
        return self


class DicomWebConfig(_Strict):
    """A DICOMweb (QIDO-RS / WADO-RS / STOW-RS) endpoint."""

    url: str
    qido_prefix: str | None = None
    wado_prefix: str | None = None
    stow_prefix: str | None = None
    auth: AuthConfig = AuthConfig()
    verify_tls: bool | str = Field(default=True, description="true, false (testing only) or a CA bundle path")
    client_cert: str | None = Field(default=None, description="client certificate (PEM) for mutual TLS")
    client_key: str | None = None
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=120.0, gt=0)
    retries: int = Field(default=3, ge=0, le=20)
    backoff_s: float = Field(default=0.5, ge=0)
    page_size: int = Field(default=500, ge=1, description="QIDO-RS results per request (limit/offset paging)")
    max_results: int = Field(default=100000, ge=1, description="stop paging after this many results")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        if parts.username or parts.password:
            raise ValueError("must not contain credentials; use the auth section")
        if parts.query or parts.fragment:
            raise ValueError("must not contain a query string or fragment")
        return value.rstrip("/")


class DimseConfig(_Strict):
    """A DIMSE (DICOM network protocol) peer."""

    host: str
    port: int = Field(ge=1, le=65535)
    called_aet: str = "ANY-SCP"
    calling_aet: str = "MEDSEG"
    retrieve: Literal["get", "move"] = "get"
    move_aet: str | None = Field(default=None, description="C-MOVE destination AE title (default: calling_aet)")
    move_bind: str = Field(default="127.0.0.1", description="address the temporary C-MOVE storage SCP binds to")
    move_port: int | None = Field(default=None, ge=1, le=65535, description="port the PACS sends C-MOVE data to")
    connect_timeout_s: float = Field(default=10.0, gt=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=120.0, gt=0)
    network_timeout_s: float = Field(default=120.0, gt=0)
    retries: int = Field(default=2, ge=0, le=20, description="association attempts after the first")
    backoff_s: float = Field(default=1.0, ge=0)
    max_results: int = Field(default=100000, ge=1)

    @field_validator("called_aet", "calling_aet", "move_aet")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae(value, "an AE title")

    @model_validator(mode="after")
    def _move(self) -> DimseConfig:
        if self.retrieve == "move" and self.move_port is None:
            raise ValueError("retrieve: move needs move_port (the port the PACS knows for move_aet)")
        return self


class ListenerConfig(_Strict):
    """``medseg listen``: the C-STORE SCP receiving pushed series."""

    aet: str = "MEDSEG"
    bind: str = Field(default="127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(default=11112, ge=1, le=65535)
    quiet_s: float = Field(default=30.0, gt=0, description="a series is complete after this long without new data")
    poll_s: float = Field(default=1.0, gt=0)
    allowed_aets: list[str] | None = Field(default=None, description="calling AE titles accepted (default: any)")

    @field_validator("aet")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae(value, "listener.aet")

    @field_validator("allowed_aets")
    @classmethod
    def _aes(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_check_ae(v, "allowed_aets entries") for v in value]


class StoreConfig(_Strict):
    """Where results (DICOM SEG, RTSTRUCT) are sent."""

    protocol: Literal["dicomweb", "dimse"] | None = None


class PacsProfile(_Strict):
    """One PACS: DICOMweb and/or DIMSE endpoints, the listener and the store destination."""

    name: str = ""
    protocol: Literal["dicomweb", "dimse"] | None = None
    dicomweb: DicomWebConfig | None = None
    dimse: DimseConfig | None = None
    listener: ListenerConfig = ListenerConfig()
    store: StoreConfig = StoreConfig()
    _source: str = PrivateAttr(default="<memory>")
    _base_dir: str = PrivateAttr(default=".")

    @model_validator(mode="after")
    def _endpoints(self) -> PacsProfile:
        if self.dicomweb is None and self.dimse is None:
            raise ValueError("a profile needs a dicomweb or a dimse section")
        for what, choice in (("protocol", self.protocol), ("store.protocol", self.store.protocol)):
            if choice is not None and getattr(self, choice) is None:
                raise ValueError(f"{what} is {choice} but the profile has no {choice} section")
        return self

    @property
    def source(self) -> str:
        """The file the profile was read from."""
        return self._source

    @property
    def label(self) -> str:
        """How messages name this PACS."""
        return self.name or Path(self.source).stem

    @property
    def query_protocol(self) -> Literal["dicomweb", "dimse"]:
        """Protocol for query and retrieve."""
        return self.protocol or ("dicomweb" if self.dicomweb is not None else "dimse")

    @property
    def store_protocol(self) -> Literal["dicomweb", "dimse"]:
        """Protocol for storing results."""
        return self.store.protocol or self.query_protocol

    def path(self, value: str) -> Path:
        """A path of the profile (``~`` expanded, relative to the profile's folder)."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self._base_dir) / p


# --------------------------------------------------------------------- secrets
def read_secret(profile: PacsProfile, *, env: str | None, file: str | None, what: str) -> str:
    """Read a password or token from an environment variable or a file.

    Args:
        profile: The profile (for messages and relative paths).
        env: Environment variable name.
        file: Secret file (must not be readable by other users).
        what: Which setting asked (``"dicomweb.auth.token_env"``) for messages.

    Raises:
        ConfigError: Unset variable, unreadable or world-readable file, empty secret.
    """
    where = f"{profile.source}: {what}"
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{where}: environment variable {env} is not set")
    else:
        assert file is not None
        path = profile.path(file)
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IROTH | stat.S_IWOTH):
                raise ConfigError(f"{where}: {path} is accessible to other users (chmod o-rwx {path})")
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path} ({exc.strerror or exc})") from None
    if not value.strip():
        raise ConfigError(f"{where}: the secret is empty")
    return value.strip()


class TokenSource:
    """A bearer token from an environment variable or a file, re-read when the file changes."""

    def __init__(self, profile: PacsProfile, *, env: str | None, file: str | None, what: str) -> None:
        self._profile, self._env, self._file, self._what = profile, env, file, what
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._token = read_secret(profile, env=env, file=file, what=what)
        if file is not None:
            st = profile.path(file).stat()
            self._stamp = (st.st_mtime_ns, st.st_size)

    def __call__(self) -> str:
        if self._file is None:
            return self._token
        with self._lock:
            try:
                st = self._profile.path(self._file).stat()
            except OSError:
                return self._token
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                self._token = read_secret(self._profile, env=None, file=self._file, what=self._what)
                self._stamp = (st.st_mtime_ns, st.st_size)
            return self._token

    def __repr__(self) -> str:
        return "TokenSource(<redacted>)"


def token_source(profile: PacsProfile, auth: AuthConfig, what: str) -> Callable[[], str]:
    """A callable giving the current bearer token."""
    return TokenSource(profile, env=auth.token_env, file=auth.token_file, what=f"{what}.token")


# ---------------------------------------------------------------------- loading
def _secret_keys(data: Any, prefix: str = "") -> list[str]:
    """Keys holding inline secrets (``password: ...``) anywhere in the document."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            name = f"{prefix}{key}"
            lowered = str(key).lower()
            if lowered in _SECRET_KEYS:
                found.append(name)
            found += _secret_keys(value, name + ".")
    return found


def _format(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "<root>"
        lines.append(f"  {key}: {err['msg']}")  # never echo input values: they may be secrets
    return f"{source}: invalid PACS profile\n" + "\n".join(lines)


def parse_profile(data: Any, *, source: str = "<memory>", base_dir: PathLike = ".") -> PacsProfile:
    """Validate a profile document.

    Raises:
        ConfigError: Unknown keys, bad values, inline secrets; the message names the key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a PACS profile is a mapping (dicomweb:, dimse:, listener:, store:)")
    inline = _secret_keys(data)
    if inline:
        raise ConfigError(
            f"{source}: {', '.join(inline)}: secrets must not be written in the profile; use password_env /"
            " password_file or token_env / token_file"
        )
    try:
        profile = PacsProfile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(source, exc)) from None
    profile._source = source
    profile._base_dir = str(base_dir)
    return profile


def load_profile(path: PathLike) -> PacsProfile:
    """Read a PACS profile YAML file.

    Raises:
        ConfigError: Unreadable file, invalid YAML or invalid profile.
    """
    from medseg.io.safe_yaml import load_yaml_file

    p = Path(path).expanduser()
    data = load_yaml_file(p, what="PACS profile")
    return parse_profile(data, source=str(p), base_dir=p.resolve().parent)
