"""Content credentials (C2PA) on every delivered MP4: a manifest signed after the final mux that says,
verifiably, that the video is synthetic and how it was made (docs/credentials.md).

The deployment's signing identity is ``$MUSETALK_C2PA_CERT`` (the PEM chain, signer first) and
``$MUSETALK_C2PA_KEY`` (its PEM private key), each a file or the PEM text itself; without them videos
are delivered unsigned, said once per process. ``$MUSETALK_C2PA_TSA_URL`` adds a timestamp authority's
countersignature.
"""

import datetime
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from musetalk_ops import __version__
from musetalk_ops.errors import InputError, MuseTalkError
from musetalk_ops.files import atomic_path

log = logging.getLogger(__name__)

CERT_ENV = "MUSETALK_C2PA_CERT"
KEY_ENV = "MUSETALK_C2PA_KEY"
TRUST_ENV = "MUSETALK_C2PA_TRUST"
TSA_ENV = "MUSETALK_C2PA_TSA_URL"
GENERATOR = "musetalk-pipeline"
# IPTC's term for media made by a trained model, the C2PA spelling of "this is synthetic".
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
PROVENANCE_LABEL = "org.musetalk.render"  # our assertion: model, weights, template, cache, request
SIGNED_STATES = ("Valid", "Trusted")  # intact and validly signed; Trusted also chains to a trust anchor
DEV_CERT_DIR = Path(".musetalk/credentials")


class CredentialsError(MuseTalkError):
    """Signing failed: the identity is unusable for C2PA (a video is never delivered unsigned by accident)."""


@dataclass(frozen=True)
class Provenance:
    """What a video was made from, as its manifest asserts it."""

    model: str  # the MuseTalk version: v15 or v1
    weights: str  # the weights fingerprint, or "demo"
    template: str
    cache_fingerprint: str
    request: str | None = None  # None for a welcome video or a CLI render


def template_provenance(template, request: str | None = None) -> Provenance:
    """The provenance of a render from ``template`` (a ``template_cache.Template``)."""
    return Provenance(template.version, template.weights, template.id, template.fingerprint, request)


@dataclass(frozen=True)
class Identity:
    """A signing certificate chain and its key."""

    chain: bytes
    key: bytes
    subject: str
    algorithm: str  # C2PA's name: es256, es384, ps256, ed25519
    tsa_url: str | None = None


@dataclass
class Verification:
    """What ``verify_video`` found: ``state`` is None without credentials."""

    state: str | None
    failures: list[str] = field(default_factory=list)
    signer: str = ""
    issuer: str = ""
    generator: str = ""
    source_type: str = ""
    provenance: dict = field(default_factory=dict)

    @property
    def signed(self) -> bool:
        return self.state in SIGNED_STATES

    @property
    def trusted(self) -> bool:
        return self.state == "Trusted"


def _algorithm(key_pem: bytes, path: str):
    """C2PA's name for the key's signing algorithm, and its public key."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise InputError(f"${KEY_ENV}={path}: not an unencrypted PEM private key ({e})") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        names = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name not in names:
            raise InputError(f"${KEY_ENV}={path}: curve {key.curve.name} cannot sign C2PA manifests")
        return names[key.curve.name], key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256", key.public_key()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519", key.public_key()
    raise InputError(f"${KEY_ENV}={path}: {type(key).__name__} keys cannot sign C2PA manifests")


def _is_text(value: str) -> bool:
    """Whether a variable holds PEM text (never echoed: it may be a private key) rather than a path."""
    return "-----BEGIN" in value or "\n" in value or len(value) > 4096


def _pem(value: str, variable: str) -> bytes:
    """A variable's PEM: the text itself (a Kubernetes Secret key), else the file it names."""
    if _is_text(value):
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise InputError(f"content credentials: cannot read ${variable}={value}: {e.strerror}") from None


@lru_cache(maxsize=4)
def _read_identity(cert: str, key: str, tsa_url: str | None) -> Identity:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    chain, key_pem = _pem(cert, CERT_ENV), _pem(key, KEY_ENV)
    cert, key = ("(PEM text)" if _is_text(v) else v for v in (cert, key))
    try:
        leaf = x509.load_pem_x509_certificates(chain)[0]
    except ValueError as e:
        raise InputError(f"${CERT_ENV}={cert}: not a PEM certificate chain ({e})") from None
    algorithm, public = _algorithm(key_pem, key)

    def spki(k) -> bytes:
        return k.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    if spki(leaf.public_key()) != spki(public):
        raise InputError(f"${KEY_ENV}={key} is not the key of the first certificate of ${CERT_ENV}={cert}")
    return Identity(chain, key_pem, leaf.subject.rfc4514_string(), algorithm, tsa_url)


def configured_identity() -> Identity | None:
    """The signing identity of ``$MUSETALK_C2PA_CERT``/``$MUSETALK_C2PA_KEY``; None when neither is set."""
    cert, key = os.environ.get(CERT_ENV), os.environ.get(KEY_ENV)
    if not cert and not key:
        return None
    if not cert or not key:
        raise InputError(f"content credentials: set both ${CERT_ENV} and ${KEY_ENV}, or neither")
    return _read_identity(cert, key, os.environ.get(TSA_ENV) or None)


@lru_cache(maxsize=1)
def _say_unsigned_once() -> None:
    log.warning(
        f"content credentials: no certificate configured (${CERT_ENV}, ${KEY_ENV}): videos are delivered "
        "unsigned, with their comment tag only"
    )


def manifest(provenance: Provenance, title: str) -> dict:
    """The manifest definition a video is signed with."""
    return {
        "claim_generator_info": [{"name": GENERATOR, "version": __version__}],
        "title": title,
        "format": "video/mp4",
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                            "softwareAgent": {"name": GENERATOR, "version": __version__},
                        }
                    ]
                },
            },
            {
                "label": PROVENANCE_LABEL,
                "data": {k: v for k, v in asdict(provenance).items() if v is not None},
            },
        ],
    }


def sign_video(path: Path, provenance: Provenance, identity: Identity | None = None) -> Identity | None:
    """Sign the MP4 ``path`` in place (atomically) with ``identity`` (default: the configured one); returns
    the identity that signed it, or None when none is configured (the video stays unsigned)."""
    import c2pa

    identity = identity or configured_identity()
    if identity is None:
        _say_unsigned_once()
        return None
    path = Path(path)
    info = c2pa.C2paSignerInfo(identity.algorithm, identity.chain, identity.key, identity.tsa_url)
    try:
        with (
            c2pa.Signer.from_info(info) as signer,
            c2pa.Builder(manifest(provenance, path.name)) as builder,
            atomic_path(path) as tmp,
            open(path, "rb") as source,
            open(tmp, "w+b") as signed,
        ):
            builder.sign(signer, "video/mp4", source, signed)
    except c2pa.C2paError as e:
        raise CredentialsError(
            f"content credentials: signing {path.name} failed: {str(e).splitlines()[0]}"
        ) from None
    return identity


def timed_sign(path: Path, provenance: Provenance, timings) -> Identity | None:
    """``sign_video``, its seconds added to ``timings`` as ``sign`` when it signed."""
    start = time.perf_counter()
    identity = sign_video(path, provenance)
    if identity is not None:
        timings.add("sign", time.perf_counter() - start)
    return identity


def verify_video(path: Path, trust: Path | None = None) -> Verification:
    """Read and validate the credentials of ``path`` (trust anchors: ``trust`` or $MUSETALK_C2PA_TRUST)."""
    import c2pa

    trust = trust or (Path(os.environ[TRUST_ENV]) if os.environ.get(TRUST_ENV) else None)
    context = None
    if trust is not None:
        try:
            anchors = Path(trust).read_text()
        except OSError as e:
            raise InputError(f"trust anchors {trust}: {e.strerror}") from None
        settings = c2pa.Settings.from_dict(
            {"trust": {"trust_anchors": anchors}, "verify": {"verify_trust": True}}
        )
        context = c2pa.Context(settings)
    try:
        with open(path, "rb") as stream, c2pa.Reader("video/mp4", stream, context=context) as reader:
            state, results, active = (
                reader.get_validation_state(),
                reader.get_validation_results(),
                (reader.get_active_manifest() or {}),
            )
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from None
    except c2pa.C2paError as e:
        if "ManifestNotFound" in type(e).__name__ or "no JUMBF" in str(e):
            return Verification(state=None)
        return Verification(state="Invalid", failures=[str(e).splitlines()[0]])
    failures = [f["code"] for f in (results or {}).get("activeManifest", {}).get("failure", [])]
    found = Verification(state=state, failures=failures)
    signature = active.get("signature_info", {})
    found.signer, found.issuer = signature.get("common_name", ""), signature.get("issuer", "")
    found.generator = " ".join(
        f"{g.get('name', '')} {g.get('version', '')}".strip() for g in active.get("claim_generator_info", [])
    )
    for assertion in active.get("assertions", []):
        if assertion["label"].startswith("c2pa.actions"):
            found.source_type = next(
                (a.get("digitalSourceType", "") for a in assertion["data"].get("actions", [])), ""
            )
        elif assertion["label"] == PROVENANCE_LABEL:
            found.provenance = assertion["data"]
    return found


def write_dev_certificate(directory: Path = DEV_CERT_DIR) -> dict[str, Path]:
    """A TEST certificate chain for local signing: a root and a signer (ES256) under ``directory``.
    Returns the paths to export as $MUSETALK_C2PA_CERT, $MUSETALK_C2PA_KEY and $MUSETALK_C2PA_TRUST."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "musetalk-pipeline TEST certificate"),
            ]
        )

    def usage(sign: bool) -> x509.KeyUsage:
        flags = dict.fromkeys(
            ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"), False
        )
        return x509.KeyUsage(
            digital_signature=sign,
            key_cert_sign=not sign,
            crl_sign=not sign,
            **flags,
            encipher_only=False,
            decipher_only=False,
        )

    now = datetime.datetime.now(datetime.timezone.utc)
    root_key, signer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = (
        x509.CertificateBuilder()
        .subject_name(name("musetalk test root"))
        .issuer_name(name("musetalk test root"))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    signer = (
        x509.CertificateBuilder()
        .subject_name(name("musetalk test signer"))
        .issuer_name(root.subject)
        .public_key(signer_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(signer_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = {
        CERT_ENV: directory / "signer-chain.pem",
        KEY_ENV: directory / "signer-key.pem",
        TRUST_ENV: directory / "test-root.pem",
    }
    contents = {
        CERT_ENV: signer.public_bytes(pem) + root.public_bytes(pem),
        KEY_ENV: signer_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        TRUST_ENV: root.public_bytes(pem),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for variable, path in paths.items():
        with atomic_path(path) as tmp:
            tmp.touch(mode=0o600 if variable == KEY_ENV else 0o644)
            tmp.write_bytes(contents[variable])
    return paths
