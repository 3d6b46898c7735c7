"""Hostile request objects and ids (hypothesis): refused with a one-line reason, never a path outside
the store, never a crash of the sensor that would block the requests behind them."""

import json
import os
import string
import time
from pathlib import Path

import dagster as dg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from musetalk_ops.errors import InputError
from musetalk_ops.ids import ID_PATTERN, validate_id
from musetalk_ops.keys import AUDIO_EXTS
from musetalk_ops.options import REQUEST_OPTIONS
from musetalk_ops.store import LocalStore, check_key
from pipelines.request import MAX_REQUEST_BYTES, parse_request
from pipelines.resources import StoreResource
from pipelines.sensors import render_request_sensor

HOSTILE_STRINGS = [
    "../secret",
    "../../etc/passwd",
    "/etc/passwd",
    "audio/../../x.wav",
    "audio/../requests/a.wav",
    "audio//a.wav",
    "audio/a.wav/../../b.wav",
    "..\\..\\windows.wav",
    "C:\\audio\\a.wav",
    "audio/%2e%2e%2fa.wav",
    "audio/a\x00.wav",
    "audio/a\n.wav",
    "audio/ａ.wav",  # fullwidth a
    "audio/а.wav",  # Cyrillic a
    "audio/.wav",
    "audio/-a.wav",
    "audio/a.exe",
    "audio/a.WAV/..",
    "~/a.wav",
    "s3://other-bucket/a.wav",
    "file:///etc/passwd",
    "audio/" + "a" * 5000 + ".wav",
    "",
    " ",
    "CON",
    "a" * 65,
    "Alice",
    "é",
    "\u202eevil",
]
HUGE = [10**100, -(10**100), 2**63, -1, 0, 1e308, -1e308, float("inf"), float("nan"), 1e-320]

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(HUGE)
    | st.text()
    | st.sampled_from(HOSTILE_STRINGS)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ids = st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=70) | st.from_regex(ID_PATTERN, fullmatch=True)
options = st.dictionaries(
    st.sampled_from([*REQUEST_OPTIONS, "device", "models_root", "__class__", "fps "]), json_values, max_size=4
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "template": ids | json_values,
        "audio": st.sampled_from(HOSTILE_STRINGS)
        | st.builds(lambda i, e: f"audio/{i}.{e}", ids, st.sampled_from([*AUDIO_EXTS, "exe", "", "WAV"]))
        | json_values,
        "options": options | json_values,
        "extra": json_values,
    },
)


def one_line(error: Exception) -> str:
    message = str(error)
    assert message and "\n" not in message and len(message) < 600, repr(message)
    return message


def check_parsed(rid: str, data: bytes) -> None:
    """Either a request whose every part is safe, or an InputError with a one-line message."""
    try:
        request = parse_request(rid, data)
    except InputError as e:
        one_line(e)
        return
    assert ID_PATTERN.fullmatch(request.id) and ID_PATTERN.fullmatch(request.template)
    name, ext = request.audio.removeprefix("audio/").rsplit(".", 1)
    assert request.audio.startswith("audio/") and ID_PATTERN.fullmatch(name) and ext in AUDIO_EXTS
    assert check_key(request.audio) == request.audio
    assert set(request.options) <= set(REQUEST_OPTIONS)
    from musetalk_ops.render.settings import RenderSettings

    RenderSettings(**request.options)  # the run would accept the same options


@settings(max_examples=300, deadline=None)
@given(rid=ids, body=bodies)
def test_request_objects_are_parsed_safely_or_refused(rid, body):
    check_parsed(rid, json.dumps(body, allow_nan=True).encode())


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_are_refused_with_one_line(data):
    check_parsed("req", data)


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,  # nesting deeper than the JSON parser's recursion limit
        b'{"template": "a", "audio": "audio/a.wav", "options": {"batch_size": ' + b"9" * 5000 + b"}}",
        b'{"template": "a", "audio": "audio/a.wav", "options": {"fps": NaN}}',
        b'{"template": "a", "audio": "audio/a.wav", "options": {"batch_size": 1e400}}',
        b'{"template": "a", "audio": "audio/a.wav", "options": {"batch_size": true}}',
        b'{"template": "a", "template": "../b", "audio": "audio/a.wav"}',
        b"\xff\xfe{}",
        b'{"template": "a", "audio": "audio/a.wav", "pad": "' + b" " * MAX_REQUEST_BYTES + b'"}',
    ],
    ids=["deep", "5000-digits", "nan", "1e400", "bool", "duplicate-key", "utf16-bom", "oversized"],
)
def test_pathological_json_is_an_input_error(data):
    with pytest.raises(InputError) as refused:
        parse_request("req", data)
    one_line(refused.value)


@settings(max_examples=300, deadline=None)
@given(value=ids | json_values)
def test_ids_are_the_documented_pattern_or_refused(value):
    try:
        assert validate_id(value, "request id") == value
    except InputError as e:
        assert "invalid request id" in one_line(e)
        return
    assert isinstance(value, str) and ID_PATTERN.fullmatch(value)
    assert set(value) <= set(string.ascii_lowercase + string.digits + "_-")


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path):
    """A store root inside a directory whose other contents must never change."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.wav").write_bytes(b"secret")
    return tmp_path


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=ids, body=bodies)
def test_sensor_refuses_hostile_requests_without_writing_outside_the_store(sandbox, name, body):
    """Whatever is dropped into requests/, the sensor either launches a valid id or moves the object
    to requests/rejected/ with its reason; the tick never fails, nothing appears outside the store."""
    import uuid

    store_root = sandbox / f"store-{uuid.uuid4().hex[:8]}"
    store = LocalStore(store_root)
    before = tree(sandbox)
    key = f"requests/{name}.json"
    try:
        check_key(key)
    except InputError:
        # Not a key of the layout: a client cannot create it through the store at all.
        with pytest.raises(InputError):
            store.put_bytes(key, b"{}")
        return
    store.put_bytes(key, json.dumps(body, allow_nan=True).encode())
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("templates", ["known"])
        with dg.build_sensor_context(
            instance=instance, resources={"store": StoreResource(root=str(store_root))}
        ) as context:
            result = render_request_sensor(context)
    # The template has no cache, so no request is runnable: every one is rejected with a reason.
    assert result.run_requests == []
    listed = {i.key for i in store.list("")}
    if "/" in name:  # below requests/ (like requests/rejected/): not a request, left alone
        assert listed == {key}
        return
    assert key not in listed
    assert f"requests/rejected/{name}.json" in listed
    reason = store.get_bytes(f"requests/rejected/{name}.reason.txt").decode()
    assert reason.endswith("\n") and reason.count("\n") == 1 and reason.strip()
    after = tree(sandbox)
    assert {p for p in after - before if not p.startswith(store_root.name)} == set()


def test_sensor_survives_oversized_and_foreign_objects(tmp_path):
    """An oversized object is refused without being read; objects with names outside the key
    alphabet (written straight into the folder) are ignored, and valid requests still run."""
    store = LocalStore(tmp_path / "store")
    requests = tmp_path / "store" / "requests"
    store.put_bytes("requests/big.json", b" " * (MAX_REQUEST_BYTES + 1))
    for odd in ("ü.json", "a b.json", "x.json.part"):
        (requests / odd).write_bytes(b'{"template": "t", "audio": "audio/x.wav"}')
    os.symlink("/etc/passwd", requests / "link.json")
    with dg.instance_for_test() as instance:
        start = time.monotonic()
        with dg.build_sensor_context(
            instance=instance, resources={"store": StoreResource(root=str(store.root))}
        ) as context:
            result = render_request_sensor(context)
        assert time.monotonic() - start < 10
    assert result.run_requests == []
    reason = store.get_bytes("requests/rejected/big.reason.txt").decode()
    assert f"over the {MAX_REQUEST_BYTES} byte limit" in reason
    assert sorted(p.name for p in requests.iterdir() if p.is_file() or p.is_symlink()) == sorted(
        ["ü.json", "a b.json", "x.json.part", "link.json"]
    )
