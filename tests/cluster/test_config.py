"""The node config: its schema refuses what it does not know, its defaults live in one place
each, it round-trips through TOML, secret files are private, and the reference says so."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import msgspec
import pytest
import tomli_w

from api.app import READY_MAX_LAG_ENTRIES
from api.auth import AuthError, new_credentials, read_secret_file
from api.rate_limit import RateLimits
from api.sdk import read_credentials, write_credentials
from api.ws import Settings as WsSettings
from cluster.config import (
    PASSWORD_ENV,
    TABLES,
    Api,
    Batch,
    ConfigError,
    NodeConfig,
    Peer,
    Raft,
    dump,
    load,
    make,
    with_environment,
)
from cluster.launcher import LocalCluster
from cluster.raft import RaftSettings
from cluster.replica import Replica
from cluster.sidecar import LogHolds

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "config.md"

BASE = """node_id = "n1"
data_dir = "data"

[raft]
addr = "127.0.0.1:7001"

[api]
port = 8001
"""


def write(tmp_path: Path, api_lines: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(BASE + api_lines)
    return path


def refusal(tmp_path: Path, text: str) -> str:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load(path)
    message = str(refused.value)
    assert message.startswith(f"config {path}: "), message
    return message.removeprefix(f"config {path}: ")


def private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# ------------------------------------------------------------------ [api] and [batch]


def test_api_settings_and_tls_round_trip(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            "rate_limit_per_s = 5.5\nrate_limit_burst = 9\n"
            "admin_rate_limit_per_s = 50\nready_max_lag_entries = 7\n"
            'tls_cert_file = "tls/n1.crt"\ntls_key_file = "tls/n1.key"\n',
        )
    )
    assert (
        config.api.rate_limit_per_s,
        config.api.rate_limit_burst,
        config.api.admin_rate_limit_per_s,
        config.api.admin_rate_limit_burst,
        config.api.ready_max_lag_entries,
    ) == (5.5, 9, 50, 400, 7)
    assert config.tls_cert_file == (tmp_path / "tls" / "n1.crt").resolve()
    assert config.api_url == "https://127.0.0.1:8001"
    again = tmp_path / "again.toml"
    again.write_text(dump(config))
    assert load(again) == config


def test_plain_http_and_defaults_without_settings(tmp_path: Path) -> None:
    config = load(write(tmp_path, ""))
    assert config.api_url == "http://127.0.0.1:8001" and not config.tls
    assert (config.api.rate_limit_per_s, config.api.rate_limit_burst) == (200.0, 400)
    assert config.api.admin_rate_limit_per_s == 0 and config.api.ready_max_lag_entries == 100
    assert config.data_dir == (tmp_path / "data").resolve() and config.peers == ()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('tls_cert_file = "a.crt"\n', "[api]: needs both tls_cert_file and tls_key_file"),
        ("rate_limit_per_s = -1\n", "[api] rate_limit_per_s: Expected `float` >= 0.0"),
        ('ready_max_lag_entries = "x"\n', "[api] ready_max_lag_entries: Expected `int`, got `str`"),
        (
            "rate_limit_burst = 0\n",
            "[api]: rate_limit_burst must be >= 1 when rate_limit_per_s > 0",
        ),
        ("port = 0\n", "not valid TOML: Cannot overwrite a value"),  # a key given twice
    ],
)
def test_unusable_api_settings_are_refused(tmp_path: Path, lines: str, message: str) -> None:
    assert refusal(tmp_path, BASE + lines).startswith(message)


def test_batch_settings_round_trip_and_a_pipeline_of_zero_is_refused(tmp_path: Path) -> None:
    config = load(write(tmp_path, "\n[batch]\nbatch_max_in_flight = 3\nbatch_window_s = 0.002\n"))
    assert (config.batch.batch_max_in_flight, config.batch.batch_window_s) == (3, 0.002)
    assert config.batch.batch_max == 1000
    again = tmp_path / "again.toml"
    again.write_text(dump(config))
    assert load(again) == config
    assert load(write(tmp_path, "")).batch.batch_max_in_flight == 2
    for bad, why in (("0", "Expected `int` >= 1"), ("1.5", "Expected `int`, got `float`")):
        text = f"{BASE}\n[batch]\nbatch_max_in_flight = {bad}\n"
        assert refusal(tmp_path, text) == f"[batch] batch_max_in_flight: {why}"
    text = f'{BASE}\n[batch]\nbatch_max_in_flight = "2"\n'
    assert refusal(tmp_path, text) == "[batch] batch_max_in_flight: Expected `int`, got `str`"


# ------------------------------------------------------------------ unknown keys, wrong types


PEER = '\n[[peers]]\nid = "n2"\nraft_addr = "127.0.0.1:7002"\napi_url = "http://127.0.0.1:8002"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('nodeid = "n1"\n' + BASE, "unknown key nodeid (did you mean node_id?)"),
        (BASE.replace("[raft]\n", "[raft]\nelection_timeout_s = 1.0\n"), "unknown key [raft] "),
        (BASE + "prot = 8002\n", "unknown key [api] prot (did you mean port?)"),
        (BASE + "\n[batch]\nbatch_size = 10\n", "unknown key [batch] batch_size "),
        (
            BASE + "\n[ws]\nheartbeat = 1.0\n",
            "unknown key [ws] heartbeat (did you mean heartbeat_s?)",
        ),
        (BASE + PEER + "port = 1\n", "unknown key [[peers]] #1 port "),
        (BASE + PEER + PEER + "apiurl = 1\n", "unknown key [[peers]] #2 apiurl "),
        (BASE + "\n[tls]\ncert = 1\n", "unknown key tls "),
    ],
)
def test_an_unknown_key_is_refused_with_its_name(tmp_path: Path, text: str, message: str) -> None:
    assert refusal(tmp_path, text).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE.replace('"n1"', "1"), "node_id: Expected `str`, got `int`"),
        (BASE.replace('"data"', "[]"), "data_dir: Expected a path (`str`), got `list`"),
        (
            BASE.replace("[raft]\n", '[raft]\nelection_timeout_min_s = "fast"\n'),
            "[raft] election_timeout_min_s: Expected `float`, got `str`",
        ),
        (
            BASE.replace("[raft]\n", "[raft]\ncompaction_min_entries = 10.5\n"),
            "[raft] compaction_min_entries: Expected `int`, got `float`",
        ),
        (BASE.replace("8001", '"8001"'), "[api] port: Expected `int`, got `str`"),
        (BASE.replace("8001", "70000"), "[api] port: Expected `int` <= 65535"),
        (BASE + "host = true\n", "[api] host: Expected `str`, got `bool`"),
        (
            BASE + "\n[batch]\nsubmit_timeout_s = 0\n",
            "[batch] submit_timeout_s: Expected `float` > 0.0",
        ),
        (BASE + '\n[ws]\nheartbeat_s = "1s"\n', "[ws] heartbeat_s: Expected `float`, got `str`"),
        (
            BASE + PEER + PEER.replace('"127.0.0.1:7002"', "7"),
            "[[peers]] #2 raft_addr: Expected `str`, got `int`",
        ),
        (
            'node_id = "n1"\ndata_dir = "d"\nraft = 1\napi = {port = 1}\n',
            "[raft]: Expected `object`, got `int`",
        ),
    ],
)
def test_a_wrong_type_is_refused_with_the_key_path(tmp_path: Path, text: str, message: str) -> None:
    assert refusal(tmp_path, text).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE.replace('node_id = "n1"\n', ""), "node_id is missing (it has no default)"),
        (
            BASE.replace('addr = "127.0.0.1:7001"\n', ""),
            "[raft] addr is missing (it has no default)",
        ),
        (BASE.replace("port = 8001\n", ""), "[api] port is missing (it has no default)"),
        (BASE.replace("[api]\nport = 8001\n", ""), "[api] is missing (it has no default)"),
        (BASE + PEER.replace('id = "n2"\n', ""), "[[peers]] #1 id is missing (it has no default)"),
    ],
)
def test_a_missing_key_is_refused_with_its_name(tmp_path: Path, text: str, message: str) -> None:
    assert refusal(tmp_path, text) == message


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config .*missing\.toml"):
        load(tmp_path / "missing.toml")


# ------------------------------------------------------------------ defaults: one place each


def defaults(struct: type[msgspec.Struct]) -> dict[str, object]:
    return {
        f.name: f.default
        for f in msgspec.structs.fields(struct)
        if f.default is not msgspec.NODEFAULT
    }


def test_raft_keys_are_raft_settings_fields_with_its_defaults() -> None:
    assert defaults(Raft) == {key: getattr(RaftSettings, key) for key in defaults(Raft)}
    assert set(Raft.__struct_fields__) - {"addr"} <= set(RaftSettings.__dataclass_fields__)


def test_api_defaults_are_the_components() -> None:
    limits = RateLimits()
    assert defaults(Api) == {
        "host": "127.0.0.1",
        "rate_limit_per_s": limits.per_s,
        "rate_limit_burst": limits.burst,
        "admin_rate_limit_per_s": limits.admin_per_s,
        "admin_rate_limit_burst": limits.admin_burst,
        "ready_max_lag_entries": READY_MAX_LAG_ENTRIES,
        "tls_cert_file": None,
        "tls_key_file": None,
        "unsafe_local_reads": False,
    }


def test_the_ws_table_is_the_websocket_settings() -> None:
    assert TABLES["ws"] is WsSettings
    assert load_minimal().ws == WsSettings()


def test_replica_keyword_defaults_agree_with_the_batch_table() -> None:
    """Replica keeps keyword defaults of its own (the tests build it bare): held equal here."""
    params = inspect.signature(Replica).parameters
    batch = Batch()
    assert (
        params["batch_window_s"].default,
        params["batch_max"].default,
        params["max_in_flight"].default,
        params["submit_timeout_s"].default,
    ) == (batch.batch_window_s, batch.batch_max, batch.batch_max_in_flight, batch.submit_timeout_s)


def test_the_caller_timeout_and_the_proposal_timeout_are_two_settings() -> None:
    assert Batch().submit_timeout_s == 5.0
    assert RaftSettings.proposal_timeout_s == 10.0  # bounds the caller's wait and raft_admin's
    assert "submit_timeout_s" not in RaftSettings.__dataclass_fields__


def load_minimal() -> NodeConfig:
    return make(node_id="n1", data_dir=Path("/d"), addr="127.0.0.1:1", port=2)


def test_raft_settings_carry_the_raft_table_and_refuse_bad_relations(tmp_path: Path) -> None:
    config = load(write(tmp_path, "")).replace(
        election_timeout_min_s=0.5,
        election_timeout_max_s=0.9,
        peers=(Peer("n2", "h:2", "http://h:3"),),
    )
    settings = config.raft_settings("pw")
    assert (settings.self_addr, settings.peers, settings.data_dir) == (
        "127.0.0.1:7001",
        ("h:2",),
        config.data_dir,
    )
    assert (settings.election_timeout_min_s, settings.election_timeout_max_s) == (0.5, 0.9)
    assert settings.compaction_min_entries == 5000
    with pytest.raises(ConfigError, match=r"^\[raft\] election_timeout_min_s must exceed 3 x"):
        config.replace(append_entries_period_s=0.2).raft_settings("pw")


def test_the_log_holds_are_the_helpers_that_hold_and_the_bound_is_the_larger() -> None:
    """The node holds its log for the archive and for the indexer (ADR 0007, 0008): only
    those configured with a bound; the Raft adapter gets the larger bound."""
    base = load_minimal()
    assert base.log_holds() == {} and base.raft_settings("pw").compaction_hold_max_bytes == 0
    indexer = base.replace(postgres_url="postgresql://u@h/db")
    assert indexer.log_holds() == {"indexer": 256_000_000}
    both = indexer.replace(target="/backups", compaction_hold_mb=512)
    assert both.log_holds() == {"archive": 512_000_000, "indexer": 256_000_000}
    assert both.raft_settings("pw").compaction_hold_max_bytes == 512_000_000
    assert both.replace(log_hold_mb=0).log_holds() == {"archive": 512_000_000}
    assert indexer.replace(log_hold_mb=0).raft_settings("pw").compaction_hold_max_bytes == 0


def test_the_node_holds_at_the_lowest_position_once_every_holder_reported() -> None:
    held: list[int] = []
    holds = LogHolds(["archive", "indexer"], held.append)
    holds.of("indexer")(40)
    assert held == []  # the archive has not said where it ends: the start's hold stays
    holds.of("archive")(70)
    holds.of("indexer")(90)
    holds.of("chain")(5)  # holds nothing
    assert held == [40, 70]


# ------------------------------------------------------------------ writing


@pytest.mark.parametrize(
    "name",
    ['quo"te', "back\\slash", "ünï cødé ✓", "two  spaces", "new\nline", "tab\tand 'single'"],
)
def test_odd_paths_round_trip(tmp_path: Path, name: str) -> None:
    config = make(
        node_id="n1",
        data_dir=tmp_path / name / "data",
        password_file=tmp_path / name / "raft.password",
        addr="127.0.0.1:7001",
        port=8001,
        tls_cert_file=tmp_path / f"{name}.crt",
        tls_key_file=tmp_path / f"{name}.key",
        peers=(Peer(name, "127.0.0.1:7002", "http://127.0.0.1:8002"),),
    )
    path = tmp_path / "node.toml"
    path.write_text(dump(config))
    assert load(path) == config


def test_relative_paths_are_from_the_config_files_directory(tmp_path: Path) -> None:
    (tmp_path / "n1").mkdir()
    path = tmp_path / "n1" / "node.toml"
    path.write_text(
        BASE.replace('"data"', '"../shared/data"') + 'tls_cert_file = "c"\ntls_key_file = "k"\n'
    )
    config = load(path)
    assert config.data_dir == (tmp_path / "shared" / "data").resolve()
    assert config.tls_key_file == (tmp_path / "n1" / "k").resolve()


def test_dump_writes_only_what_differs_from_the_defaults() -> None:
    config = load_minimal().replace(batch_max=10, heartbeat_s=0.5)
    assert dump(config) == (
        'node_id = "n1"\ndata_dir = "/d"\n\n[raft]\naddr = "127.0.0.1:1"\n\n'
        "[api]\nport = 2\n\n[batch]\nbatch_max = 10\n\n[ws]\nheartbeat_s = 0.5\n"
    )


def test_settings_by_key_are_checked_like_a_file() -> None:
    with pytest.raises(ConfigError, match=r"^settings: unknown key compaction_min \(did you mean"):
        load_minimal().replace(compaction_min=3)
    with pytest.raises(ConfigError, match=r"^settings: \[batch\] batch_max: Expected `int`"):
        load_minimal().replace(batch_max="many")


def test_a_config_written_by_the_launcher_loads(tmp_path: Path) -> None:
    cluster = LocalCluster.create(tmp_path / "c", 3, compaction_min_entries=20, batch_max=50)
    for node in cluster.nodes.values():
        loaded = load(node.config_path)
        assert loaded == node.config
        assert (loaded.raft.compaction_min_entries, loaded.batch.batch_max) == (20, 50)
        assert {p.id for p in loaded.peers} == set(cluster.nodes) - {loaded.node_id}
        loaded.check()  # its secret files are private
    with pytest.raises(ConfigError, match="unknown key electon_timeout_min_s"):
        LocalCluster.create(tmp_path / "d", 1, electon_timeout_min_s=1.0)


# ------------------------------------------------------------------ environment


def test_qb_ws_variables_override_the_ws_table(tmp_path: Path) -> None:
    config = load(write(tmp_path, "\n[ws]\nheartbeat_s = 2.0\nfeed_buffer = 3000\n"))
    env = {"QB_WS_HEARTBEAT_S": "0.2", "QB_WS_MAX_QUEUE_BYTES": "65536", "QB_WS_OTHER": "x"}
    ws = with_environment(config, env).ws
    assert (ws.heartbeat_s, ws.max_queue_bytes, ws.feed_buffer) == (0.2, 65536, 3000)
    assert with_environment(config, {}) is config
    with pytest.raises(ConfigError, match=r"^environment QB_WS_FEED_BUFFER: Expected `int`"):
        with_environment(config, {"QB_WS_FEED_BUFFER": "lots"})
    with pytest.raises(ConfigError, match=r"^environment QB_WS_HEARTBEAT_S: Expected `float` > 0"):
        with_environment(config, {"QB_WS_HEARTBEAT_S": "0"})


# ------------------------------------------------------------------ secret files


def test_one_check_for_every_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    files = {
        "password_file": private(tmp_path / "raft.password", "pw\n"),
        "api_master_file": private(tmp_path / "api.master", "m" * 64),
        "admin_key_file": tmp_path / "admin.key",
        "tls_cert_file": tmp_path / "api.crt",
        "tls_key_file": private(tmp_path / "api.key", "KEY"),
    }
    write_credentials(files["admin_key_file"], new_credentials("admin"))
    config = load_minimal().replace(**files)
    config.check()
    assert config.read_password() == "pw" and config.read_api_master() == "m" * 64
    assert config.read_admin_key() == read_credentials(files["admin_key_file"])
    for key in ("password_file", "api_master_file", "admin_key_file", "tls_key_file"):
        path = files[key]
        path.chmod(0o640)
        with pytest.raises(ConfigError) as refused:
            config.check()
        assert str(refused.value).endswith(
            f"{path} is mode 0640: it must not be readable by group or others (chmod 600 {path})"
        )
        assert key in str(refused.value)
        path.chmod(0o600)
    config.check()


def test_the_password_comes_from_the_environment_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    config = load_minimal()
    with pytest.raises(ConfigError, match="a Raft password is mandatory"):
        config.read_password()
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert config.replace(password_file=tmp_path / "absent").read_password() == "from-env"
    monkeypatch.delenv(PASSWORD_ENV)
    absent = re.escape(f"password_file {tmp_path / 'absent'} does not exist")
    with pytest.raises(ConfigError, match=f"^{absent}$"):
        config.replace(password_file=tmp_path / "absent").read_password()


def test_credentials_files_get_the_same_check(tmp_path: Path) -> None:
    path = tmp_path / "alice.key"
    write_credentials(path, new_credentials("trader", "alice"))
    os.chmod(path, 0o644)
    with pytest.raises(AuthError) as refused:
        read_credentials(path)
    assert refused.value.code == "insecure_credentials"
    assert refused.value.message == (
        f"credentials file {path} is mode 0644: it must not be readable by group or others "
        f"(chmod 600 {path})"
    )
    with pytest.raises(AuthError, match="does not exist"):
        read_secret_file(tmp_path / "nothing", "credentials file")


# ------------------------------------------------------------------ the reference


def reference_tables() -> dict[str, dict[str, str]]:
    """`### <table>` sections of docs/reference/config.md -> {key: default cell}."""
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in REFERENCE.read_text().splitlines():
        if heading := re.fullmatch(r"### (?:Top level|`\[+(\w+)\]+`)", line):
            current = tables.setdefault(heading[1] or "", {})
        elif line.startswith("## "):
            current = None
        elif current is not None and (row := re.match(r"\| `(\w+)` \| ([^|]+) \|", line)):
            current[row[1]] = row[2].strip()
    return tables


def documented_default(field: msgspec.structs.FieldInfo) -> str | None:
    if field.default is msgspec.NODEFAULT:
        return None if field.default_factory is not msgspec.NODEFAULT else "required"
    if field.default is None:
        return "none"
    return "`" + tomli_w.dumps({"v": field.default}).removeprefix("v = ").strip() + "`"


def test_the_reference_lists_every_key_with_its_default_and_no_other() -> None:
    structs = {"": NodeConfig, **TABLES, "peers": Peer}
    expected = {
        table: {
            f.name: default
            for f in msgspec.structs.fields(struct)
            if (default := documented_default(f)) is not None and f.name not in TABLES
        }
        for table, struct in structs.items()
    }
    expected[""].pop("peers", None)
    assert reference_tables() == expected


def test_the_reference_example_is_a_valid_config(tmp_path: Path) -> None:
    text = REFERENCE.read_text()
    example = re.search(r"## Example\n\n```toml\n(.*?)```", text, re.S)
    assert example is not None
    path = tmp_path / "node.toml"
    path.write_text(example[1])
    config = load(path)
    assert config.tls and len(config.peers) == 1
    # It shows every key with its default value, except what a real node has to set.
    shown = config.settings()
    for struct in (Raft, Api, Batch, WsSettings):
        for key, default in defaults(struct).items():
            if key not in ("host", "tls_cert_file", "tls_key_file"):
                assert shown[key] == default, key
