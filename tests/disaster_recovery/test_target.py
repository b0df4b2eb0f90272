"""The two kinds of target behave the same (a directory on the filesystem, a bucket on a real
S3-protocol server on loopback), and every failure is one clear error."""

from __future__ import annotations

import os
import stat

import boto3
import pytest

from disaster_recovery.target import (
    DirTarget,
    MissingObject,
    S3Target,
    TargetError,
    check_name,
    open_target,
)


@pytest.fixture(params=["dir", "s3"])
def target(request, tmp_path):
    if request.param == "dir":
        return open_target(str(tmp_path / "target"))
    return open_target(request.getfixturevalue("s3_url"))


def test_put_get_replace_delete(target):
    assert target.list() == []
    target.put("backups/00001/manifest.json", b"one")
    target.put("backups/00001/state.bin", b"\x00" * 1000)
    assert target.get("backups/00001/manifest.json") == b"one"
    assert target.size("backups/00001/state.bin") == 1000
    target.put("backups/00001/manifest.json", b"two")  # replaces, whole
    assert target.get("backups/00001/manifest.json") == b"two"
    assert target.exists("backups/00001/manifest.json")
    target.delete("backups/00001/manifest.json")
    assert not target.exists("backups/00001/manifest.json")
    target.delete("backups/00001/manifest.json")  # deleting what is gone is no error
    with pytest.raises(MissingObject):
        target.get("backups/00001/manifest.json")
    with pytest.raises(MissingObject):
        target.size("nothing")
    assert target.list() == ["backups/00001/state.bin"]


def test_list_by_prefix_in_name_order(target):
    names = [
        "segments/00000000000000000010-00000000000000000019.seg",
        "segments/00000000000000000002-00000000000000000009.seg",
        "backups/00002/manifest.json",
        "quorumbook-target.json",
    ]
    for name in names:
        target.put(name, name.encode())
    assert target.list() == sorted(names)
    assert target.list("segments/") == sorted(n for n in names if n.startswith("segments/"))
    assert target.list("backups/0000") == ["backups/00002/manifest.json"]
    assert target.list("nothing/") == []
    # Only what sorts after a name (S3's StartAfter): a listing of what is new.
    first, second = sorted(n for n in names if n.startswith("segments/"))
    assert target.list("segments/", after=first) == [second]
    assert target.list("segments/", after=second) == []
    assert target.list(after="backups/00002/manifest.json") == sorted(names)[-3:]


@pytest.mark.parametrize(
    "name", ["", "/abs", "a//b", "../up", "a/../b", "a/./b", "sp ace", "a/", "x" * 256]
)
def test_a_bad_name_is_refused_before_anything_is_touched(target, name):
    with pytest.raises(ValueError, match="bad object name"):
        target.put(name, b"x")
    with pytest.raises(ValueError):
        target.get(name)
    assert target.list() == []


def test_a_crashed_put_leaves_nothing_visible(tmp_path):
    target = DirTarget(tmp_path)
    target.put("backups/00001/state.bin", b"state")
    (tmp_path / "backups" / "00001" / ".~put-abc123").write_bytes(b"half")  # a crash's leftover
    (tmp_path / "notes.txt~").write_bytes(b"someone else's")
    assert target.list() == ["backups/00001/state.bin"]
    mode = stat.S_IMODE(os.stat(tmp_path / "backups" / "00001" / "state.bin").st_mode)
    assert mode == 0o600  # the exchange's state is not for other users


def test_delete_prunes_empty_directories(tmp_path):
    target = DirTarget(tmp_path / "t")
    target.put("backups/00001/state.bin", b"state")
    target.delete("backups/00001/state.bin")
    assert not (tmp_path / "t" / "backups").exists()


def test_s3_multipart_upload_and_every_page_of_a_listing(s3_url):
    target = open_target(s3_url)
    assert isinstance(target, S3Target)
    big = S3Target(target.bucket, target.prefix, part_size_bytes=5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024 + 17)  # three parts
    big.put("backups/00001/state.bin", data)
    assert big.get("backups/00001/state.bin") == data
    client = boto3.client("s3")
    for i in range(1005):  # S3 answers 1,000 keys a page
        client.put_object(Bucket=target.bucket, Key=f"{target.prefix}/many/{i:05d}", Body=b"")
    client.put_object(Bucket=target.bucket, Key=f"{target.prefix}/folder/", Body=b"")
    client.put_object(Bucket=target.bucket, Key="elsewhere/x", Body=b"")  # outside the prefix
    listed = target.list()
    assert listed == ["backups/00001/state.bin"] + [f"many/{i:05d}" for i in range(1005)]


def test_s3_failures_are_one_clear_line(s3_url, monkeypatch):
    bucket = s3_url.split("/")[2]
    missing = open_target(f"s3://{bucket}-missing/x")
    with pytest.raises(TargetError, match="no such bucket") as failure:
        missing.put("a", b"x")
    assert "testing" not in str(failure.value)  # the credentials
    with pytest.raises(TargetError, match="no such bucket"):
        missing.size("a")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(TargetError, match=r"cannot reach the endpoint http://127\.0\.0\.1:9"):
        open_target(s3_url).list()


def test_dir_failures_are_clear(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(TargetError, match="create the directory"):
        DirTarget(tmp_path / "file" / "below")


@pytest.mark.parametrize(
    "url, kind, where",
    [
        ("s3://bucket/some/prefix", S3Target, "s3://bucket/some/prefix"),
        ("s3://bucket", S3Target, "s3://bucket"),
        ("file://{tmp}/qb-target", DirTarget, "{tmp}/qb-target"),
        ("relative/dir", DirTarget, "relative/dir"),
    ],
)
def test_open_target(url, kind, where, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # A directory target is made where it points: under this test's own directory.
    url, where = url.format(tmp=tmp_path), where.format(tmp=tmp_path)
    target = open_target(url)
    assert isinstance(target, kind)
    assert target.url == where


@pytest.mark.parametrize(
    "url, message",
    [
        ("", "no target given"),
        ("s3:///prefix", "no bucket"),
        ("s3://bucket/a/../b", "is not '/'-separated"),
        ("s3://bucket/p?x=1", "no '\\?' or '#' part"),
        ("file://host/path", "names a local path"),
        ("ftp://host/path", "unknown scheme 'ftp'"),
    ],
)
def test_open_target_refuses_a_bad_url(url, message):
    with pytest.raises(ValueError, match=message):
        open_target(url)


def test_check_name():
    assert check_name("backups/00001/manifest.json") == "backups/00001/manifest.json"
