"""Run the real ``__main__.py`` under Pulumi mocks and record what it declares.

The tls mocks return real keys and certificates, generated with ``cryptography`` from
exactly the inputs the program passes (algorithm, curve, subject, SANs, uses, CA flag,
validity), so a wrong choice in the program breaks the tests that use the material
with real servers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import runpy
import secrets
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pulumi.runtime import rpc
from pulumi.runtime.mocks import MockMonitor

REPO = Path(__file__).resolve().parent.parent
PROJECT = "personal-rag"

_CURVES: dict[str, Any] = {
    "P224": ec.SECP224R1,
    "P256": ec.SECP256R1,
    "P384": ec.SECP384R1,
    "P521": ec.SECP521R1,
}
_EKU = {
    "server_auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH,
}


def is_secret(value: Any) -> bool:
    return rpc.is_rpc_secret(value)


def reveal(value: Any) -> Any:
    """Inputs as plain Python values, secret wrappers removed at every depth."""
    if is_secret(value):
        return reveal(rpc.unwrap_rpc_secret(value))
    if isinstance(value, dict):
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reveal(v) for v in value]
    return value


def plaintext_strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, string) for every string NOT under a secret marker."""
    if is_secret(value):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from plaintext_strings(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from plaintext_strings(v, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


@dataclass
class Recorded:
    typ: str
    name: str
    raw_inputs: dict[str, Any]
    state: dict[str, Any]

    @property
    def inputs(self) -> dict[str, Any]:
        return reveal(self.raw_inputs)


def _name(subject: Mapping[str, Any] | None) -> x509.Name:
    attrs = []
    subject = subject or {}
    if subject.get("organization"):
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, subject["organization"]))
    if subject.get("organizationalUnit"):
        attrs.append(
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, subject["organizationalUnit"])
        )
    if subject.get("commonName"):
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, subject["commonName"]))
    return x509.Name(attrs)


def _pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


class TlsMaterial:
    """What pulumi-tls would produce, made for real."""

    @staticmethod
    def private_key(inputs: Mapping[str, Any]) -> dict[str, Any]:
        algorithm = inputs.get("algorithm", "RSA")
        key: Any
        if algorithm == "ECDSA":
            # pulumi-tls's default curve when none is named.
            key = ec.generate_private_key(_CURVES[inputs.get("ecdsaCurve", "P224")]())
        elif algorithm == "RSA":
            key = rsa.generate_private_key(65537, int(inputs.get("rsaBits", 2048)))
        else:
            raise ValueError(f"mock tls: unsupported algorithm {algorithm}")
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {**inputs, "privateKeyPem": _pem(key), "publicKeyPem": public.decode()}

    @staticmethod
    def _sign(
        inputs: Mapping[str, Any],
        subject: x509.Name,
        public_key: Any,
        issuer: x509.Name,
        signing_key: Any,
        sans: list[x509.GeneralName],
    ) -> str:
        now = dt.datetime.now(dt.UTC)
        hours = int(inputs["validityPeriodHours"])
        uses = list(inputs.get("allowedUses", []))
        is_ca = bool(inputs.get("isCaCertificate", False))
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=hours))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature="digital_signature" in uses,
                    content_commitment=False,
                    key_encipherment="key_encipherment" in uses,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign="cert_signing" in uses,
                    crl_sign="crl_signing" in uses,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        ekus = [_EKU[u] for u in uses if u in _EKU]
        if ekus:
            builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return (
            builder.sign(signing_key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )

    @staticmethod
    def _sans(inputs: Mapping[str, Any]) -> list[x509.GeneralName]:
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in inputs.get("dnsNames") or []]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in inputs.get("ipAddresses") or []]
        return sans

    @classmethod
    def self_signed(cls, inputs: Mapping[str, Any]) -> dict[str, Any]:
        key = serialization.load_pem_private_key(inputs["privateKeyPem"].encode(), None)
        name = _name(inputs.get("subject"))
        pem = cls._sign(inputs, name, key.public_key(), name, key, cls._sans(inputs))
        return {**inputs, "certPem": pem, "readyForRenewal": False}

    @staticmethod
    def cert_request(inputs: Mapping[str, Any]) -> dict[str, Any]:
        key = serialization.load_pem_private_key(inputs["privateKeyPem"].encode(), None)
        builder = x509.CertificateSigningRequestBuilder().subject_name(_name(inputs.get("subject")))
        sans = TlsMaterial._sans(inputs)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        csr = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
        return {**inputs, "certRequestPem": csr.public_bytes(serialization.Encoding.PEM).decode()}

    @classmethod
    def locally_signed(cls, inputs: Mapping[str, Any]) -> dict[str, Any]:
        csr = x509.load_pem_x509_csr(inputs["certRequestPem"].encode())
        ca_key = serialization.load_pem_private_key(inputs["caPrivateKeyPem"].encode(), None)
        ca_cert = x509.load_pem_x509_certificate(inputs["caCertPem"].encode())
        try:
            sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            sans = []
        pem = cls._sign(inputs, csr.subject, csr.public_key(), ca_cert.subject, ca_key, sans)
        return {**inputs, "certPem": pem, "readyForRenewal": False}


def _state_key(typ: str, name: str, inputs: Mapping[str, Any]) -> str:
    return json.dumps([typ, name, inputs], sort_keys=True, default=str)


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(
        self,
        stack: str,
        exit_codes: Mapping[str, int] | None = None,
        provider_state: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.stack = stack
        # Like a provider's state between two runs: a resource declared again with the
        # same type, name and inputs gets the outputs it got before (its passwords, keys).
        self.provider_state = provider_state
        # container name -> exit code the "engine" reports for that one-shot container
        self.exit_codes = dict(exit_codes or {})
        self.resources: list[Recorded] = []
        self.generated_secrets: list[str] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        inputs = reveal(args.inputs)
        state: dict[str, Any] = dict(inputs)
        typ = args.typ
        key = _state_key(typ, args.name, inputs)
        if self.provider_state is not None and key in self.provider_state:
            state = self.provider_state[key]
            if typ == "random:index/randomPassword:RandomPassword":
                self.generated_secrets.append(state["result"])
            elif typ == "tls:index/privateKey:PrivateKey":
                self.generated_secrets.append(state["privateKeyPem"])
        elif typ == "tls:index/privateKey:PrivateKey":
            state = TlsMaterial.private_key(inputs)
            self.generated_secrets.append(state["privateKeyPem"])
        elif typ == "tls:index/selfSignedCert:SelfSignedCert":
            state = TlsMaterial.self_signed(inputs)
        elif typ == "tls:index/certRequest:CertRequest":
            state = TlsMaterial.cert_request(inputs)
        elif typ == "tls:index/locallySignedCert:LocallySignedCert":
            state = TlsMaterial.locally_signed(inputs)
        elif typ == "random:index/randomPassword:RandomPassword":
            alphabet = string.ascii_letters + string.digits
            if inputs.get("special", True):
                alphabet += "!@#$%&*()-_=+[]{}<>:?"
            value = "".join(secrets.choice(alphabet) for _ in range(int(inputs["length"])))
            state["result"] = value
            self.generated_secrets.append(value)
        elif typ == "docker:index/container:Container" and inputs["name"] in self.exit_codes:
            state["exitCode"] = self.exit_codes[inputs["name"]]
        elif typ == "docker:index/image:Image":
            digest = "sha256:" + hashlib.sha256(inputs["imageName"].encode()).hexdigest()
            state["repoDigest"] = inputs["imageName"].split(":")[0] + "@" + digest
        if self.provider_state is not None:
            self.provider_state[key] = state
        self.resources.append(Recorded(typ, args.name, args.inputs, state))
        # A changed input gives a new id, as a replaced container gets from the engine.
        return f"{args.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}", state

    def call(
        self, args: pulumi.runtime.MockCallArgs
    ) -> tuple[dict[Any, Any], list[tuple[str, str]] | None]:
        if args.token == "docker:index/getRegistryImage:getRegistryImage":
            name = args.args["name"]
            digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
            return {"name": name, "sha256Digest": digest}, []
        raise NotImplementedError(f"mock has no answer for invoke {args.token}")


ROOT_STACK_TYPE = "pulumi:pulumi:Stack"


@dataclass(frozen=True)
class Registration:
    """What the engine would receive for one resource: its URN and its options."""

    urn: str
    typ: str
    name: str
    custom: bool
    protect: bool
    retain_on_delete: bool
    # URNs this resource answers to besides its own (its aliases and those its
    # parents' aliases give it), as the engine resolves them.
    alias_urns: frozenset[str]


def engine_urn(stack: str, parent_urn: str, typ: str, name: str) -> str:
    """The URN the Pulumi engine gives a resource: the parent's full qualified type
    chain, ``$``-joined, except the root stack's (the mock monitor's own make_urn keeps
    only the parent's last type, which `pulumi stack --show-urns` never shows)."""
    if parent_urn:
        parent_type = parent_urn.split("::")[2]
        if parent_type != ROOT_STACK_TYPE:
            typ = f"{parent_type}${typ}"
    return f"urn:pulumi:{stack}::{PROJECT}::{typ}::{name}"


def urn_type_and_name(urn: str) -> tuple[str, str]:
    """(qualified type, name) of a URN; the name may itself contain ``::``."""
    parts = urn.split("::")
    return parts[2], "::".join(parts[3:])


class RecordingMonitor(MockMonitor):
    """The mock monitor, with engine URNs and the resource options the engine would
    see (protect, retainOnDelete, aliases): mocks' new_resource never gets them."""

    def __init__(self, mocks: pulumi.runtime.Mocks, stack: str) -> None:
        super().__init__(mocks)
        self.stack = stack
        self.registrations: list[Registration] = []
        self._alias_urns: dict[str, frozenset[str]] = {}

    def make_urn(self, parent: str, type_: str, name: str) -> str:
        return engine_urn(self.stack, parent, type_, name)

    def _aliases(self, request: Any) -> frozenset[str]:
        own: set[str] = set()
        parent_alias_urns = self._alias_urns.get(request.parent, frozenset())
        for alias in request.aliases:
            if alias.urn:
                own.add(alias.urn)
                continue
            spec = alias.spec
            parent = "" if spec.noParent else (spec.parentUrn or request.parent)
            own.add(
                engine_urn(
                    spec.stack or self.stack,
                    parent,
                    spec.type or request.type,
                    spec.name or request.name,
                ).replace(f"::{PROJECT}::", f"::{spec.project or PROJECT}::", 1)
            )
        # A child of an aliased parent answers to its name under the parent's old URNs.
        for parent_alias in parent_alias_urns:
            own.add(engine_urn(self.stack, parent_alias, request.type, request.name))
        return frozenset(own)

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        if request.type != ROOT_STACK_TYPE:
            aliases = self._aliases(request)
            self._alias_urns[response.urn] = aliases
            self.registrations.append(
                Registration(
                    urn=response.urn,
                    typ=request.type,
                    name=request.name,
                    custom=bool(request.custom),
                    protect=bool(request.protect),
                    retain_on_delete=bool(request.retainOnDelete),
                    alias_urns=aliases,
                )
            )
        return response


# Tests run the committed stack files plus the secrets a user would set.
TEST_SECRETS: dict[str, str] = {"smtpPassword": "smtp-password-for-tests"}


def committed_stack_config(stack: str) -> dict[str, str]:
    from components.monitoring_render import read_stack_file

    return read_stack_file(REPO / f"Pulumi.{stack}.yaml")


SECRET_KEYS = {"smtpPassword", "ghcrToken"}


@dataclass
class ProgramRun:
    stack: str
    resources: list[Recorded]
    exports: dict[str, tuple[Any, bool]]  # name -> (value, is_secret)
    generated_secrets: list[str]
    config: dict[str, str] = field(default_factory=dict)
    # (type, logical name) -> the ResourceOptions the program passed (mocks never see them)
    options: dict[tuple[str, str], pulumi.ResourceOptions] = field(default_factory=dict)
    # (type, logical name) -> the resolved replacement_trigger option, where one is set
    replacement_triggers: dict[tuple[str, str], Any] = field(default_factory=dict)
    # Every resource (components too) as the engine would register it.
    registrations: list[Registration] = field(default_factory=list)

    @property
    def urns(self) -> dict[str, Registration]:
        return {r.urn: r for r in self.registrations}

    def of_type(self, typ: str) -> list[Recorded]:
        return [r for r in self.resources if r.typ == typ]

    @property
    def containers(self) -> dict[str, Recorded]:
        return {r.inputs["name"]: r for r in self.of_type("docker:index/container:Container")}

    @property
    def networks(self) -> dict[str, Recorded]:
        return {r.inputs["name"]: r for r in self.of_type("docker:index/network:Network")}

    @property
    def volumes(self) -> dict[str, Recorded]:
        return {r.inputs["name"]: r for r in self.of_type("docker:index/volume:Volume")}

    def known_secret_values(self) -> list[str]:
        values = list(self.generated_secrets)
        values += [self.config[k] for k in SECRET_KEYS if k in self.config]
        # Derived forms count too (e.g. the sha256 Redis ACL files hold).
        values += [hashlib.sha256(v.encode()).hexdigest() for v in list(values)]
        return values


def stack_config(stack: str, **overrides: str | None) -> dict[str, str]:
    base = "staging" if stack.startswith("ephemeral-") else stack
    config = {**committed_stack_config(base), **TEST_SECRETS}
    for key, value in overrides.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def run_program(
    stack: str,
    config: Mapping[str, str] | None = None,
    secret_keys: set[str] | None = None,
    exit_codes: Mapping[str, int] | None = None,
    provider_state: dict[str, dict[str, Any]] | None = None,
) -> ProgramRun:
    """Run __main__.py for ``stack`` under mocks; return what it declared and exported.

    Pass the same ``provider_state`` dict to two runs to model a second ``pulumi
    preview`` against the state the first left (generated values are kept)."""
    config = dict(stack_config(stack) if config is None else config)
    secret_keys = SECRET_KEYS if secret_keys is None else secret_keys
    mocks = RecordingMocks(stack, exit_codes, provider_state)
    monitor = RecordingMonitor(mocks, stack)
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config(
        # A key with its own namespace (docker:host) is passed as it is.
        {(k if ":" in k else f"{PROJECT}:{k}"): v for k, v in config.items()},
        [f"{PROJECT}:{k}" for k in secret_keys if k in config],
    )
    exported: dict[str, Any] = {}
    exports: dict[str, tuple[Any, bool]] = {}

    def capture(name: str, value: Any) -> None:
        exported[name] = value

    options: dict[tuple[str, str], pulumi.ResourceOptions] = {}
    triggers: dict[tuple[str, str], Any] = {}
    custom_init = pulumi.CustomResource.__init__

    def recording_init(
        self: Any, t: str, name: str, props: Any = None, opts: Any = None, *a: Any, **kw: Any
    ) -> None:
        options[(t, name)] = opts or pulumi.ResourceOptions()
        custom_init(self, t, name, props, opts, *a, **kw)

    @pulumi.runtime.test
    def program() -> Any:
        original = pulumi.export
        pulumi.export = capture
        pulumi.CustomResource.__init__ = recording_init  # type: ignore[method-assign]
        try:
            runpy.run_path(str(REPO / "__main__.py"), run_name="__main__")
        finally:
            pulumi.export = original
            pulumi.CustomResource.__init__ = custom_init  # type: ignore[method-assign]

        async def resolve() -> None:
            for key, value in exported.items():
                out = pulumi.Output.from_input(value)
                exports[key] = (await out.future(), bool(await out.is_secret()))
            for resource, opts in options.items():
                if opts.replacement_trigger is not None:
                    trigger = pulumi.Output.from_input(opts.replacement_trigger)
                    triggers[resource] = (await trigger.future(), await trigger.is_secret())

        return pulumi.Output.from_input(resolve())

    program()
    return ProgramRun(
        stack,
        mocks.resources,
        exports,
        mocks.generated_secrets,
        config,
        options,
        triggers,
        monitor.registrations,
    )


INCOMING_DIR = "/incoming/"  # where the config-init containers receive the files


def container_inputs(run: ProgramRun, service: str) -> dict[str, Any]:
    """Inputs of container ``rag-<stack>-<service>`` (plain values, secrets revealed)."""
    name = f"rag-{run.stack}-{service}"
    if name not in run.containers:
        raise KeyError(f"the program declares no container {name!r}")
    return run.containers[name].inputs


def container_env(run: ProgramRun, service: str) -> dict[str, str]:
    """The environment of ``rag-<stack>-<service>`` as a dict."""
    return dict(e.split("=", 1) for e in container_inputs(run, service).get("envs") or [])


def uploaded_files(run: ProgramRun, service: str) -> dict[str, str]:
    """``path under CONFIG_DIR -> content`` of what ``rag-<stack>-<service>-config-init``
    uploads (it copies /incoming/<path> to the service's CONFIG_DIR/<path>)."""
    files = {}
    for upload in container_inputs(run, f"{service}-config-init")["uploads"]:
        target = upload["file"]
        assert target.startswith(INCOMING_DIR), target
        files[target.removeprefix(INCOMING_DIR)] = upload["content"]
    return files


def failure_before_registration(stack: str, config: dict[str, str]) -> tuple[Exception, list[str]]:
    """Run the program with a config it must refuse: the exception it raised and the
    names of the resources it had registered by then (bad input must stop it before the
    first one)."""
    seen: list[str] = []
    original = RecordingMocks.new_resource

    def spy(self: RecordingMocks, args: Any) -> Any:
        seen.append(args.name)
        return original(self, args)

    RecordingMocks.new_resource = spy  # type: ignore[method-assign]
    try:
        run_program(stack, config)
    except Exception as exc:
        return exc, seen
    finally:
        RecordingMocks.new_resource = original  # type: ignore[method-assign]
    raise AssertionError(f"the program accepted the config for {stack}")
