"""The object store: one behavioural suite run against a local folder and a real (moto) S3 server."""

import hashlib
import os
import posixpath
import socket
import string
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from musetalk_ops import keys
from musetalk_ops.errors import InputError, StoreError
from musetalk_ops.s3_store import S3Store
from musetalk_ops.store import LocalStore, check_key, open_store, push_templates


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same tests run on both backends; the S3 store sits under a key prefix inside its bucket."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(bucket, prefix="tenant/a", endpoint_url=request.getfixturevalue("s3_endpoint"))


def _keys(store) -> list[str]:
    return [info.key for info in store.list("")]


# ---------------------------------------------------------------------------------------------
# behaviour shared by both backends


def test_bytes_round_trip_and_overwrite(store):
    data = bytes(range(256)) * 3
    store.put_bytes("requests/r1.json", data)
    assert store.get_bytes("requests/r1.json") == data
    store.put_bytes("requests/r1.json", b"")
    assert store.get_bytes("requests/r1.json") == b""
    assert _keys(store) == ["requests/r1.json"]


def test_file_round_trip_is_exact_and_leaves_no_temp_files(store, tmp_path):
    big = tmp_path / "big.bin"
    payload = os.urandom(9 * 1024 * 1024 + 17)  # above boto3's 8 MiB multipart threshold
    big.write_bytes(payload)
    store.put_file("work/r1/features.safetensors", big)
    out = tmp_path / "down" / "nested" / "out.bin"
    store.get_file("work/r1/features.safetensors", out)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert os.listdir(out.parent) == ["out.bin"]
    assert store.list("work/")[0].size == len(payload)


def test_list_prefix_sizes_and_times(store):
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    contents = {
        "requests/r1.json": b"1",
        "requests/r10.json": b"10",
        "requests/r2.json": b"22",
        "requests/rejected/r3.json": b"333",
        "renders/r1.mp4": b"v" * 1000,
    }
    for key, data in contents.items():
        store.put_bytes(key, data)
    after = datetime.now(timezone.utc) + timedelta(seconds=5)

    everything = store.list("")
    assert [i.key for i in everything] == sorted(contents)
    for info in everything:
        assert info.size == len(contents[info.key])
        assert before <= info.modified <= after
        assert info.etag
    assert [i.key for i in store.list("requests/")] == [
        "requests/r1.json",
        "requests/r10.json",
        "requests/r2.json",
        "requests/rejected/r3.json",
    ]
    # a plain string prefix, as on S3: "r1" also matches "r10"
    assert [i.key for i in store.list("requests/r1")] == ["requests/r1.json", "requests/r10.json"]
    assert [i.key for i in store.list("requests/rejected/")] == ["requests/rejected/r3.json"]
    assert store.list("nothing/") == []
    assert store.list("renders") == store.list("renders/")


def test_etag_changes_when_content_changes(store):
    store.put_bytes("templates/alice/source.png", b"aaaa")
    first = store.list("templates/")[0].etag
    store.put_bytes("templates/alice/source.png", b"bbbb")  # same size, immediately after
    second = store.list("templates/")[0].etag
    store.put_bytes("templates/bob/source.png", b"aaaa")
    assert first != second
    assert store.list("templates/alice/")[0].etag == second  # stable while unchanged


def test_exists_and_delete(store):
    assert not store.exists("audio/r1.wav")
    store.put_bytes("audio/r1.wav", b"RIFF")
    store.put_bytes("audio/r1/inner.wav", b"x")
    assert store.exists("audio/r1.wav")
    assert not store.exists("audio/r1")  # a "directory" is not an object
    store.delete("audio/r1.wav")
    assert not store.exists("audio/r1.wav")
    store.delete("audio/r1.wav")  # deleting a missing object is fine (S3 semantics)
    store.delete("audio/r1")  # not an object: nothing happens
    assert _keys(store) == ["audio/r1/inner.wav"]


def test_delete_prefix_removes_exactly_the_prefix(store):
    for key in ["work/r1/features.safetensors", "work/r1/chunks/0000.mp4", "work/r10/x", "work/r2/y", "z"]:
        store.put_bytes(key, b"data")
    assert store.delete_prefix("work/r1/") == 2
    assert _keys(store) == ["work/r10/x", "work/r2/y", "z"]
    assert store.delete_prefix("work/r1/") == 0
    assert store.delete_prefix("") == 3
    assert _keys(store) == []


def test_delete_prefix_takes_a_killed_writers_temporaries_along(tmp_path):
    """A writer SIGKILLed mid-upload leaves a hidden temporary beside the key it was writing: never an
    object, and gone with the prefix, so a request's work/ directory leaves nothing behind."""
    store = LocalStore(tmp_path)
    store.put_bytes("work/r1/chunks/0000.mp4", b"segment")
    (tmp_path / "work/r1/chunks/.0001.mp4.0123456789ab~tmp").write_bytes(b"half a segm")
    (tmp_path / "work/r2").mkdir()
    (tmp_path / "work/r2/.x.0123456789ab~tmp").write_bytes(b"another request's upload")
    assert _keys(store) == ["work/r1/chunks/0000.mp4"]
    assert store.delete_prefix("work/r1/") == 1
    assert not (tmp_path / "work/r1").exists()
    assert (tmp_path / "work/r2/.x.0123456789ab~tmp").exists()  # outside the prefix: untouched


def test_move(store):
    store.put_bytes("work/r1/chunks/0000.mp4", b"segment")
    store.move("work/r1/chunks/0000.mp4", "renders/r1.mp4")
    assert store.get_bytes("renders/r1.mp4") == b"segment"
    assert _keys(store) == ["renders/r1.mp4"]
    store.move("renders/r1.mp4", "renders/r1.mp4")
    assert store.get_bytes("renders/r1.mp4") == b"segment"
    store.put_bytes("a", b"new")
    store.move("a", "renders/r1.mp4")  # replaces the destination
    assert store.get_bytes("renders/r1.mp4") == b"new"
    with pytest.raises(StoreError) as err:
        store.move("missing.mp4", "renders/r2.mp4")
    assert str(err.value) == f"object not found: {store.uri('missing.mp4')}"
    assert not store.exists("renders/r2.mp4")


def test_missing_key_error_names_the_object(store, tmp_path):
    uri = store.uri("renders/nope.mp4")
    assert uri.endswith("/renders/nope.mp4")
    assert store.uri("renders/") == uri.removesuffix("nope.mp4")
    with pytest.raises(StoreError) as err:
        store.get_bytes("renders/nope.mp4")
    assert str(err.value) == f"object not found: {uri}"
    dest = tmp_path / "dl" / "nope.mp4"
    with pytest.raises(StoreError) as err:
        store.get_file("renders/nope.mp4", dest)
    assert str(err.value) == f"object not found: {uri}"
    assert not dest.exists()
    assert not dest.parent.exists() or os.listdir(dest.parent) == []


def test_put_file_of_missing_local_file_names_it(store, tmp_path):
    with pytest.raises(InputError, match=r"no such file: .*absent\.wav"):
        store.put_file("audio/r1.wav", tmp_path / "absent.wav")


BAD_KEYS = ["../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "a/", ".", "..", "a\\b", "a\x00b", "é", ""]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_every_method_refuses_bad_keys(store, tmp_path, bad):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    calls = [
        lambda: store.get_bytes(bad),
        lambda: store.put_bytes(bad, b"x"),
        lambda: store.get_file(bad, tmp_path / "out"),
        lambda: store.put_file(bad, src),
        lambda: store.exists(bad),
        lambda: store.delete(bad),
        lambda: store.move(bad, "ok"),
        lambda: store.move("ok", bad),
    ]
    if bad not in ("", "a/"):  # "" and "a/" are valid prefixes
        calls += [lambda: store.list(bad), lambda: store.delete_prefix(bad), lambda: store.uri(bad)]
    for call in calls:
        with pytest.raises(InputError, match="invalid object key"):
            call()
    assert _keys(store) == []


# ---------------------------------------------------------------------------------------------
# check_key and the local root, property-based

ALLOWED = set(string.ascii_letters + string.digits + "._-/")


def reference_accepts(key: str) -> bool:
    """Independent statement of a safe key: normalised, relative, no parent references, ASCII subset."""
    return (
        0 < len(key) <= 1024
        and set(key) <= ALLOWED
        and not key.startswith("/")
        and posixpath.normpath(key) == key
        and key not in (".", "..")
        and not key.startswith("../")
        and all(len(seg) <= 255 for seg in key.split("/"))
    )


SEGMENT = st.one_of(
    st.sampled_from([".", "..", "", "...", ".hidden", "a", "b.txt", "..a", "a..", "-", "_", "C:", "x" * 256]),
    st.sampled_from(["\\", "..\\..", "\x00", "\n", "é", "ａ", " ", "~", "%2e%2e", "a\x7f"]),
    st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=6),
    st.text(max_size=4),
)
KEYS = st.one_of(
    st.lists(SEGMENT, min_size=1, max_size=5).map("/".join),
    st.lists(SEGMENT, min_size=1, max_size=3).map(lambda segs: "/" + "/".join(segs)),
    st.text(max_size=12),
)


@settings(max_examples=400, deadline=None)
@given(KEYS)
def test_check_key_agrees_with_reference(key):
    if reference_accepts(key):
        assert check_key(key) == key
    else:
        with pytest.raises(InputError):
            check_key(key)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(alphabet=string.ascii_letters + "._-", min_size=1, max_size=5), max_size=3),
    st.sampled_from(["..", ".", "", "a\\b", "\\", "a\x00", "\x00", "é", "\u202e", "ａ"]),
    st.lists(st.text(alphabet=string.ascii_letters, min_size=1, max_size=5), max_size=3),
    st.booleans(),
)
def test_check_key_refuses_traversal(head, bad, tail, absolute):
    key = ("/" if absolute else "") + "/".join([*head, bad, *tail])
    with pytest.raises(InputError):
        check_key(key)


@settings(max_examples=150, deadline=None)
@given(KEYS)
def test_local_store_never_writes_outside_its_root(key):
    with tempfile.TemporaryDirectory() as sandbox:
        root = Path(sandbox) / "deep" / "root"
        store = LocalStore(root)
        try:
            store.put_bytes(key, b"payload")
        except InputError:
            assert not reference_accepts(key)
        else:
            assert reference_accepts(key)
            assert (root / key).read_bytes() == b"payload"
        written = [Path(d, f) for d, _, files in os.walk(sandbox) for f in files]
        assert all(p.resolve().is_relative_to(root.resolve()) for p in written)
        assert len(written) == (1 if reference_accepts(key) else 0)


# ---------------------------------------------------------------------------------------------
# local backend specifics


def test_local_symlink_pointing_outside_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside / "empty").mkdir(parents=True)
    (outside / "secret").write_bytes(b"secret")
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "file-link").symlink_to(outside / "secret")
    store = LocalStore(root)

    for call in [
        lambda: store.put_bytes("link/new", b"x"),
        lambda: store.put_bytes("link/sub/new", b"x"),
        lambda: store.get_bytes("link/secret"),
        lambda: store.get_bytes("file-link"),
        lambda: store.exists("link/secret"),
        lambda: store.delete("link/secret"),
        lambda: store.move("link/secret", "stolen"),
        lambda: store.move("file-link", "stolen"),
    ]:
        with pytest.raises(StoreError, match="resolves outside the store root"):
            call()
    assert store.list("") == []
    assert store.list("link/") == []
    assert store.delete_prefix("link/") == 0
    assert store.delete_prefix("") == 0
    assert sorted(os.listdir(outside)) == ["empty", "secret"]
    assert (outside / "secret").read_bytes() == b"secret"
    assert not (root / "stolen").exists()


def test_local_symlink_inside_root_is_followed(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.put_bytes("real/x", b"x")
    (tmp_path / "root" / "alias").symlink_to(tmp_path / "root" / "real")
    assert store.get_bytes("alias/x") == b"x"


def test_local_etag_changes_on_in_place_edit(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("templates/a/settings.yaml", b"fps: 25\n")
    before = store.list("templates/")[0].etag
    path = tmp_path / "templates" / "a" / "settings.yaml"
    stat = path.stat()
    path.write_bytes(b"fps: 30\n")  # an editor saving in place: same inode, same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert store.list("templates/")[0].etag != before


def test_local_failed_write_keeps_old_object_and_no_temp_file(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("renders/r1.json", b"old")
    with pytest.raises(TypeError):
        store.put_bytes("renders/r1.json", "not bytes")  # fails inside the temp-file write
    assert store.get_bytes("renders/r1.json") == b"old"
    assert os.listdir(tmp_path / "renders") == ["r1.json"]


def test_local_objects_get_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    LocalStore(tmp_path).put_bytes("a/b", b"x")
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o666 & ~umask


def test_local_list_skips_temp_and_foreign_files_and_prunes_directories(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("work/r1/chunks/0000.mp4", b"x")
    (tmp_path / "work" / "r1" / ".0123abcd~tmp").write_bytes(b"partial")
    (tmp_path / "work" / "r1" / "bad name.mp4").write_bytes(b"foreign")
    assert _keys(store) == ["work/r1/chunks/0000.mp4"]
    store.put_bytes("work/r2/chunks/0000.mp4", b"y")
    assert store.delete_prefix("work/r2/") == 1
    assert sorted(os.listdir(tmp_path / "work")) == ["r1"]  # r2's emptied folders are gone
    store.put_bytes("cache/templates/a/0123456789abcdef/manifest.json", b"{}")
    assert store.delete_prefix("cache/templates/a") == 1  # a string prefix: the walk starts one level up
    assert os.listdir(tmp_path / "cache" / "templates") == []  # never pruned above the prefix


# ---------------------------------------------------------------------------------------------
# S3 backend specifics


def test_s3_prefix_isolation_and_foreign_objects(s3_bucket, s3_endpoint):
    raw = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    raw.put_object(Bucket=s3_bucket, Key="other/x", Body=b"x")
    raw.put_object(Bucket=s3_bucket, Key="tenant/a/bad name", Body=b"x")
    raw.put_object(Bucket=s3_bucket, Key="tenant/a/folder/", Body=b"")
    store = S3Store(s3_bucket, prefix="/tenant/a/", endpoint_url=s3_endpoint)
    store.put_bytes("requests/r1.json", b"{}")
    assert raw.get_object(Bucket=s3_bucket, Key="tenant/a/requests/r1.json")["Body"].read() == b"{}"
    assert _keys(store) == ["requests/r1.json"]
    assert store.uri("requests/r1.json") == f"s3://{s3_bucket}/tenant/a/requests/r1.json"
    assert store.uri("") == f"s3://{s3_bucket}/tenant/a/"
    assert store.list("")[0].etag == hashlib.md5(b"{}").hexdigest()  # S3's single-PUT etag
    store.delete_prefix("")
    remaining = sorted(o["Key"] for o in raw.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert remaining == ["other/x", "tenant/a/bad name", "tenant/a/folder/"]


def test_s3_missing_bucket(s3_endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = S3Store("no-such-bucket-here", endpoint_url=s3_endpoint)
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    for call in [
        lambda: store.put_bytes("a", b"x"),
        lambda: store.put_file("a", src),
        lambda: store.list(""),
    ]:
        with pytest.raises(
            StoreError, match=f"^bucket not found: s3://no-such-bucket-here at {s3_endpoint}$"
        ):
            call()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_unreachable_endpoint_fails_fast_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = S3Store("bucket", endpoint_url=endpoint)  # default retries, as open_store builds it
    start = time.monotonic()
    with pytest.raises(StoreError) as err:
        store.get_bytes("requests/r1.json")
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert message.startswith(f"object store unreachable at {endpoint}: ")
    assert "\n" not in message

    once = S3Store("bucket", endpoint_url=endpoint, max_attempts=1)
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    for call in [
        lambda: once.put_bytes("a", b"x"),
        lambda: once.put_file("a", src),
        lambda: once.get_file("a", tmp_path / "out.bin"),
        lambda: once.exists("a"),
        lambda: once.list(""),
        lambda: once.delete_prefix("a/"),
        lambda: once.move("a", "b"),
    ]:
        with pytest.raises(StoreError, match=f"^object store unreachable at {endpoint}: [^\n]*$"):
            call()
    assert os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize(
    ("variable", "raw", "error"),
    [
        (
            "MUSETALK_S3_READ_TIMEOUT",
            "soon",
            "$MUSETALK_S3_READ_TIMEOUT must be a number of seconds, got 'soon'",
        ),
        ("MUSETALK_S3_READ_TIMEOUT", "0", "S3 timeout must be in (0, 3600] seconds, got 0.0"),
        ("MUSETALK_S3_CONNECT_TIMEOUT", "nan", "S3 timeout must be in (0, 3600] seconds, got nan"),
        ("MUSETALK_S3_CONNECT_TIMEOUT", "1e9", "S3 timeout must be in (0, 3600] seconds, got 1000000000.0"),
    ],
)
def test_s3_timeouts_from_the_environment(monkeypatch, variable, raw, error):
    monkeypatch.setenv(variable, raw)
    with pytest.raises(InputError) as bad:
        S3Store("bucket", endpoint_url="http://127.0.0.1:9")
    assert str(bad.value).startswith(error)
    monkeypatch.setenv(variable, " 2.5 ")
    config = S3Store("bucket", endpoint_url="http://127.0.0.1:9")._client.meta.config
    timeouts = {
        "MUSETALK_S3_READ_TIMEOUT": config.read_timeout,
        "MUSETALK_S3_CONNECT_TIMEOUT": config.connect_timeout,
    }
    assert timeouts[variable] == 2.5
    monkeypatch.delenv(variable)
    config = S3Store("bucket", endpoint_url="http://127.0.0.1:9", read_timeout=7)._client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (5.0, 7)


# ---------------------------------------------------------------------------------------------
# open_store


def test_open_store_local_from_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MUSETALK_S3_BUCKET", raising=False)
    monkeypatch.setenv("MUSETALK_STORE", str(tmp_path / "env-store"))
    store = open_store()
    assert isinstance(store, LocalStore)
    assert (
        store.uri("requests/r1.json") == (tmp_path / "env-store" / "requests" / "r1.json").resolve().as_uri()
    )
    store.put_bytes("requests/r1.json", b"{}")
    assert (tmp_path / "env-store" / "requests" / "r1.json").read_bytes() == b"{}"
    assert open_store(tmp_path / "flag-store").root == (tmp_path / "flag-store").resolve()
    monkeypatch.delenv("MUSETALK_STORE")
    monkeypatch.chdir(tmp_path)
    assert open_store().root == tmp_path.resolve() / ".musetalk" / "store"


def test_open_store_s3_from_environment(s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("MUSETALK_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("MUSETALK_S3_PREFIX", "musetalk/")
    store = open_store()
    assert isinstance(store, S3Store)
    assert store.endpoint == s3_endpoint
    store.put_bytes("requests/r1.json", b"{}")
    raw = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert raw.get_object(Bucket=s3_bucket, Key="musetalk/requests/r1.json")["Body"].read() == b"{}"
    # without an explicit endpoint, boto3 itself picks up AWS_ENDPOINT_URL_S3
    assert S3Store(s3_bucket, prefix="musetalk").get_bytes("requests/r1.json") == b"{}"


# ---------------------------------------------------------------------------------------------
# key helpers


def test_key_helpers_follow_the_design_layout():
    fp = "0123456789abcdef"
    assert keys.template_prefix("alice") == "templates/alice/"
    assert keys.template_source("alice", ".PNG") == "templates/alice/source.png"
    assert keys.template_source("alice", "mp4") == "templates/alice/source.mp4"
    assert keys.template_settings("alice") == "templates/alice/settings.yaml"
    assert keys.cache_prefix("alice", fp) == "cache/templates/alice/0123456789abcdef/"
    assert keys.request("req-1") == "requests/req-1.json"
    assert keys.rejected_request("req-1") == "requests/rejected/req-1.json"
    assert keys.rejected_reason("req-1") == "requests/rejected/req-1.reason.txt"
    assert keys.audio("req-1", "wav") == "audio/req-1.wav"
    assert keys.audio("req-1", ".M4A") == "audio/req-1.m4a"
    assert keys.work_prefix("req-1") == "work/req-1/"
    assert keys.work_features("req-1") == "work/req-1/features.safetensors"
    assert keys.work_chunk("req-1", 3) == "work/req-1/chunks/0003.mp4"
    assert keys.render_video("req-1") == "renders/req-1.mp4"
    assert keys.render_timings("req-1") == "renders/req-1.json"
    assert keys.welcome_video("alice", fp) == "welcome/alice/0123456789abcdef.mp4"


ID_HELPERS = [
    lambda i: keys.template_prefix(i),
    lambda i: keys.template_source(i, "png"),
    lambda i: keys.template_settings(i),
    lambda i: keys.cache_prefix(i, "0123456789abcdef"),
    lambda i: keys.request(i),
    lambda i: keys.rejected_request(i),
    lambda i: keys.rejected_reason(i),
    lambda i: keys.audio(i, "wav"),
    lambda i: keys.work_prefix(i),
    lambda i: keys.work_features(i),
    lambda i: keys.work_chunk(i, 0),
    lambda i: keys.render_video(i),
    lambda i: keys.render_timings(i),
    lambda i: keys.welcome_video(i, "0123456789abcdef"),
]


@pytest.mark.parametrize("bad_id", ["", "..", "../x", "a/b", "Alice", "-a", "a" * 65, "é", "a.b", None, 7])
def test_key_helpers_reject_bad_ids(bad_id):
    for helper in ID_HELPERS:
        with pytest.raises(InputError, match=r"invalid (template|request) id"):
            helper(bad_id)


def test_key_helpers_reject_bad_extensions_fingerprints_and_chunks():
    for ext in ["exe", "", "wav/../x", "mp4", None]:
        with pytest.raises(InputError, match="unsupported audio type"):
            keys.audio("r1", ext)
    for ext in ["gif", "mp3", ".", "png/x", "tiff"]:
        with pytest.raises(InputError, match="unsupported template source type"):
            keys.template_source("a", ext)
    for fp in ["0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "g123456789abcdef", "../x"]:
        for helper in (keys.cache_prefix, keys.welcome_video):
            with pytest.raises(InputError, match="invalid fingerprint"):
                helper("alice", fp)
    for n in [-1, 10000, True, 1.0, "1"]:
        with pytest.raises(InputError, match="invalid chunk number"):
            keys.work_chunk("r1", n)


def test_every_helper_key_is_a_valid_store_key():
    for helper in ID_HELPERS:
        key = helper("a" * 64)
        assert check_key(key.removesuffix("/")) == key.removesuffix("/")


# ---------------------------------------------------------------------------------------------
# push_templates


def _repo(tmp_path) -> Path:
    repo = tmp_path / "templates"
    (repo / "alice").mkdir(parents=True)
    (repo / "alice" / "source.PNG").write_bytes(b"\x89PNG alice")
    (repo / "alice" / "settings.yaml").write_bytes(b"fps: 25\n")
    (repo / "bob").mkdir()
    (repo / "bob" / "source.mp4").write_bytes(b"bob video")
    (repo / "bob" / ".DS_Store").write_bytes(b"junk")
    (repo / "README.md").write_text("bundled templates\n")
    return repo


def test_push_templates_uploads_and_is_idempotent(store, tmp_path):
    repo = _repo(tmp_path)
    store.put_bytes("templates/carol/source.jpg", b"carol")  # not in the repository: untouched
    written = push_templates(repo, store)
    assert sorted(written) == [
        "templates/alice/settings.yaml",
        "templates/alice/source.png",
        "templates/bob/source.mp4",
    ]
    assert store.get_bytes("templates/alice/source.png") == b"\x89PNG alice"
    assert store.get_bytes("templates/alice/settings.yaml") == b"fps: 25\n"
    assert store.get_bytes("templates/bob/source.mp4") == b"bob video"

    etags = {i.key: i.etag for i in store.list("templates/")}
    assert push_templates(repo, store) == []
    assert {i.key: i.etag for i in store.list("templates/")} == etags  # nothing rewritten

    (repo / "alice" / "settings.yaml").write_bytes(b"fps: 30\n")  # same size, new content
    assert push_templates(repo, store) == ["templates/alice/settings.yaml"]
    assert store.get_bytes("templates/alice/settings.yaml") == b"fps: 30\n"

    (repo / "bob" / "source.mp4").rename(repo / "bob" / "source.mov")
    (repo / "alice" / "settings.yaml").unlink()
    assert push_templates(repo, store) == ["templates/bob/source.mov"]
    assert _keys(store) == [
        "templates/alice/source.png",
        "templates/bob/source.mov",
        "templates/carol/source.jpg",
    ]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: (r / "Bad Name").mkdir(), "invalid template id"),
        (lambda r: (r / "bob" / "source.webm").write_bytes(b"x"), "expected exactly one source"),
        (lambda r: (r / "bob" / "source.mp4").unlink(), "expected exactly one source"),
        (
            lambda r: (r / "bob" / "source.mp4").rename(r / "bob" / "source.gif"),
            "unsupported template source",
        ),
        (lambda r: (r / "bob" / "settings.yml").write_bytes(b"x"), "unexpected .*settings.yml"),
    ],
)
def test_push_templates_validates_everything_before_writing(store, tmp_path, mutate, message):
    repo = _repo(tmp_path)
    mutate(repo)
    with pytest.raises(InputError, match=message):
        push_templates(repo, store)
    assert _keys(store) == []


def test_push_templates_refuses_an_empty_or_missing_directory(store, tmp_path):
    with pytest.raises(InputError, match="templates directory not found"):
        push_templates(tmp_path / "missing", store)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no template directories"):
        push_templates(tmp_path / "empty", store)


def test_push_templates_uploads_the_welcome_audio_its_settings_name(store, tmp_path):
    repo = _repo(tmp_path)
    (repo / "alice" / "settings.yaml").write_bytes(b"welcome_audio: hello.wav\n")
    (repo / "alice" / "hello.wav").write_bytes(b"RIFF welcome")
    assert "templates/alice/hello.wav" in push_templates(repo, store)
    assert store.get_bytes("templates/alice/hello.wav") == b"RIFF welcome"


@pytest.mark.parametrize(
    ("settings", "files", "message"),
    [
        (b"welcome_audio: hello.wav\n", {}, "welcome_audio 'hello.wav' is not in"),
        (b"welcome_text: Hi\n", {"hello.wav": b"x"}, "unexpected .*hello.wav"),
        (b"welcome_audio: ../x.wav\n", {}, "must be a file name"),
        (b"welcome_audio: h\xc3\xa9llo.wav\n", {"h\u00e9llo.wav": b"x"}, "invalid"),
    ],
)
def test_push_templates_refuses_a_bad_welcome_audio(store, tmp_path, settings, files, message):
    repo = _repo(tmp_path)
    (repo / "alice" / "settings.yaml").write_bytes(settings)
    for name, data in files.items():
        (repo / "alice" / name).write_bytes(data)
    with pytest.raises(InputError, match=message):
        push_templates(repo, store)
    assert _keys(store) == []
