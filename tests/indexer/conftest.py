"""The services fixtures (`services`, `pg_url`, `topic_prefix`, `kafka_bootstrap`) live in
tests/conftest.py: the integration tests use them too."""
