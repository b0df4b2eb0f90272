"""The node config's [api] and [batch] settings: loaded, written back, and refused when unusable."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ConfigError, dump, load

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
        config.rate_limit_per_s,
        config.rate_limit_burst,
        config.admin_rate_limit_per_s,
        config.admin_rate_limit_burst,
        config.ready_max_lag_entries,
    ) == (5.5, 9, 50, 400, 7)
    assert config.tls_cert_file == (tmp_path / "tls" / "n1.crt").resolve()
    assert config.api_url == "https://127.0.0.1:8001"
    again = tmp_path / "again.toml"
    again.write_text(dump(config))
    assert load(again) == config


def test_plain_http_and_defaults_without_settings(tmp_path: Path) -> None:
    config = load(write(tmp_path, ""))
    assert config.api_url == "http://127.0.0.1:8001" and not config.tls
    assert (config.rate_limit_per_s, config.rate_limit_burst) == (200.0, 400)
    assert config.admin_rate_limit_per_s == 0 and config.ready_max_lag_entries == 100


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('tls_cert_file = "a.crt"\n', "needs both tls_cert_file and tls_key_file"),
        ("rate_limit_per_s = -1\n", "rate_limit_per_s must be a number >= 0"),
        ('ready_max_lag_entries = "x"\n', "ready_max_lag_entries must be a number >= 0"),
        ("rate_limit_burst = 0\n", "rate_limit_burst must be >= 1 when rate_limit_per_s > 0"),
    ],
)
def test_unusable_api_settings_are_refused(tmp_path: Path, lines: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, lines))


def test_batch_settings_round_trip_and_a_pipeline_of_zero_is_refused(tmp_path: Path) -> None:
    config = load(write(tmp_path, "\n[batch]\nbatch_max_in_flight = 3\nbatch_window_s = 0.002\n"))
    assert (config.batch_max_in_flight, config.batch_window_s, config.batch_max) == (3, 0.002, 1000)
    again = tmp_path / "again.toml"
    again.write_text(dump(config))
    assert load(again) == config
    assert load(write(tmp_path, "")).batch_max_in_flight == 2
    for bad in ("0", "1.5", '"2"'):
        with pytest.raises(ConfigError, match="batch_max_in_flight must be an integer >= 1"):
            load(write(tmp_path, f"\n[batch]\nbatch_max_in_flight = {bad}\n"))
