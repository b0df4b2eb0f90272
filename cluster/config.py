"""Node configuration: a TOML file per node (`quorumbook node run --config FILE`).

Secrets never sit in the config or on a command line: the Raft password comes from
`password_file` (mode 0600) or the `QUORUMBOOK_RAFT_PASSWORD` environment variable.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

PASSWORD_ENV = "QUORUMBOOK_RAFT_PASSWORD"

# Set by a launcher that wants its nodes to stop when it is gone (see LocalCluster).
EXIT_WITH_PARENT_ENV = "QB_EXIT_WITH_PARENT"


class ConfigError(ValueError):
    """A node configuration that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Peer:
    id: str
    raft_addr: str
    api_url: str


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    raft_addr: str
    api_host: str
    api_port: int
    data_dir: Path
    peers: tuple[Peer, ...]
    password_file: Path | None = None
    admin_key_file: Path | None = None
    api_master_file: Path | None = None  # derives API key secrets; same file on every node
    election_timeout_min_s: float = 0.15
    election_timeout_max_s: float = 0.30
    append_entries_period_s: float = 0.04
    leader_fallback_timeout_s: float = 0.75
    compaction_min_entries: int = 5000
    compaction_min_time_s: float = 300.0
    batch_window_s: float = 0.0
    batch_max: int = 1000
    batch_max_in_flight: int = 2
    submit_timeout_s: float = 5.0
    # [api]: HTTPS (and wss) when both files are given; per-key rate limits (0 = none);
    # /readyz's allowed lag between the commit and applied Raft indexes.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    rate_limit_per_s: float = 200.0
    rate_limit_burst: int = 400
    admin_rate_limit_per_s: float = 0.0
    admin_rate_limit_burst: int = 400
    ready_max_lag_entries: int = 100
    extra: dict = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @property
    def api_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.api_host}:{self.api_port}"

    def read_api_master(self) -> str | None:
        if self.api_master_file is None:
            return None
        path = self.api_master_file
        if not path.exists():
            raise ConfigError(f"api_master_file {path} does not exist")
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise ConfigError(
                f"api_master_file {path} must not be readable by group/others (chmod 600)"
            )
        return path.read_text().strip()

    def read_password(self) -> str:
        password = os.environ.get(PASSWORD_ENV)
        if not password and self.password_file is not None:
            path = self.password_file
            if not path.exists():
                raise ConfigError(f"password_file {path} does not exist")
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                raise ConfigError(
                    f"password_file {path} must not be readable by group/others (chmod 600)"
                )
            password = path.read_text().strip()
        if not password:
            raise ConfigError(
                f"a Raft password is mandatory: set password_file in the config or {PASSWORD_ENV}"
            )
        return password


API_SETTINGS = (
    "rate_limit_per_s",
    "rate_limit_burst",
    "admin_rate_limit_per_s",
    "admin_rate_limit_burst",
    "ready_max_lag_entries",
)


def load(path: Path) -> NodeConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    try:
        raft = raw.get("raft", {})
        api = raw.get("api", {})
        base = Path(path).resolve().parent
        peers = tuple(Peer(p["id"], p["raft_addr"], p["api_url"]) for p in raw.get("peers", []))
        timings = {
            k: raft[k]
            for k in (
                "election_timeout_min_s",
                "election_timeout_max_s",
                "append_entries_period_s",
                "leader_fallback_timeout_s",
                "compaction_min_entries",
                "compaction_min_time_s",
            )
            if k in raft
        }
        batching = {
            k: raw["batch"][k]
            for k in (
                "batch_window_s",
                "batch_max",
                "batch_max_in_flight",
                "submit_timeout_s",
            )
            if k in raw.get("batch", {})
        }
        if (
            not isinstance(batching.get("batch_max_in_flight", 1), int)
            or batching.get("batch_max_in_flight", 1) < 1
        ):
            raise ConfigError(f"config {path}: [batch] batch_max_in_flight must be an integer >= 1")
        api_settings = {k: api[k] for k in API_SETTINGS if k in api}
        tls = {k: (base / api[k]).resolve() for k in ("tls_cert_file", "tls_key_file") if k in api}
        if len(tls) == 1:
            raise ConfigError(f"config {path}: [api] needs both tls_cert_file and tls_key_file")
        for name, value in api_settings.items():
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"config {path}: [api] {name} must be a number >= 0")
        for rate, burst in (
            ("rate_limit_per_s", "rate_limit_burst"),
            ("admin_rate_limit_per_s", "admin_rate_limit_burst"),
        ):
            if api_settings.get(rate, 1) > 0 and api_settings.get(burst, 1) < 1:
                raise ConfigError(f"config {path}: [api] {burst} must be >= 1 when {rate} > 0")
        return NodeConfig(
            node_id=raw["node_id"],
            raft_addr=raft["addr"],
            api_host=api.get("host", "127.0.0.1"),
            api_port=int(api["port"]),
            data_dir=(base / raw["data_dir"]).resolve(),
            peers=peers,
            password_file=(base / raw["password_file"]).resolve()
            if "password_file" in raw
            else None,
            admin_key_file=(base / raw["admin_key_file"]).resolve()
            if "admin_key_file" in raw
            else None,
            api_master_file=(base / raw["api_master_file"]).resolve()
            if "api_master_file" in raw
            else None,
            **timings,
            **batching,
            **api_settings,
            **tls,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"config {path}: missing or bad setting {exc}") from exc


def dump(config: NodeConfig) -> str:
    """TOML text for a config (paths written as given)."""
    lines = [
        f'node_id = "{config.node_id}"',
        f'data_dir = "{config.data_dir}"',
    ]
    if config.password_file is not None:
        lines.append(f'password_file = "{config.password_file}"')
    if config.admin_key_file is not None:
        lines.append(f'admin_key_file = "{config.admin_key_file}"')
    if config.api_master_file is not None:
        lines.append(f'api_master_file = "{config.api_master_file}"')
    lines += [
        "",
        "[raft]",
        f'addr = "{config.raft_addr}"',
        f"election_timeout_min_s = {config.election_timeout_min_s}",
        f"election_timeout_max_s = {config.election_timeout_max_s}",
        f"append_entries_period_s = {config.append_entries_period_s}",
        f"leader_fallback_timeout_s = {config.leader_fallback_timeout_s}",
        f"compaction_min_entries = {config.compaction_min_entries}",
        f"compaction_min_time_s = {config.compaction_min_time_s}",
        "",
        "[api]",
        f'host = "{config.api_host}"',
        f"port = {config.api_port}",
        *(f"{k} = {getattr(config, k)}" for k in API_SETTINGS),
        *(
            f'{k} = "{getattr(config, k)}"'
            for k in ("tls_cert_file", "tls_key_file")
            if getattr(config, k) is not None
        ),
        "",
        "[batch]",
        f"batch_window_s = {config.batch_window_s}",
        f"batch_max = {config.batch_max}",
        f"batch_max_in_flight = {config.batch_max_in_flight}",
        f"submit_timeout_s = {config.submit_timeout_s}",
    ]
    for peer in config.peers:
        lines += [
            "",
            "[[peers]]",
            f'id = "{peer.id}"',
            f'raft_addr = "{peer.raft_addr}"',
            f'api_url = "{peer.api_url}"',
        ]
    return "\n".join(lines) + "\n"
