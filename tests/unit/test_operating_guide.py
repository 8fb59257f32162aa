"""docs/operating.md, checked against the AWS CLI, the daemon's MQTT topics and its reason texts.

- Every `aws ...` command in the guide's ```sh blocks goes through the AWS CLI's own driver
  (`awscli.clidriver.create_clidriver()`): its argument parser, shorthand and JSON parameter
  parsing, botocore's parameter validation and request serialisation all run; a `before-send`
  handler answers each request with a canned response, so nothing reaches the network (dummy
  credentials, a fixed region). On top of botocore, which checks types, required members and
  lengths but not enums or patterns, a `before-parameter-build` handler checks every string
  against its enum and pattern in the service model (the pattern over the whole value, which
  is stricter than the model's unanchored regex and what the services enforce). Deliberately
  broken commands must fail, each with the message expected, so the check is shown to bite.
- The IoT policies in the guide must parse, allow every topic the daemon uses (gatewayd/cloud.py,
  gatewayd/stream_download.py, the inventory shadows) and no grant may be dead; the topic
  templates in the code must all be ones this test knows, so a new topic fails here until the
  guide's policy is extended.
- The reasons in the guide's failure table must still be the code's texts.

Debian's python3 has no awscli: the CLI tests skip there, the others run.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "operating.md"

# plausible values for the guide's <placeholders>, in shell commands and in its JSON files
PLACEHOLDERS = {
    "region": "eu-west-1",
    "account": "123456789012",
    "bucket": "afr-ota-example-firmware",
    "the certificateArn printed above": "arn:aws:iot:eu-west-1:123456789012:cert/" + "ab12" * 16,
    "the CertificateArn printed above":
        "arn:aws:acm:eu-west-1:123456789012:certificate/12345678-90ab-cdef-1234-567890abcdef",
}
PLACEHOLDER = re.compile(r"<([^<>\n]+)>")
VARIABLE = re.compile(r"\$\{?([A-Z_][A-Z0-9_]*)\}?")
ASSIGNMENT = re.compile(r"^(export\s+)?([A-Z_][A-Z0-9_]*)=(.*)$")
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "2>", "&"}


# ------------------------------------------------------------------ reading the guide


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int  # of the opening fence
    save_as: str | None  # "Save as `NAME`" in the paragraph before it


@functools.cache
def blocks() -> tuple[Block, ...]:
    text = GUIDE.read_text()
    out = []
    fence = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.M | re.S)
    previous_end = 0
    for m in fence.finditer(text):
        before = text[previous_end:m.start()].rstrip().split("\n\n")[-1]
        named = re.search(r"[Ss]ave as\s+`([^`]+)`", before)
        out.append(Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1,
                         Path(named.group(1)).name if named else None))
        previous_end = m.end()
    return tuple(out)


def fill(text: str) -> str:
    """The guide's <placeholders> replaced by plausible values; an unknown one fails."""
    def value(m: re.Match[str]) -> str:
        if m.group(1) not in PLACEHOLDERS:
            raise AssertionError(f"docs/operating.md: no plausible value for placeholder <{m.group(1)}>: "
                                 "add one to PLACEHOLDERS")
        return PLACEHOLDERS[m.group(1)]
    return PLACEHOLDER.sub(value, text)


def saved_files() -> dict[str, str]:
    """The files the guide tells the operator to save, by name, placeholders filled in."""
    return {b.save_as: fill(b.text) for b in blocks() if b.save_as}


@dataclass(frozen=True)
class Command:
    argv: list[str]
    source: str  # the logical line, as in the guide
    line: int

    def __str__(self) -> str:
        return f"docs/operating.md:{self.line}: {self.source}"


def shell_lines() -> list[tuple[int, str]]:
    """The logical lines of every ```sh block (backslash continuations joined)."""
    out = []
    for b in blocks():
        if b.lang != "sh":
            continue
        joined = re.sub(r"\\\n\s*", " ", b.text)
        first = b.line + 1
        for offset, line in enumerate(joined.split("\n")):
            if line.strip() and not line.lstrip().startswith("#"):
                out.append((first + offset, line.strip()))
    return out


def expand(text: str, variables: dict[str, str]) -> str:
    def value(m: re.Match[str]) -> str:
        if m.group(1) not in variables:
            raise AssertionError(f"docs/operating.md uses ${m.group(1)} before setting it")
        return variables[m.group(1)]
    return VARIABLE.sub(value, text)


def parse_commands() -> tuple[list[Command], dict[str, str], dict[str, str]]:
    """Every `aws ...` command with the guide's shell variables expanded; the variables; the
    exported ones (the environment the commands run in)."""
    variables: dict[str, str] = {}
    exported: dict[str, str] = {}
    commands = []
    for line, source in shell_lines():
        text = fill(source)
        assignment = ASSIGNMENT.match(text)
        if assignment:
            words = shlex.split(expand(assignment.group(3), variables), comments=True)
            variables[assignment.group(2)] = words[0] if words else ""
            if assignment.group(1):
                exported[assignment.group(2)] = variables[assignment.group(2)]
            continue
        if not text.startswith("aws "):
            continue
        argv = []
        for word in shlex.split(expand(text, variables), comments=True):
            if word in SHELL_OPERATORS:
                break
            argv.append(word)
        commands.append(Command(argv, source, line))
    return commands, variables, exported


def test_the_guide_has_the_commands_it_is_about() -> None:
    commands, variables, exported = parse_commands()
    names = {" ".join(c.argv[1:3]) for c in commands}
    for needed in ("iot create-policy", "iot attach-policy", "iot create-ota-update", "signer put-signing-profile",
                   "acm import-certificate", "iot update-indexing-configuration",
                   "iot create-dynamic-thing-group", "iot describe-job-execution",
                   "iot list-job-executions-for-job", "iot-data get-thing-shadow"):
        assert needed in names, f"docs/operating.md has no `aws {needed}`"
    assert exported.get("AWS_DEFAULT_REGION") == PLACEHOLDERS["region"]
    ota_updates = [c.argv for c in commands if c.argv[1:3] == ["iot", "create-ota-update"]]
    assert any("CONTINUOUS" in a for a in ota_updates) and all("--tags" in a for a in ota_updates)
    assert any(a[a.index("--protocols") + 1:a.index("--protocols") + 3] == ["MQTT", "HTTP"] for a in ota_updates)


# ------------------------------------------------------------------ the AWS CLI's own driver


def _fake_body(protocol: str, operation: str) -> bytes:
    if protocol == "query":  # IAM: an XML envelope the query parser accepts
        return (f"<{operation}Response><{operation}Result></{operation}Result>"
                f"<ResponseMetadata><RequestId>0</RequestId></ResponseMetadata></{operation}Response>").encode()
    if protocol == "rest-xml":  # S3
        return b""
    return b"{}"


class _Raw:
    """What botocore reads a canned response's body from."""

    def __init__(self, body: bytes) -> None:
        self._body = io.BytesIO(body)

    def stream(self, *_args, **_kwargs):
        yield self._body.read()

    def read(self, *args, **_kwargs) -> bytes:
        return self._body.read(*args)


class ModelError(Exception):
    pass


def _check_against_model(shape, value, where: str) -> None:
    """What botocore leaves to the service: enum values and patterns of strings."""
    if value is None:
        return
    kind = shape.type_name
    if kind == "structure" and isinstance(value, dict):
        for name, member in shape.members.items():
            if name in value:
                _check_against_model(member, value[name], f"{where}.{name}")
    elif kind == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            _check_against_model(shape.member, item, f"{where}[{i}]")
    elif kind == "map" and isinstance(value, dict):
        for key, item in value.items():
            _check_against_model(shape.key, key, f"{where} key")
            _check_against_model(shape.value, item, f"{where}[{key}]")
    elif kind == "string" and isinstance(value, str):
        if shape.enum and value not in shape.enum:
            raise ModelError(f"{where}: {value!r} is not one of {shape.enum}")
        pattern = shape.metadata.get("pattern")
        if pattern:
            try:
                compiled = re.compile(pattern)
            except re.error:  # a Java-only construct: leave it to the service
                return
            if not compiled.fullmatch(value):  # AWS's patterns name the whole value
                raise ModelError(f"{where}: {value!r} does not match the pattern {pattern!r}")


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """The process environment with `values` set and AWS profiles unset, restored after."""
    names = list(values) + ["AWS_PROFILE", "AWS_DEFAULT_PROFILE"]
    saved = {k: os.environ.get(k) for k in names}
    try:
        for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            os.environ.pop(k, None)
        os.environ.update(values)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class CliResult:
    status: int
    requests: list[str]
    output: str


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """Run one `aws ...` argv through the real driver in a folder with the guide's files."""
    pytest.importorskip("awscli", reason="the AWS CLI (awscli, the test extra) is not installed")
    from awscli.botocore.awsrequest import AWSResponse
    from awscli.clidriver import create_clidriver

    folder = tmp_path_factory.mktemp("aws")
    for name, text in saved_files().items():
        (folder / name).write_text(text)
    _, _, exported = parse_commands()
    environment = {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "not-a-secret",
        "AWS_CONFIG_FILE": str(folder / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "eu-west-1", **exported,
    }

    # one driver for every command: building its command table costs far more than a command
    current: dict[str, object] = {}

    def before_call(model, **_kwargs):
        current["model"] = model

    def check_params(params, model, **_kwargs):
        if model.input_shape is not None:
            _check_against_model(model.input_shape, params, model.name)

    def before_send(request, **_kwargs):
        model = current.get("model")
        protocol = model.metadata.get("protocol", "json") if model else "json"
        current["requests"].append(f"{request.method} {request.url}")  # type: ignore[union-attr]
        return AWSResponse(request.url, 200, {}, _Raw(_fake_body(protocol, model.name if model else "")))

    with _environment(environment):
        driver = create_clidriver()
    driver.session.register("before-call", before_call)
    driver.session.register("before-parameter-build", check_params)
    driver.session.register("before-send", before_send)

    def run(argv: list[str]) -> CliResult:
        assert argv[0] == "aws"
        requests: list[str] = []
        current.clear()
        current["requests"] = requests
        out, err = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        try:
            os.chdir(folder)
            with _environment(environment), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    status = driver.main(argv[1:])
                except SystemExit as e:  # argparse: usage errors
                    status = e.code if isinstance(e.code, int) else 2
        finally:
            os.chdir(cwd)
        return CliResult(status, requests, out.getvalue() + err.getvalue())

    run.folder = folder  # type: ignore[attr-defined]
    return run


def _produced_earlier(name: str, before_line: int) -> bool:
    """A file the guide makes with a non-aws command (openssl, an outfile) before using it."""
    return any(name in source for line, source in shell_lines() if line < before_line)


def _cli_commands() -> list[Command]:
    return parse_commands()[0]


@pytest.mark.parametrize("command", _cli_commands(), ids=lambda c: f"line{c.line}-{'-'.join(c.argv[1:3])}")
def test_every_aws_command_of_the_guide_passes_the_cli(aws, command: Command) -> None:
    refs = [ref for word in command.argv for ref in re.findall(r"fileb?://(\S+)", word)]
    if command.argv[1:3] == ["s3", "cp"]:  # local files it uploads
        refs += [w for w in command.argv[3:] if not w.startswith(("s3://", "-"))]
    for ref in refs:
        path = aws.folder / ref
        if path.exists():
            continue
        assert _produced_earlier(ref, command.line), f"{command}: {ref} is neither saved nor made before"
        path.write_bytes(b"made by an earlier command of the guide\n")
    result = aws(command.argv)
    assert result.status == 0, f"{command}\nexit status {result.status}:\n{result.output}"
    assert result.requests, f"{command}: the CLI built no request"


# a deliberately broken command, and what the CLI (or the model check above) says about it
BROKEN = {
    "an unknown option": (
        "aws iot create-ota-update --ota-update-id x --targets arn:aws:iot:eu-west-1:123456789012:thing/t "
        "--files file://pump-2.0.0-files.json --role-arn arn:aws:iam::123456789012:role/r "
        "--target-selectoin CONTINUOUS", "Unknown options: --target-selectoin"),
    "a missing required parameter": (
        "aws iot create-dynamic-thing-group --thing-group-name pumps-old",
        "the following arguments are required: --query-string"),
    "a bad shorthand key": (
        "aws iot update-indexing-configuration --thing-indexing-configuration "
        "'thingIndexingMode=REGISTRY_AND_SHADOW,namedShadowIndexingMode=ON,filter={namedShadows=[ota]}'",
        'Unknown parameter in thingIndexingConfiguration.filter: "namedShadows"'),
    "malformed shorthand": (
        "aws iot update-indexing-configuration --thing-indexing-configuration "
        "'thingIndexingMode=REGISTRY_AND_SHADOW,filter={namedShadowNames=[ota]'",
        "Error parsing parameter '--thing-indexing-configuration'"),
    "an unknown member in a JSON object": (
        "aws iot create-ota-update --ota-update-id x --targets arn:aws:iot:eu-west-1:123456789012:thing/t "
        "--files '[{\"fileName\": \"a.bin\", \"filePath\": \"a.bin\"}]' "
        "--role-arn arn:aws:iam::123456789012:role/r", 'Unknown parameter in files[0]: "filePath"'),
    "a value that is not an enum member": (
        "aws iot create-ota-update --ota-update-id x --targets arn:aws:iot:eu-west-1:123456789012:thing/t "
        "--target-selection CONTINOUS --files file://pump-2.0.0-files.json "
        "--role-arn arn:aws:iam::123456789012:role/r", "'CONTINOUS' is not one of"),
    "a name against its pattern": (
        "aws signer put-signing-profile --profile-name ota-gateway-signer --platform-id AmazonFreeRTOS-Default "
        "--signing-material certificateArn=arn:x", "does not match the pattern"),
    "an unknown subcommand": ("aws iot create-ota-updates --ota-update-id x", "Invalid choice"),
    "a missing file": (
        "aws iot create-policy --policy-name p --policy-document file://no-such-policy.json",
        "Unable to load paramfile file://no-such-policy.json"),
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_a_broken_command_fails(aws, what: str) -> None:
    command, says = BROKEN[what]
    result = aws(shlex.split(command))
    assert result.status != 0, f"{what} went through: {command}"
    assert not result.requests, f"{what}: a request was built"
    assert says in result.output, result.output


# ------------------------------------------------------------------ the IoT policies


GATEWAY = "gw-01"
JOB = "AFR_OTA-pump-a-2-0-0"
STREAM = "AFR_OTA-0f3c6e1a-7b44-4c0e-9a65-2d8f1c3b9e70"
OTHER_GATEWAY = "gw-02"


def guide_devices() -> list[dict]:
    text = next(b.text for b in blocks() if b.save_as == "site.toml")
    return tomllib.loads(text)["device"]


def iot_policies() -> dict[str, dict]:
    out = {}
    for name, text in saved_files().items():
        if name.endswith(".json") and '"iot:' in text:
            out[name] = json.loads(text)
    return out


# The topic templates of the daemon's code (gatewayd/, transports/; holes written {}), and for
# each what it is used for; a template in the code that is not here fails
# test_the_daemon_uses_no_topic_this_test_does_not_know.
KNOWN_TEMPLATES = {
    "$aws/things/{}/jobs/{}/{}": "cloud.py: requests ($next/get, <job>/get, <job>/update)",
    "$aws/things/{}/jobs": "cloud.py: a served thing's notify-next and reply filters",
    "$aws/things/{}/jobs/notify-next": "cloud.py: notify-next of a thing promoted from polling",
    "$aws/things/+/jobs/+/get/+": "cloud.py: shared reply filter",
    "$aws/things/+/jobs/+/update/+": "cloud.py: shared reply filter",
    "$aws/things/{}/streams/{}": "stream_download.py: a stream under the gateway's own name",
    "$aws/things/{}/streams/+": "stream_download.py: every stream's data and rejections, subscribed once",
    # the inventory shadows (design: `ota` on a proxied thing, `ota-<device>` on the gateway)
    "$aws/things/{}/shadow/name/{}": "shadow client: a named shadow's topics",
    "$aws/things/{}/shadow/name/{}/{}": "shadow client: update/get and their replies",
    "$aws/things/{}/shadow/name/{}/update": "shadow client: update",
    "$aws/things/{}/shadow/name/{}/get": "shadow client: get",
    "$aws/things/{}/shadow/name/ota": "shadow client: a proxied thing's shadow",
    "$aws/things/{}/shadow/name/ota/{}": "shadow client: a proxied thing's shadow",
    "$aws/things/{}/shadow/name/ota-{}": "shadow client: a device's shadow on the gateway's thing",
    "$aws/things/{}/shadow/name/ota-{}/{}": "shadow client: a device's shadow on the gateway's thing",
}
SHADOW_REQUESTS = ("update", "get")


def daemon_topics() -> set[tuple[str, str]]:
    """(action, resource) pairs the daemon needs, for the guide's gateway and devices."""
    devices = guide_devices()
    proxied = [d["thing_name"] for d in devices if d.get("thing_name")]
    plain = [d["name"] for d in devices if not d.get("thing_name")]
    assert proxied and plain, "the guide's site.toml should have proxied and plain devices"
    used: set[tuple[str, str]] = {("iot:Connect", f"client/{GATEWAY}")}

    def add(action: str, topic: str) -> None:
        kind = "topicfilter" if action == "iot:Subscribe" else "topic"
        used.add((action, f"{kind}/{topic}"))

    for thing in [GATEWAY, *proxied]:  # cloud.py
        base = f"$aws/things/{thing}/jobs"
        for job in ("$next", JOB):
            add("iot:Publish", f"{base}/{job}/get")
            for answer in ("accepted", "rejected"):
                add("iot:Receive", f"{base}/{job}/get/{answer}")
        add("iot:Publish", f"{base}/{JOB}/update")
        for answer in ("accepted", "rejected"):
            add("iot:Receive", f"{base}/{JOB}/update/{answer}")
        add("iot:Receive", f"{base}/notify-next")
        for flt in ("notify-next", "+/get/+", "+/update/+"):
            add("iot:Subscribe", f"{base}/{flt}")
    add("iot:Subscribe", "$aws/things/+/jobs/+/get/+")
    add("iot:Subscribe", "$aws/things/+/jobs/+/update/+")
    base = f"$aws/things/{GATEWAY}/streams/{STREAM}"  # stream_download.py
    for request in ("get/cbor", "describe/cbor"):
        add("iot:Publish", f"{base}/{request}")
    for reply in ("data/cbor", "rejected/cbor", "description/cbor"):
        add("iot:Receive", f"{base}/{reply}")
    add("iot:Subscribe", f"{base}/description/cbor")  # only while a stream that changed is described
    for reply in ("data/cbor", "rejected/cbor"):  # subscribe_streams: once, for every stream
        add("iot:Subscribe", f"$aws/things/{GATEWAY}/streams/+/{reply}")
    shadows = [(thing, "ota") for thing in proxied] + [(GATEWAY, f"ota-{name}") for name in plain]
    for thing, shadow in shadows:
        base = f"$aws/things/{thing}/shadow/name/{shadow}"
        for request in SHADOW_REQUESTS:
            add("iot:Publish", f"{base}/{request}")
            for answer in ("accepted", "rejected"):
                add("iot:Subscribe", f"{base}/{request}/{answer}")
                add("iot:Receive", f"{base}/{request}/{answer}")
    return used


NOT_ALLOWED = [
    ("iot:Connect", f"client/{OTHER_GATEWAY}"),
    ("iot:Connect", "client/gw-01-pump-a"),
    ("iot:Publish", f"topic/$aws/things/{OTHER_GATEWAY}/jobs/{JOB}/update"),
    ("iot:Receive", f"topic/$aws/things/{OTHER_GATEWAY}/jobs/notify-next"),
    ("iot:Subscribe", f"topicfilter/$aws/things/{OTHER_GATEWAY}/jobs/notify-next"),
    ("iot:Subscribe", "topicfilter/$aws/things/#"),
    ("iot:Subscribe", "topicfilter/$aws/things/+/jobs/notify-next"),
    ("iot:Publish", f"topic/$aws/things/{OTHER_GATEWAY}/streams/{STREAM}/get/cbor"),
    ("iot:Publish", f"topic/$aws/things/gw-01-pump-a/streams/{STREAM}/get/cbor"),
    ("iot:Publish", "topic/$aws/things/gw-01-pump-a/shadow/name/ota/delete"),
    ("iot:Publish", f"topic/$aws/things/{GATEWAY}/shadow/name/ota-tank-sensor/delete"),
    ("iot:Publish", f"topic/$aws/things/{GATEWAY}/shadow/update"),
    ("iot:Publish", "topic/$aws/things/gw-01-pump-a/shadow/name/config/update"),
    ("iot:Publish", f"topic/$aws/things/{OTHER_GATEWAY}/shadow/name/ota-tank-sensor/update"),
    ("iot:Publish", f"topic/{GATEWAY}/anything"),
]


def _pattern(resource: str) -> re.Pattern[str]:
    """An IoT policy resource as a regex: `*` any characters, `?` one, the rest literal
    (MQTT's `+` and `#` included), with the connected thing's name for the variable."""
    resource = resource.replace("${iot:Connection.Thing.ThingName}", GATEWAY)
    assert "${" not in resource, f"a policy variable this test does not resolve: {resource}"
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in resource))


ARN_PREFIX = f"arn:aws:iot:{PLACEHOLDERS['region']}:{PLACEHOLDERS['account']}:"


def grants() -> list[tuple[str, str, str]]:
    """(policy file, action, resource without the ARN prefix) for every Allow of the guide."""
    out = []
    for name, policy in iot_policies().items():
        for statement in policy["Statement"]:
            assert statement["Effect"] == "Allow", f"{name}: only Allow statements are expected"
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            for action in actions:
                for resource in resources:
                    assert resource.startswith(ARN_PREFIX), f"{name}: {resource} is not in the guide's region/account"
                    out.append((name, action, resource[len(ARN_PREFIX):]))
    return out


def allowed(action: str, resource: str) -> bool:
    return any(a == action and _pattern(r).fullmatch(resource) for _, a, r in grants())


def test_the_policies_parse_and_fit_the_quota() -> None:
    policies = iot_policies()
    assert set(policies) == {"ota-gateway-policy.json", "ota-gateway-devices-policy.json"}
    for name, policy in policies.items():
        assert policy["Version"] == "2012-10-17"
        compact = re.sub(r"\s", "", json.dumps(policy))
        assert len(compact) <= 2048, f"{name}: {len(compact)} characters, AWS IoT takes 2,048 without white space"
        connect = [s for s in policy["Statement"] if s["Action"] == "iot:Connect"]
        for s in connect:
            assert s["Condition"] == {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}


def test_the_policies_allow_every_topic_the_daemon_uses() -> None:
    missing = sorted(f"{action} {resource}" for action, resource in daemon_topics() if not allowed(action, resource))
    assert not missing, "docs/operating.md's policies do not allow:\n" + "\n".join(missing)


def test_no_grant_of_the_policies_is_dead() -> None:
    used = daemon_topics()
    dead = [f"{name}: {action} {resource}" for name, action, resource in grants()
            if not any(a == action and _pattern(resource).fullmatch(r) for a, r in used)]
    assert not dead, "grants no topic of the daemon needs:\n" + "\n".join(dead)


@pytest.mark.parametrize("action,resource", NOT_ALLOWED)
def test_the_policies_allow_nothing_else(action: str, resource: str) -> None:
    assert not allowed(action, resource)


@functools.cache
def _code_strings() -> tuple[tuple[Path, str], ...]:
    """Every string literal of the daemon's code (docstrings left out), f-string holes as {}."""
    out = []
    for package in ("gatewayd", "transports"):
        for path in sorted((REPO / package).rglob("*.py")):
            if "emulators" in path.parts:
                continue
            tree = ast.parse(path.read_text())
            docstrings = {id(node.value) for node in ast.walk(tree)
                          if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
            inner = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
            for node in ast.walk(tree):
                if id(node) in docstrings or id(node) in inner:
                    continue
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    out.append((path, node.value))
                elif isinstance(node, ast.JoinedStr):
                    out.append((path, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)))
    return tuple(out)


def test_the_daemon_uses_no_topic_this_test_does_not_know() -> None:
    found = {(path.relative_to(REPO), text) for path, text in _code_strings() if "$aws/things/" in text}
    assert any(t == "$aws/things/{}/streams/{}" for _, t in found), "the stream topic template moved?"
    unknown = sorted(f"{path}: {text}" for path, text in found if text not in KNOWN_TEMPLATES)
    assert not unknown, ("the daemon uses MQTT topics that docs/operating.md's policies were not checked "
                         "against; extend daemon_topics() and KNOWN_TEMPLATES here, and the policies in "
                         "the guide if they do not allow them:\n" + "\n".join(unknown))


def test_the_topic_suffixes_of_the_code_are_those_of_daemon_topics() -> None:
    """The requests and filters daemon_topics() lists are the ones the code builds on its bases."""
    cloud = (REPO / "gatewayd" / "cloud.py").read_text()
    assert set(re.findall(r'f"\{base\}/([^"]+)"', cloud)) == {"notify-next", "+/get/+", "+/update/+"}
    assert set(re.findall(r'self\._request\([^,]+, [^,]+, "(\w+)"', cloud)) == {"get", "update"}
    streams = (REPO / "gatewayd" / "stream_download.py").read_text()
    assert set(re.findall(r'f"\{base\}/([^"]+)"', streams)) == {
        "get/cbor", "data/cbor", "rejected/cbor", "describe/cbor", "description/cbor"}


def test_the_guide_states_the_shadow_names_the_policies_assume() -> None:
    text = GUIDE.read_text()
    assert "shadow\n`ota` of a proxied device's own thing, shadow `ota-<device name>` of the gateway's thing" in text
    for device in guide_devices():
        if not device.get("thing_name"):
            assert len(f"ota-{device['name']}") <= 64  # a shadow name's limit


# ------------------------------------------------------------------ the files the guide makes


def test_the_guides_devices_and_signing_certificate_pass_the_daemons_checks(tmp_path: Path) -> None:
    """site.toml and [signing] as the guide writes them, with the certificate its openssl lines make."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    from gatewayd.config import load_config
    from gatewayd.verify import key_algorithm
    from pem_files import pem, write_pem

    files = saved_files()
    (tmp_path / "cert_config.txt").write_text(files["cert_config.txt"])
    for _line, source in shell_lines():
        if source.startswith("openssl "):
            subprocess.run(shlex.split(source), cwd=tmp_path, check=True, capture_output=True)
    signer = tmp_path / "ota_signer.pem"
    assert key_algorithm(signer) == "ecdsa"
    from cryptography import x509
    cert = x509.load_pem_x509_certificate(signer.read_bytes())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CODE_SIGNING in usage

    signing = next(b.text for b in blocks() if b.lang == "toml" and "[signing]" in b.text)
    mapped = tomllib.loads(signing)["signing"]["certificates"]
    assert list(mapped) == ["ota_signer.pem"], "the profile's certname is the key"
    profile = next(c for c in parse_commands()[0] if c.argv[1:3] == ["signer", "put-signing-profile"])
    assert "certname=ota_signer.pem" in profile.argv

    write_pem(tmp_path / "ca.pem", pem().ca)
    write_pem(tmp_path / "gw.cert.pem", pem().cert)
    write_pem(tmp_path / "gw.key", pem().key, 0o600)
    os.chmod(signer, 0o644)
    (tmp_path / "gateway.toml").write_text(textwrap.dedent(f"""\
        [gateway]
        thing_name = "{GATEWAY}"
        [mqtt]
        endpoint = "example-ats.iot.eu-west-1.amazonaws.com"
        ca_file = "ca.pem"
        cert_file = "gw.cert.pem"
        key_file = "gw.key"
        """) + signing.replace("/etc/ota-gateway/ota_signer.pem", str(signer)))
    (tmp_path / "devices.d").mkdir()
    (tmp_path / "devices.d" / "site.toml").write_text(files["site.toml"])
    config = load_config(tmp_path / "gateway.toml")
    assert {d.name for d in config.devices} == {d["name"] for d in guide_devices()}
    assert all((d.thing_name or "").startswith(f"{GATEWAY}-") for d in config.devices if d.thing_name), \
        "the devices policy names proxied things by the gateway's name and a hyphen"


# ------------------------------------------------------------------ the failure reasons


def reason_rows() -> list[str]:
    text = GUIDE.read_text()
    table = text[text.index("### Failure reasons"):]
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)`", table, re.M)]


def _words(text: str) -> list[str]:
    return text.split()


def matches_code(reason: str, corpus: list[str]) -> bool:
    """The reason's literal words (outside <placeholders>) are the code's. A piece is the text of
    a string of the code between two f-string holes; a word counts when it lies in a run of 3 or
    more words found in one piece, is a whole piece itself (` rejected: `), or its chunk between
    two placeholders has at most 2 words and is found whole. At least 3 of every 4 words must
    count, and either all of them or a run of 3 words or more."""
    chunks = [_words(c) for c in PLACEHOLDER.split(reason)[::2]]
    total = sum(len(c) for c in chunks)
    pieces = [" ".join(_words(piece)) for text in corpus for piece in text.split("{}")]
    whole = set(pieces)

    def occurs(words: list[str]) -> bool:
        run = " ".join(words)
        return any(run in piece for piece in pieces)

    covered = longest = 0
    for words in chunks:
        if 0 < len(words) <= 2 and occurs(words):
            covered += len(words)
            longest = max(longest, len(words))
            continue
        hit = [w in whole for w in words]
        i = 0
        while i < len(words):
            j = next((j for j in range(len(words), i + 2, -1) if occurs(words[i:j])), None)
            if j is None:
                i += 1
                continue
            hit[i:j] = [True] * (j - i)
            longest = max(longest, j - i)
            i = j
        covered += sum(hit)
    return total >= 3 and covered * 4 >= total * 3 and (longest >= 3 or covered == total)


def test_the_failure_reasons_of_the_guide_are_the_codes() -> None:
    corpus = [text for _, text in _code_strings()]
    rows = reason_rows()
    assert len(rows) >= 20
    drifted = [row for row in rows if not matches_code(row, corpus)]
    assert not drifted, "reasons in docs/operating.md that the code no longer writes:\n" + "\n".join(drifted)
    assert not matches_code("the flux capacitor of <device> is not charged, try again later", corpus)
    assert not matches_code("files[<i>] rejected: the image is too pretty to relay to devices", corpus)


# ------------------------------------------------------------------ the guide's MCUboot images


def test_the_guides_imgtool_lines_make_images_the_gateway_reads_as_section_7_says(tmp_path: Path) -> None:
    """The guide's `imgtool sign` lines, with keys made here: the gateway reads every image's
    version; an encrypted one passes its checks even with a payload byte changed (only the
    device can check the hash TLV), while the same change to a plain image is caught."""
    imgtool = shutil.which("imgtool") or str(Path(sys.executable).with_name("imgtool"))
    if not Path(imgtool).exists():
        pytest.skip("imgtool (the test extra) is not installed")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from gatewayd.mcuboot import FLAG_ENCRYPTED, ImageError, inspect_image

    lines = [source for _line, source in shell_lines() if source.startswith("imgtool sign ")]
    assert len(lines) == 3, lines
    keys = set()
    for source in lines:
        argv = shlex.split(source)
        keys.add(argv[argv.index("--key") + 1])
        if "--encrypt" in argv:
            keys.add(argv[argv.index("--encrypt") + 1])
        (tmp_path / argv[-2]).write_bytes(os.urandom(6000))
    for name in keys:
        key = ec.generate_private_key(ec.SECP256R1())
        data = (key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
                if "pub" in name else
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
        (tmp_path / name).write_bytes(data)
    for source in lines:
        argv = shlex.split(source)
        result = subprocess.run([imgtool, *argv[1:]], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, f"{source}\n{result.stderr}{result.stdout}"
        out = tmp_path / argv[-1]
        info = inspect_image(out)
        assert info.version_text == argv[argv.index("--version") + 1]
        assert bool(info.flags & FLAG_ENCRYPTED) == ("--encrypt" in argv)
        changed = bytearray(out.read_bytes())
        changed[info.header_size + 100] ^= 0x01
        (tmp_path / "changed.bin").write_bytes(changed)
        if "--encrypt" in argv:
            assert inspect_image(tmp_path / "changed.bin").hash == info.hash
        else:
            with pytest.raises(ImageError, match="does not match"):
                inspect_image(tmp_path / "changed.bin")


def test_the_status_details_table_has_the_keys_the_gateway_sends() -> None:
    from gatewayd.report import status_details
    from gatewayd.views import DeviceStatus
    from gatewayd.vocab import Word

    text = GUIDE.read_text()
    table = text[text.index("### statusDetails"):text.index("### Failure reasons")]
    documented = {re.sub(r"<[^>]+>", "<>", m.group(1)) for m in re.finditer(r"^\| `([^`]+)` \|", table, re.M)}
    few = [DeviceStatus(f"d{i}", Word.UPLOADING, "45%") for i in range(3)]
    many = [DeviceStatus(f"device-{i:02}", Word.FAILED, "x" * 300) for i in range(12)]
    sent = set()
    for details in (status_details(phase="uploading", progress=(1, 2), device="pump-a", version="2.0.0"),
                    status_details(phase="failed", device="pump-a", version="2.0.0", reason="r"),
                    status_details(phase="uploading", progress=(1, 2), version="2.0.0", devices=few),
                    status_details(phase="failed", devices=many, reason="r")):
        sent |= {re.sub(r":.*", ":<>", key) for key in details}
    assert documented == sent
