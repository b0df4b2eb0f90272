"""Node configuration: a TOML file per node (`quorumbook node run --config FILE`).

The Structs below are the file, one per table: the top level, `[raft]`, `[api]`, `[batch]`,
`[ws]`, `[indexer]`, `[archive]` and `[[peers]]`. Loading refuses an unknown key or a value of the wrong type with a
`ConfigError` that names the file and the key. Each default is declared once: by the
component that uses it (`RaftSettings`, `RateLimits`, `api.ws.Settings`) and read from
there, or here (`[batch]`: `Replica`'s keyword defaults are held equal to it by a test).
docs/reference/config.md lists every key with its default, and tests/cluster/test_config.py
holds the two together. Relative paths are relative to the config file's directory.

Secrets never sit in the config or on a command line: the Raft password comes from
`password_file` (mode 0600) or the `QUORUMBOOK_RAFT_PASSWORD` environment variable.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec
import tomli_w

from api.app import READY_MAX_LAG_ENTRIES
from api.auth import AuthError, Credentials, read_secret_file
from api.rate_limit import RateLimits
from api.sdk import read_credentials
from api.ws import ENV_PREFIX as WS_ENV_PREFIX  # QB_WS_<KEY> overrides [ws] <key>
from api.ws import Settings as WsSettings

from .raft import RaftSettings

PASSWORD_ENV = "QUORUMBOOK_RAFT_PASSWORD"

# Set by a launcher that wants its nodes to stop when it is gone (see LocalCluster).
EXIT_WITH_PARENT_ENV = "QB_EXIT_WITH_PARENT"

Name = Annotated[str, msgspec.Meta(min_length=1)]
ClusterId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
SecondsOrZero = Annotated[float, msgspec.Meta(ge=0)]
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
NotNegative = Annotated[int, msgspec.Meta(ge=0)]
RatePerS = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class ConfigError(ValueError):
    """A node configuration that cannot be used; the message says what to fix."""


# Every table below refuses unknown keys (forbid_unknown_fields) and is written without the
# keys left at their default (omit_defaults).


class Peer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One `[[peers]]` entry: another member, as this node starts with it."""

    id: Name
    raft_addr: Name
    api_url: Name


class Raft(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """`[raft]`: the keys other than `addr` are `RaftSettings` fields, defaults and all."""

    addr: Name  # this node's Raft address, "host:port"
    election_timeout_min_s: Seconds = RaftSettings.election_timeout_min_s
    election_timeout_max_s: Seconds = RaftSettings.election_timeout_max_s
    append_entries_period_s: Seconds = RaftSettings.append_entries_period_s
    leader_fallback_timeout_s: Seconds = RaftSettings.leader_fallback_timeout_s
    compaction_min_entries: AtLeastOne = RaftSettings.compaction_min_entries
    compaction_min_time_s: Seconds = RaftSettings.compaction_min_time_s
    snapshot_chunk_bytes: AtLeastOne = RaftSettings.snapshot_chunk_bytes
    # A planted regression for the Jepsen harness (`jepsen run --unsafe-raft-fixes-off`): the
    # adapter's Raft safety fixes off, as plain pysyncobj. Loses acknowledged writes.
    unsafe_raft_fixes_off: bool = RaftSettings.unsafe_raft_fixes_off


class Api(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """`[api]`: where the HTTP API listens, its TLS files, per-key rate limits (a rate of 0:
    not limited) and /readyz's allowed lag between the commit and applied Raft indexes."""

    port: Port
    host: Name = "127.0.0.1"
    rate_limit_per_s: RatePerS = RateLimits.per_s
    rate_limit_burst: NotNegative = RateLimits.burst
    admin_rate_limit_per_s: RatePerS = RateLimits.admin_per_s
    admin_rate_limit_burst: NotNegative = RateLimits.admin_burst
    ready_max_lag_entries: NotNegative = READY_MAX_LAG_ENTRIES
    tls_cert_file: Path | None = None  # HTTPS and wss with both files, plain HTTP with neither
    tls_key_file: Path | None = None
    # A planted bug for the Jepsen harness (`jepsen run --unsafe-local-reads`): every node
    # answers linearizable reads from its own applied state, without redirecting to the
    # leader or the read barrier, so a partitioned node answers stale reads. Never in
    # production.
    unsafe_local_reads: bool = False

    def __post_init__(self) -> None:
        # Raised during decoding, msgspec reports these at `[api]`.
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("needs both tls_cert_file and tls_key_file, or neither")
        for rate, burst in (
            ("rate_limit_per_s", "rate_limit_burst"),
            ("admin_rate_limit_per_s", "admin_rate_limit_burst"),
        ):
            if getattr(self, rate) > 0 and getattr(self, burst) < 1:
                raise ValueError(f"{burst} must be >= 1 when {rate} > 0")


class Batch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """`[batch]`: how the node's Replica batches proposals, and how long a caller waits."""

    batch_window_s: SecondsOrZero = 0.0
    batch_max: AtLeastOne = 1000
    batch_max_in_flight: AtLeastOne = 2
    # How long a caller waits for its command's outcome before it gets "outcome unknown".
    # Not RaftSettings.proposal_timeout_s (10 s): the adapter's own limit, which also bounds it.
    submit_timeout_s: Seconds = 5.0


class Indexer(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """`[indexer]`: stream every committed event to PostgreSQL (and Kafka) while this node is
    a follower, one follower at a time (docs/reference/indexer.md). Without `postgres_url`,
    this node runs no indexer."""

    postgres_url: str | None = None  # e.g. postgresql://user@host:5432/db
    kafka_bootstrap: str | None = None  # e.g. host:9092; none: PostgreSQL only
    topic_prefix: Name = "qb"  # topics <prefix>.orders, .trades, .book, .balances, .markets
    lease_ttl_s: Seconds = 3.0  # a streamer that stops renewing is replaced after this
    batch_max_events: AtLeastOne = 5000  # events per PostgreSQL transaction, about
    # Compaction keeps the log after the indexer's checkpoint, on every node with [indexer],
    # so that an indexer that restarts (or whose database was down) finds the events it has
    # not written; at most this many MB of journal (ADR 0007). 0: off.
    log_hold_mb: NotNegative = 256


class Archive(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """`[archive]`: ship the committed log to a target in segments, and back the state up on
    a schedule, while this node is the archiving follower (one at a time;
    docs/operating/backup-restore.md). Without `target`, this node archives nothing."""

    target: str | None = None  # a directory, or s3://bucket/prefix (AWS_* variables for S3)
    segment_max_s: Seconds = 2.0  # a segment is cut at least this often while entries come
    segment_max_entries: AtLeastOne = 2000  # ... or when it holds this many log entries
    backup_interval_s: SecondsOrZero = 3600.0  # a backup of the latest dump this often; 0: never
    keep_backups: AtLeastOne = 7  # older backups, and the segments only they need, are deleted
    # Compaction keeps the log after the archive's end, on every node with [archive], so that
    # whichever archives next finds no gap; at most this many MB of journal (ADR 0008). 0: off.
    compaction_hold_mb: NotNegative = 256


class ChainAsset(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """`[[chain.assets]]`: what a chain amount becomes in the exchange (docs/reference/chain.md):
    the native coin without `token`, else the ERC-20 contract at `token`."""

    asset: Name  # the exchange's asset it is credited as
    decimals: NotNegative  # on the chain (18 for ETH)
    asset_decimals: NotNegative  # the exchange's integer units of `asset`
    token: Annotated[str, msgspec.Meta(pattern=r"^0x[0-9a-fA-F]{40}$")] | None = None


class Chain(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """`[chain]`: watch an EVM chain for deposits and credit them (issue 13; one watcher per
    chain among the nodes, under a lease in `[indexer] postgres_url`'s database, deposits to
    Kafka when `[indexer] kafka_bootstrap` is set). Without `rpc_url`, no watcher runs."""

    rpc_url: str | None = None  # the chain node's JSON-RPC over HTTP
    chain_id: AtLeastOne = 1
    confirmations: AtLeastOne = 12  # a deposit is credited this many blocks deep
    start_block: NotNegative = 0  # where a new watcher starts (the deposit addresses' first use)
    poll_interval_s: Seconds = 2.0
    watcher_lease_ttl_s: Seconds = 6.0  # a watcher that stops renewing is replaced after this
    assets: list[ChainAsset] = msgspec.field(default_factory=list)


class NodeConfig(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True, kw_only=True
):
    """The whole file (its top-level keys, then its tables)."""

    node_id: Name
    data_dir: Path  # journal, meta and dump
    # The cluster's identity, the same on every node: backups and archived log segments carry
    # it, and a restore gives the new cluster a new one (docs/operating/backup-restore.md).
    cluster_id: ClusterId | None = None
    password_file: Path | None = None
    admin_key_file: Path | None = None
    api_master_file: Path | None = None  # derives API key secrets; same file on every node
    raft: Raft
    api: Api
    batch: Batch = msgspec.field(default_factory=Batch)
    ws: WsSettings = msgspec.field(default_factory=WsSettings)
    indexer: Indexer = msgspec.field(default_factory=Indexer)
    archive: Archive = msgspec.field(default_factory=Archive)
    chain: Chain = msgspec.field(default_factory=Chain)
    peers: tuple[Peer, ...] = ()

    @property
    def raft_addr(self) -> str:
        return self.raft.addr

    @property
    def api_host(self) -> str:
        return self.api.host

    @property
    def api_port(self) -> int:
        return self.api.port

    @property
    def tls_cert_file(self) -> Path | None:
        return self.api.tls_cert_file

    @property
    def tls_key_file(self) -> Path | None:
        return self.api.tls_key_file

    @property
    def tls(self) -> bool:
        return self.api.tls_cert_file is not None and self.api.tls_key_file is not None

    @property
    def api_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.api.host}:{self.api.port}"

    def settings(self) -> dict[str, Any]:
        """Every key and its value, flat (keys are unique across the tables; see `make`)."""
        flat: dict[str, Any] = {}
        for name in NodeConfig.__struct_fields__:
            value = getattr(self, name)
            if name in TABLES:
                flat.update((key, getattr(value, key)) for key in TABLES[name].__struct_fields__)
            else:
                flat[name] = value
        return flat

    def replace(self, **settings: Any) -> NodeConfig:
        """This config with some keys changed (named as in `make`), checked as a file is."""
        return make(**{**self.settings(), **settings})

    def log_holds(self) -> dict[str, int]:
        """The helpers whose position the node's compaction keeps the log after (ADR 0007,
        0008), each with its bound in bytes of journal: the log archiver, the indexer."""
        holds = {}
        if self.archive.target and self.archive.compaction_hold_mb:
            holds["archive"] = self.archive.compaction_hold_mb * 1_000_000
        if self.indexer.postgres_url and self.indexer.log_hold_mb:
            holds["indexer"] = self.indexer.log_hold_mb * 1_000_000
        return holds

    def raft_settings(self, password: str) -> RaftSettings:
        """The Raft adapter's settings: `[raft]` keys are RaftSettings fields of the same name.
        RaftSettings checks how they relate (election timeout > 3 x heartbeat...)."""
        tuning = {key: getattr(self.raft, key) for key in Raft.__struct_fields__ if key != "addr"}
        try:
            return RaftSettings(
                self_addr=self.raft.addr,
                peers=tuple(peer.raft_addr for peer in self.peers),
                password=password,
                data_dir=self.data_dir,
                compaction_hold_max_bytes=max(self.log_holds().values(), default=0),
                **tuning,
            )
        except ValueError as exc:
            raise ConfigError(f"[raft] {exc}") from exc

    def read_password(self) -> str:
        password = os.environ.get(PASSWORD_ENV)
        if not password and self.password_file is not None:
            password = _read_secret(self.password_file, "password_file")
        if not password:
            raise ConfigError(
                f"a Raft password is mandatory: set password_file in the config or {PASSWORD_ENV}"
            )
        return password

    def read_api_master(self) -> str | None:
        if self.api_master_file is None:
            return None
        return _read_secret(self.api_master_file, "api_master_file")

    def read_admin_key(self) -> Credentials | None:
        if self.admin_key_file is None:
            return None
        try:
            return read_credentials(self.admin_key_file)
        except AuthError as exc:
            raise ConfigError(f"admin_key_file: {exc.message}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"admin_key_file {self.admin_key_file} is not a credentials file "
                f"(JSON with key_id and secret): {exc!r}"
            ) from exc

    def check(self) -> None:
        """What a node needs before it starts, checked at once so that `node run` refuses
        with one line: a password, private secret files, Raft timings that hold together."""
        self.raft_settings(self.read_password())
        self.read_api_master()
        self.read_admin_key()
        if self.api.tls_key_file is not None:
            _read_secret(self.api.tls_key_file, "[api] tls_key_file")
        if self.chain.rpc_url and not self.indexer.postgres_url:
            raise ConfigError(
                "[chain] rpc_url needs [indexer] postgres_url: the watcher keeps its lease, "
                "checkpoint and deposits there"
            )
        if self.chain.rpc_url and self.admin_key_file is None:
            raise ConfigError("[chain] rpc_url needs admin_key_file: the watcher credits with it")
        if self.archive.target and not self.cluster_id:
            raise ConfigError(
                "[archive] target needs a cluster_id (the same on every node): the archived "
                "log and the backups are tied to it"
            )


# table name -> its Struct (`peers` is an array of tables, kept apart)
TABLES: dict[str, type[msgspec.Struct]] = {
    "raft": Raft,
    "api": Api,
    "batch": Batch,
    "ws": WsSettings,
    "indexer": Indexer,
    "archive": Archive,
    "chain": Chain,
}
# key -> its table ("" for the top level); `make` names keys this way
_TABLE_OF: dict[str, str] = {
    **{name: "" for name in NodeConfig.__struct_fields__ if name not in TABLES},
    **{key: table for table, struct in TABLES.items() for key in struct.__struct_fields__},
}
assert len(_TABLE_OF) == len(NodeConfig.__struct_fields__) - len(TABLES) + sum(
    len(struct.__struct_fields__) for struct in TABLES.values()
), "a key is in two tables: make() and NodeConfig.replace() need them unique"


def load(path: Path) -> NodeConfig:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        config = msgspec.toml.decode(text, type=NodeConfig, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config {path}: {_explain(exc)}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from exc
    return _resolved(config, path.resolve().parent)


def dump(config: NodeConfig) -> str:
    """The TOML text of `config`: the keys whose values differ from their defaults (so a
    default changed in the code reaches every file), paths as given."""
    doc = msgspec.to_builtins(config, enc_hook=_encode_path)
    return tomli_w.dumps({key: value for key, value in doc.items() if value != {}})


def make(**settings: Any) -> NodeConfig:
    """A config from keys named without their table (each key is in one table only:
    `addr` is `[raft] addr`, `port` is `[api] port`, `batch_max` is `[batch] batch_max`),
    checked as a file is. Paths are taken as given."""
    doc: dict[str, Any] = {}
    for key, value in settings.items():
        table = _TABLE_OF.get(key)
        if table is None:
            raise ConfigError(f"settings: unknown key {key}{_did_you_mean(key, list(_TABLE_OF))}")
        (doc.setdefault(table, {}) if table else doc)[key] = value
    try:
        return msgspec.convert(doc, NodeConfig, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"settings: {_explain(exc)}") from exc


def with_environment(config: NodeConfig, env: Mapping[str, str] = os.environ) -> NodeConfig:
    """`config` with `[ws]` keys overridden by `QB_WS_<KEY>` variables (upper case; the tests
    give nodes small WebSocket bounds so). `node run` applies them, nothing else does: a
    launcher that rewrites a node's file must not write its own environment into it."""
    try:
        ws = WsSettings.from_env(env, base=config.ws)
    except msgspec.ValidationError as exc:
        match = _AT.fullmatch(str(exc))
        assert match is not None  # the pattern matches any text
        key = (match["at"] or "").rpartition(".")[2]
        raise ConfigError(f"environment {WS_ENV_PREFIX}{key.upper()}: {match['what']}") from exc
    return config if ws is config.ws else msgspec.structs.replace(config, ws=ws)


def _read_secret(path: Path, key: str) -> str:
    """The one 0600 check (api.auth.read_secret_file), its refusal as a ConfigError."""
    try:
        return read_secret_file(path, key)
    except AuthError as exc:
        raise ConfigError(exc.message) from exc


def _decode_path(type_: type, value: object) -> object:
    if type_ is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise TypeError(f"Expected a path (`str`), got `{type(value).__name__}`")
    raise NotImplementedError(type_)


def _encode_path(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise NotImplementedError(type(value))


def _resolved(config: NodeConfig, base: Path) -> NodeConfig:
    """Relative paths (top level and [api]) taken from `base`, the config file's directory."""

    def resolve(table: Any) -> Any:
        paths = {
            key: (base / value).resolve()
            for key in table.__struct_fields__
            if isinstance(value := getattr(table, key), Path)
        }
        return msgspec.structs.replace(table, **paths)

    return msgspec.structs.replace(resolve(config), api=resolve(config.api))


# msgspec's messages: "Expected `float`, got `str` - at `$.raft.election_timeout_min_s`",
# "Object contains unknown field `prot` - at `$.api`", "Object missing required field `port`".
_AT = re.compile(r"(?P<what>.*?)(?: - at `\$(?P<at>[^`]*)`)?", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]*)`")
_MISSING = re.compile(r"Object missing required field `(?P<key>[^`]*)`")


def _explain(exc: msgspec.ValidationError) -> str:
    """msgspec's message with the key as the file spells it: "[raft] addr", "[[peers]] #2 id"."""
    match = _AT.fullmatch(str(exc))
    assert match is not None  # the pattern matches any text
    what, at = match["what"], match["at"] or ""
    if unknown := _UNKNOWN.fullmatch(what):
        key = unknown["key"]
        known = list(_struct_at(at).__struct_fields__)
        return f"unknown key {_key_path(f'{at}.{key}')}{_did_you_mean(key, known)}"
    if missing := _MISSING.fullmatch(what):
        return f"{_key_path(at + '.' + missing['key'])} is missing (it has no default)"
    return f"{_key_path(at)}: {what}" if at else what


def _key_path(at: str) -> str:
    """A msgspec location as the file spells the key: `.raft.addr` -> `[raft] addr`,
    `.peers[1].id` -> `[[peers]] #2 id`, `.node_id` -> `node_id`."""
    keys: list[str | int] = [
        name or int(index) for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", at)
    ]
    if not keys:
        return "(top level)"
    head, rest = str(keys[0]), keys[1:]
    if rest and isinstance(rest[0], int):
        head, rest = f"[[{head}]] #{rest[0] + 1}", rest[1:]
    elif rest or head in TABLES:
        head = f"[{head}]"
    return f"{head} {'.'.join(map(str, rest))}" if rest else head


def _struct_at(at: str) -> type[msgspec.Struct]:
    """The Struct of the table at `at` (".api", ".peers[0]", "" for the top level)."""
    name = re.sub(r"\[\d+\]", "", at).lstrip(".")
    if name == "peers":
        return Peer
    return TABLES.get(name, NodeConfig)


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
