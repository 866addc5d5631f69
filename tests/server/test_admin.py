"""Signed patches, the admin API, the rollback guard and hot loading, over the fake engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import save as st_save
from watchfiles import Change

from patches.fingerprint import fingerprint_model
from patches.format import PatchMetadata, dump_patch
from patches.signing import generate_keypair, key_id, load_private_key, sign_patch
from server.app import create_app
from server.engine import EngineConfig
from server.settings import Settings
from tests.support import FakeEngine, write_patch

ADMIN = {"Authorization": "Bearer admin-token-0123456789"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@dataclass
class Env:
    model_dir: Path
    root: Path
    patch_dir: Path
    tenants_file: Path
    key: object
    rogue_key: object
    revoked_key: object

    def settings(self, **overrides: object) -> Settings:
        values = dict(
            model=self.model_dir,
            patch_dir=self.patch_dir,
            tenants_file=self.tenants_file,
            trust_dir=self.root / "trust",
            revocations_file=self.root / "revocations.yaml",
            state_dir=self.root / "state",
            admin_token="admin-token-0123456789",
            watch=False,
        )
        return Settings(**{**values, **overrides})

    def patch_bytes(self, version: int, *, key: object = "default", noise: float = 0.01, **meta: object) -> bytes:
        path = write_patch(
            self.model_dir, self.root / "scratch", "safety", version=version, noise=noise, seed=version, key=None
        )
        data = path.read_bytes()
        if meta:
            data = _rewrite_meta(data, **meta)
        signer = self.key if key == "default" else key
        return sign_patch(data, signer) if signer is not None else data


def _rewrite_meta(data: bytes, **changes: object) -> bytes:
    import json
    import struct

    from safetensors.torch import load

    from patches.format import parse_patch  # noqa: F401 - documents where the format lives

    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])["__metadata__"]
    tensor = load(data)["patch"]
    header.update({k: str(v) for k, v in changes.items()})
    return st_save({"patch": tensor}, metadata=header)


@pytest.fixture
def env(model_dir: Path, tmp_path: Path) -> Env:
    return make_env(model_dir, tmp_path)


def make_env(model_dir: Path, tmp_path: Path) -> Env:
    """Three signing keys (one untrusted, one revoked), three tenants, and ``safety@1`` in the patch dir."""
    keys = tmp_path / "keys"
    trust = tmp_path / "trust"
    trust.mkdir()
    loaded = {}
    for name in ("vendor", "rogue", "retired"):
        private, public = generate_keypair(keys, name)
        loaded[name] = load_private_key(private)
        if name != "rogue":
            (trust / public.name).write_bytes(public.read_bytes())
    revoked_id = key_id(loaded["retired"].public_key())
    (tmp_path / "revocations.yaml").write_text(yaml.safe_dump({"revoked_keys": [revoked_id], "revoked_patches": []}))
    tenants = {
        "tenants": [
            {"id": "app", "default_stack": ["safety"], "allowed_patches": ["safety"]},
            {"id": "canary", "default_stack": ["safety@1"], "allowed_patches": ["safety"]},
            {"id": "free", "default_stack": [], "allowed_patches": ["safety"], "allow_unpatched": True},
        ]
    }
    tenants_file = tmp_path / "tenants.yaml"
    tenants_file.write_text(yaml.safe_dump(tenants))
    patch_dir = tmp_path / "patches"
    e = Env(model_dir, tmp_path, patch_dir, tenants_file, loaded["vendor"], loaded["rogue"], loaded["retired"])
    patch_dir.mkdir()
    (patch_dir / "safety-v1.safetensors").write_bytes(e.patch_bytes(1))
    return e


def start(settings: Settings) -> TestClient:
    async def factory(config: EngineConfig) -> FakeEngine:
        return FakeEngine(config.max_model_len)

    client = TestClient(create_app(settings, engine_factory=factory))
    client.__enter__()
    deadline = time.monotonic() + 30
    while client.app.state.service is None:
        assert client.app.state.startup_error is None, client.app.state.startup_error
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return client


@pytest.fixture
def client(env: Env) -> Iterator[TestClient]:
    http = start(env.settings())
    yield http
    http.__exit__(None, None, None)


def applied(http: TestClient, tenant: str = "app") -> str:
    response = http.post("/v1/chat/completions", json=CHAT, headers={"X-Tenant-Id": tenant})
    assert response.status_code == 200, response.text
    return response.headers["X-Patch-Applied"]


def upload(http: TestClient, data: bytes):
    return http.post("/admin/patches", content=data, headers={**ADMIN, "content-type": "application/octet-stream"})


class TestAdminAuth:
    def test_disabled_without_token(self, env: Env) -> None:
        http = start(env.settings(admin_token=None))
        try:
            assert http.get("/admin/patches").status_code == 404
        finally:
            http.__exit__(None, None, None)

    @pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789", "admin-token-0123456789"])
    def test_wrong_or_missing_token_is_401(self, client: TestClient, header: str | None) -> None:
        response = client.get("/admin/patches", headers={"Authorization": header} if header else {})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


class TestListingAndUpload:
    def test_listing_shows_version_hash_signer_and_users(self, client: TestClient, env: Env) -> None:
        listing = client.get("/admin/patches", headers=ADMIN).json()
        (entry,) = listing["patches"]
        assert (entry["name"], entry["version"]) == ("safety", 1)
        assert entry["sha256"].startswith("sha256:") and entry["signer"] == key_id(env.key.public_key())
        assert entry["tenants"] == ["app", "canary"]
        assert listing["version_floors"] == {"safety": 1}
        assert listing["withdrawn_versions"] == {}

    def test_upload_goes_live_for_new_requests_and_is_written(self, client: TestClient, env: Env) -> None:
        assert applied(client) == "safety@1"
        response = upload(client, env.patch_bytes(2))
        assert response.status_code == 201, response.text
        assert applied(client) == "safety@2"
        assert applied(client, "canary") == "safety@1"  # pinned tenants keep their version
        assert (env.patch_dir / "safety-v2.safetensors").is_file()


def _bad_files(env: Env) -> dict[str, bytes]:
    good = env.patch_bytes(5)
    tampered = bytearray(good)
    tampered[-3] ^= 0x01
    wide = st_save(
        {"patch": torch.zeros(4, 64)},
        metadata=PatchMetadata(name="safety", version=6, base_model=fingerprint_model(env.model_dir)).to_header(),
    )
    nan = torch.full((4, 576), float("nan"))
    return {
        "unsigned": env.patch_bytes(5, key=None),
        "bad_signature": bytes(tampered),
        "bad_signature:metadata": _rewrite_meta(good, description="innocent"),
        "unknown_key": env.patch_bytes(5, key=env.rogue_key),
        "revoked": env.patch_bytes(5, key=env.revoked_key),
        "wrong_model": env.patch_bytes(5, base_model="sha256:" + "0" * 64),
        "bad_shape": sign_patch(wide, env.key),
        "non_finite": sign_patch(
            dump_patch(nan, PatchMetadata(name="safety", version=7, base_model=fingerprint_model(env.model_dir))),
            env.key,
        ),
        "truncated": good[: len(good) // 2],
        "oversized": good + b"\0" * (256 * 576 * 4 + 70_000),
        "rollback": env.patch_bytes(1, noise=0.5),
    }


class TestRefusals:
    def test_every_bad_file_is_refused_and_the_old_version_serves(self, client: TestClient, env: Env) -> None:
        assert upload(client, env.patch_bytes(2)).status_code == 201
        for label, data in _bad_files(env).items():
            reason = label.split(":")[0]
            response = upload(client, data)
            assert response.status_code == 400, (label, response.text)
            assert response.json()["error"]["param"] == reason, (label, response.json())
            assert applied(client) == "safety@2", label
        listing = client.get("/admin/patches", headers=ADMIN).json()
        assert [p["version"] for p in listing["patches"]] == [1, 2]
        assert {r["reason"] for r in listing["rejections"]} <= {r.split(":")[0] for r in _bad_files(env)}
        assert sorted(env.patch_dir.iterdir()) == [
            env.patch_dir / "safety-v1.safetensors",
            env.patch_dir / "safety-v2.safetensors",
        ]

    def test_revoked_patch_hash(self, env: Env) -> None:
        from patches.fingerprint import model_spec
        from patches.format import parse_patch

        data = env.patch_bytes(3)
        digest = parse_patch(data, expect=model_spec(env.model_dir)).digest
        (env.root / "revocations.yaml").write_text(yaml.safe_dump({"revoked_patches": [digest]}))
        http = start(env.settings())
        try:
            response = upload(http, data)
            assert response.status_code == 400 and response.json()["error"]["param"] == "revoked"
        finally:
            http.__exit__(None, None, None)


class TestUnloadAndRollback:
    def test_unload_refused_while_a_default_stack_needs_it(self, client: TestClient) -> None:
        response = client.delete("/admin/patches/safety/1", headers=ADMIN)
        assert response.status_code == 409 and "canary" in response.json()["error"]["message"]
        assert applied(client) == "safety@1"

    def test_unload_of_an_unused_version(self, client: TestClient, env: Env) -> None:
        upload(client, env.patch_bytes(2))
        upload(client, env.patch_bytes(3))
        assert client.delete("/admin/patches/safety/2", headers=ADMIN).status_code == 204
        assert applied(client) == "safety@3" and applied(client, "canary") == "safety@1"
        assert not (env.patch_dir / "safety-v2.safetensors").exists()
        # Retired below the floor: the same file cannot come back without an explicit rollback.
        assert upload(client, env.patch_bytes(2)).json()["error"]["param"] == "rollback"

    def test_explicit_rollback_withdraws_newer_versions(self, client: TestClient, env: Env) -> None:
        v2 = env.patch_bytes(2)
        upload(client, v2)
        response = client.post("/admin/patches/safety/rollback", json={"version": 1}, headers=ADMIN)
        assert response.status_code == 200 and response.json()["withdrawn"] == ["safety@2"]
        assert applied(client) == "safety@1"
        assert upload(client, v2).json()["error"]["param"] == "rollback"
        listing = client.get("/admin/patches", headers=ADMIN).json()
        assert (listing["version_floors"], listing["withdrawn_versions"]) == ({"safety": 1}, {"safety": [2]})
        assert upload(client, env.patch_bytes(3)).status_code == 201  # a new fixed version is fine

    def test_guard_holds_after_restart(self, env: Env) -> None:
        http = start(env.settings())
        old = (env.patch_dir / "safety-v1.safetensors").read_bytes()
        upload(http, env.patch_bytes(2))
        upload(http, env.patch_bytes(3))
        assert http.delete("/admin/patches/safety/2", headers=ADMIN).status_code == 204
        v2 = env.patch_bytes(2)
        http.__exit__(None, None, None)

        (env.patch_dir / "old-v2.safetensors").write_bytes(v2)
        http = start(env.settings())
        try:
            listing = http.get("/admin/patches", headers=ADMIN).json()
            assert [p["version"] for p in listing["patches"]] == [1, 3]  # v1 is still live (pinned), v2 is not
            assert [(r["source"], r["reason"]) for r in listing["rejections"]] == [("old-v2.safetensors", "rollback")]
            assert (env.patch_dir / "safety-v1.safetensors").read_bytes() == old
        finally:
            http.__exit__(None, None, None)


class TestWatcher:
    def test_new_changed_and_removed_files(self, client: TestClient, env: Env) -> None:
        watcher = client.app.state.watcher
        path = env.patch_dir / "hot.safetensors"
        path.write_bytes(env.patch_bytes(2))
        watcher.apply({(Change.added, str(path))})
        assert applied(client) == "safety@2"
        path.write_bytes(env.patch_bytes(3))
        watcher.apply({(Change.modified, str(path))})
        assert applied(client) == "safety@3"
        assert [p["version"] for p in client.get("/admin/patches", headers=ADMIN).json()["patches"]] == [1, 3]
        path.write_bytes(b"garbage")
        watcher.apply({(Change.modified, str(path))})
        assert applied(client) == "safety@3"  # a bad replacement leaves the previous version serving
        path.unlink()
        watcher.apply({(Change.deleted, str(path))})
        assert applied(client) == "safety@1"

    def test_removing_a_needed_file_is_refused(self, client: TestClient, env: Env) -> None:
        path = env.patch_dir / "safety-v1.safetensors"
        path.unlink()
        client.app.state.watcher.apply({(Change.deleted, str(path))})
        assert applied(client) == "safety@1"
        rejections = client.get("/admin/patches", headers=ADMIN).json()["rejections"]
        assert rejections[0]["reason"] == "in_use"

    def test_tenant_file_reload_and_refusal(self, client: TestClient, env: Env) -> None:
        config = yaml.safe_load(env.tenants_file.read_text())
        config["tenants"][2]["default_stack"] = ["safety"]
        env.tenants_file.write_text(yaml.safe_dump(config))
        assert client.post("/admin/tenants/reload", headers=ADMIN).json() == {"applied": True, "error": None}
        assert applied(client, "free") == "safety@1"
        config["tenants"][2]["default_stack"] = ["ghost"]
        env.tenants_file.write_text(yaml.safe_dump(config))
        result = client.post("/admin/tenants/reload", headers=ADMIN).json()
        assert result["applied"] is False and "ghost" in result["error"]
        assert applied(client, "free") == "safety@1"

    def test_revocation_list_change_unloads_revoked_patches(self, client: TestClient, env: Env) -> None:
        upload(client, env.patch_bytes(2))
        listing = client.get("/admin/patches", headers=ADMIN).json()
        v2 = next(p for p in listing["patches"] if p["version"] == 2)
        revocations = env.root / "revocations.yaml"
        revocations.write_text(yaml.safe_dump({"revoked_patches": [v2["sha256"]]}))
        client.app.state.watcher.apply({(Change.modified, str(revocations))})
        assert applied(client) == "safety@1"
        assert upload(client, env.patch_bytes(2)).json()["error"]["param"] in ("revoked", "rollback")
        revocations.write_text(yaml.safe_dump({"revoked_keys": [v2["signer"]]}))
        client.app.state.watcher.apply({(Change.modified, str(revocations))})
        # Every patch by that key is gone, pinned or not: revocation fails closed.
        response = client.post("/v1/chat/completions", json=CHAT, headers={"X-Tenant-Id": "app"})
        assert response.status_code == 503
        assert client.get("/readyz").status_code == 503

    def test_real_file_drop_goes_live(self, env: Env) -> None:
        http = start(env.settings(watch=True))
        try:
            tmp = env.patch_dir / ".drop.tmp"
            tmp.write_bytes(env.patch_bytes(2))
            tmp.rename(env.patch_dir / "safety-v2.safetensors")
            deadline = time.monotonic() + 20
            while applied(http) != "safety@2":
                assert time.monotonic() < deadline, "dropped file never went live"
                time.sleep(0.05)
        finally:
            http.__exit__(None, None, None)


def test_watch_filter_ignores_unrelated_files(client: TestClient, env: Env) -> None:
    watcher = client.app.state.watcher
    assert watcher.relevant(Change.added, str(env.patch_dir / "x.safetensors"))
    assert not watcher.relevant(Change.added, str(env.patch_dir / ".x.safetensors.tmp"))
    assert not watcher.relevant(Change.modified, str(env.root / "server.log"))
    assert watcher.relevant(Change.modified, str(env.tenants_file))
    assert watcher.relevant(Change.modified, str(env.root / "revocations.yaml"))


class TestTenantSigners:
    def _with_signers(self, env: Env, signers: list[str]) -> None:
        config = yaml.safe_load(env.tenants_file.read_text())
        config["tenants"].append(
            {
                "id": "strict",
                "default_stack": [],
                "allowed_patches": ["safety"],
                "allow_unpatched": True,
                "allowed_signers": signers,
            }
        )
        config["tenants"].append(
            {
                "id": "strict-default",
                "default_stack": ["safety"],
                "allowed_patches": ["safety"],
                "allowed_signers": signers,
            }
        )
        env.tenants_file.write_text(yaml.safe_dump(config))

    def test_patch_by_a_signer_the_tenant_does_not_accept_is_refused(self, env: Env) -> None:
        self._with_signers(env, [key_id(env.rogue_key.public_key())])
        http = start(env.settings())
        try:
            response = http.post(
                "/v1/chat/completions", json=CHAT, headers={"X-Tenant-Id": "strict", "X-Patch-Stack": "safety"}
            )
            assert response.status_code == 403 and "does not accept" in response.json()["error"]["message"]
            default = http.post("/v1/chat/completions", json=CHAT, headers={"X-Tenant-Id": "strict-default"})
            assert default.status_code == 503
            assert applied(http, "app") == "safety@1"  # other tenants are unaffected
        finally:
            http.__exit__(None, None, None)

    def test_accepted_signer_serves(self, env: Env) -> None:
        self._with_signers(env, [key_id(env.key.public_key())])
        http = start(env.settings())
        try:
            assert applied(http, "strict-default") == "safety@1"
        finally:
            http.__exit__(None, None, None)


def test_admin_token_that_is_a_tenant_key_is_refused_at_start(env: Env) -> None:
    from patches.tenants import hash_api_key

    config = yaml.safe_load(env.tenants_file.read_text())
    config["tenants"][0]["api_keys"] = [hash_api_key("admin-token-0123456789")]
    env.tenants_file.write_text(yaml.safe_dump(config))

    async def factory(config: EngineConfig) -> FakeEngine:
        return FakeEngine(config.max_model_len)

    with TestClient(create_app(env.settings(), engine_factory=factory)) as http:
        deadline = time.monotonic() + 30
        while http.app.state.startup_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert "tenant API key" in http.app.state.startup_error
        assert http.get("/readyz").status_code == 503
