"""Content credentials: a render signed with a test chain carries a C2PA manifest that validates and
asserts what made it; a changed byte, a missing manifest and an untrusted chain are reported; without a
certificate renders succeed unsigned (docs/credentials.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from musetalk_ops.credentials import (
    CERT_ENV,
    KEY_ENV,
    TRAINED_ALGORITHMIC_MEDIA,
    TRUST_ENV,
    verify_video,
    write_dev_certificate,
)
from musetalk_ops.video import probe


def musetalk(*args, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (CERT_ENV, KEY_ENV, TRUST_ENV)}
    return subprocess.run(
        [sys.executable, "-m", "musetalk_ops.cli", *map(str, args)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def render(out, cache, audio, models, env: dict) -> subprocess.CompletedProcess:
    flags = ["--models", models, "--device", "cpu", "--batch-size", "8", "--no-progress"]
    return musetalk("render", "--template", cache, "--audio", audio, "--out", out, *flags, env=env)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, str]:
    """A test signing chain written by ``musetalk credentials dev-cert``: {variable: path}."""
    directory = tmp_path_factory.mktemp("credentials")
    done = musetalk("credentials", "dev-cert", "--dir", directory, env={})
    assert done.returncode == 0, done.stderr
    assert (
        "TEST signing chain" in done.stdout
        and oct((directory / "signer-key.pem").stat().st_mode)[-3:] == "600"
    )
    return {
        CERT_ENV: str(directory / "signer-chain.pem"),
        KEY_ENV: str(directory / "signer-key.pem"),
        TRUST_ENV: str(directory / "test-root.pem"),
    }


@pytest.fixture(scope="module")
def signed(tmp_path_factory, chain, astronaut_cache, short_speech, demo_models):
    out = tmp_path_factory.mktemp("signed") / "signed.mp4"
    done = render(
        out, astronaut_cache, short_speech, demo_models, {CERT_ENV: chain[CERT_ENV], KEY_ENV: chain[KEY_ENV]}
    )
    assert done.returncode == 0, done.stderr
    assert "signed)" in done.stdout.splitlines()[0]
    return out


def test_a_signed_render_validates_and_asserts_what_made_it(signed, chain, astronaut_cache):
    from musetalk_ops.template_cache import read_cache

    info = probe(signed)
    assert info.video_codec == "h264" and info.audio_codec == "aac" and "generated" in info.comment.lower()
    found = verify_video(signed)
    assert found.state == "Valid" and found.signed and not found.trusted  # no trust anchors given
    assert found.source_type == TRAINED_ALGORITHMIC_MEDIA and found.generator == "musetalk-pipeline 0.1.0"
    assert found.signer == "musetalk test signer" and "TEST certificate" in found.issuer
    template = read_cache(astronaut_cache)
    assert found.provenance == {
        "model": "v15",
        "weights": "demo",
        "template": template.id,
        "cache_fingerprint": template.fingerprint,
    }  # a CLI render names no request
    assert verify_video(signed, trust=chain[TRUST_ENV]).trusted


def test_verify_exits_zero_for_signed_and_nonzero_for_untrusted_when_trust_is_required(signed, chain):
    done = musetalk("verify", signed, env={})
    assert done.returncode == 0 and "intact and signed: valid, signer not trusted" in done.stdout
    assert "trainedAlgorithmicMedia" in done.stdout
    trusted = musetalk("verify", signed, "--require-trusted", env={TRUST_ENV: chain[TRUST_ENV]})
    assert trusted.returncode == 0 and "intact and signed: trusted" in trusted.stdout
    assert musetalk("verify", signed, "--require-trusted", env={}).returncode == 1


def test_a_changed_byte_is_reported_invalid(signed, tmp_path):
    data = bytearray(signed.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01  # inside the media data, past the moov box
    tampered = tmp_path / "tampered.mp4"
    tampered.write_bytes(data)
    done = musetalk("verify", tampered, env={})
    assert done.returncode == 1 and "content credentials INVALID" in done.stdout
    assert "assertion.bmffHash.mismatch" in done.stdout


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory, astronaut_cache, short_speech, demo_models):
    """A render with no certificate configured, and what the command printed."""
    out = tmp_path_factory.mktemp("unsigned") / "plain.mp4"
    return out, render(out, astronaut_cache, short_speech, demo_models, env={})


def test_without_a_certificate_renders_succeed_unsigned_and_say_so_once(unsigned):
    out, done = unsigned
    assert done.returncode == 0, done.stderr
    assert "unsigned)" in done.stdout.splitlines()[0] and done.stderr.count("delivered unsigned") == 1
    assert "generated" in probe(out).comment.lower()  # the comment tag stays
    missing = musetalk("verify", out, env={})
    assert missing.returncode == 1 and "no content credentials" in missing.stdout


def test_the_identity_may_be_the_pem_text_itself(unsigned, chain, tmp_path, monkeypatch):
    """As a Kubernetes Secret key gives it (k8s/values.yaml)."""
    from musetalk_ops.credentials import Provenance, sign_video

    copy = tmp_path / "copy.mp4"
    copy.write_bytes(unsigned[0].read_bytes())
    for variable in (CERT_ENV, KEY_ENV):
        monkeypatch.setenv(variable, Path(chain[variable]).read_text())
    identity = sign_video(copy, Provenance("v15", "demo", "astronaut", "0" * 16, "from-secret"))
    assert identity is not None and "musetalk test signer" in identity.subject
    found = verify_video(copy)
    assert found.signed and found.provenance["request"] == "from-secret"


def test_half_a_signing_identity_is_one_line_before_any_work(
    tmp_path, chain, astronaut_cache, short_speech, demo_models
):
    done = render(
        tmp_path / "x.mp4", astronaut_cache, short_speech, demo_models, env={CERT_ENV: chain[CERT_ENV]}
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(f"set both ${CERT_ENV} and ${KEY_ENV}, or neither")
    assert not (tmp_path / "x.mp4").exists()


def test_the_development_chain_is_written_whole(tmp_path):
    paths = write_dev_certificate(tmp_path / "c")
    assert sorted(p.name for p in paths.values()) == ["signer-chain.pem", "signer-key.pem", "test-root.pem"]
    assert paths[CERT_ENV].read_text().count("BEGIN CERTIFICATE") == 2  # signer, then root
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(p.name for p in paths.values())


def test_a_key_that_does_not_match_the_chain_is_refused_without_echoing_it(
    tmp_path, chain, astronaut_cache, short_speech, demo_models
):
    other = write_dev_certificate(tmp_path / "other")
    env = {CERT_ENV: chain[CERT_ENV], KEY_ENV: str(other[KEY_ENV])}
    done = render(tmp_path / "x.mp4", astronaut_cache, short_speech, demo_models, env=env)
    assert done.returncode == 2 and "is not the key of the first certificate" in done.stderr
    secret = "Bag Attributes\n    localKeyID: 01\nsecret-material-never-printed"
    done = render(
        tmp_path / "x.mp4", astronaut_cache, short_speech, demo_models, env={**env, KEY_ENV: secret}
    )
    assert done.returncode == 2 and "secret-material" not in done.stderr and "(PEM text)" in done.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_a_null_request_option_means_the_default():
    from musetalk_ops.options import check_request_options

    assert check_request_options({"crf": None, "preset": None, "batch_size": 8}) == {"batch_size": 8}
