"""The OpenAPI document: in sync, complete, and matching real responses."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from relay_testclient import Device, RelayClient, Reply, b64, new_mid

from relay.app import create_app, load_openapi
from relay.config import RelayConfig

ROOT = Path(__file__).resolve().parents[2]
SPEC: dict[str, Any] = json.loads(load_openapi())
REGISTRY = Registry().with_resource(
    "urn:openapi", Resource.from_contents(SPEC, default_specification=DRAFT202012)
)


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def check(reply: Reply, path: str, method: str) -> None:
    """Validate a real response against the documented schema for its status."""
    responses = SPEC["paths"][path][method]["responses"]
    assert str(reply.status) in responses, (path, method, reply.status, reply.body[:200])
    content = responses[str(reply.status)].get("content", {})
    if "application/json" not in content:
        return
    pointer = _pointer(
        "paths",
        path,
        method,
        "responses",
        str(reply.status),
        "content",
        "application/json",
        "schema",
    )
    validator = Draft202012Validator({"$ref": f"urn:openapi#/{pointer}"}, registry=REGISTRY)
    validator.validate(reply.json())


def test_docs_copy_is_in_sync() -> None:
    assert (ROOT / "docs" / "openapi.json").read_bytes() == load_openapi()


def test_every_route_is_documented() -> None:
    app = create_app(RelayConfig(data_dir=Path("/nonexistent-never-opened")))
    routes = {
        (r.resource.canonical, r.method.lower())
        for r in app.router.routes()
        if r.method not in ("HEAD", "*") and r.resource is not None
    }
    documented = {(p, m) for p, ops in SPEC["paths"].items() for m in ops}
    assert routes == documented


def test_schemas_are_valid_json_schema() -> None:
    for schema in SPEC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


async def test_served_document_matches(client: RelayClient) -> None:
    r = await client.request(None, "GET", "/openapi.json")
    assert r.status == 200 and r.json() == SPEC


@pytest.mark.slow
async def test_real_responses_match_schemas(client: RelayClient) -> None:
    dev = Device(f"oa_{os.urandom(4).hex()}")
    check(await client.register(dev), "/v1/accounts", "post")
    check(await client.register(dev), "/v1/accounts", "post")  # 409
    dev2 = await client.add_device(dev, 2)
    check(await client.request(dev, "GET", "/v1/devices"), "/v1/devices", "get")
    key = {
        "identity_key": b64(b"\x05" * 33),
        "registration_id": 7,
        "signed_prekey": {"id": 1, "public_key": b64(b"\x05" * 33), "signature": b64(b"s" * 64)},
        "one_time_prekeys": [{"id": 3, "public_key": b64(b"\x05" * 33)}],
    }
    check(await client.request(dev, "PUT", "/v1/keys", json_body=key), "/v1/keys", "put")
    check(await client.request(dev, "PUT", "/v1/keys", json_body={}), "/v1/keys", "put")
    check(await client.request(dev, "GET", "/v1/keys/count"), "/v1/keys/count", "get")
    peer = await client.new_device()
    for _ in range(2):  # with and without a one-time prekey
        check(
            await client.request(peer, "GET", f"/v1/keys/{dev.user}"), "/v1/keys/{username}", "get"
        )
    check(
        await client.request(peer, "GET", f"/v1/keys/{dev.user}/1"),
        "/v1/keys/{username}/{device_id}",
        "get",
    )
    check(
        await client.request(peer, "GET", f"/v1/keys/{dev.user}/5"),
        "/v1/keys/{username}/{device_id}",
        "get",
    )
    mid = new_mid()
    check(await client.send(peer, [dev, dev2], b"hello", mid), "/v1/messages", "put")
    check(await client.send(peer, [dev], b"hello"), "/v1/messages", "put")  # 409 mismatch
    check(await client.read(dev), "/v1/messages", "get")
    check(await client.ack(dev, [mid]), "/v1/messages/ack", "post")
    check(await client.request(None, "GET", "/v1/messages"), "/v1/messages", "get")  # 401
    up = await client.upload_blob(dev, b"blob-bytes")
    check(up, "/v1/blobs", "post")
    check(await client.request(dev, "GET", "/v1/blobs/" + "a" * 64), "/v1/blobs/{blob_id}", "get")
    check(await client.request(dev, "DELETE", "/v1/devices/2"), "/v1/devices/{device_id}", "delete")
    check(await client.request(None, "GET", "/healthz"), "/healthz", "get")
    metrics = await client.request(None, "GET", "/metrics")
    check(metrics, "/metrics", "get")
    text = metrics.body.decode()
    for name in (
        "blindpost_relay_ws_connections",
        "blindpost_relay_messages_queued",
        "blindpost_relay_messages_accepted_total",
        "blindpost_relay_messages_delivered_total",
        "blindpost_relay_blob_bytes",
    ):
        assert f"\n{name} " in "\n" + text, name
