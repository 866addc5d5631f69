"""OMS bundles in the running server (fake engine): a trusted EC key in the trust dir, bundles beside files
in the patch dir, hot loading of bundle changes, revocation, unload, and uploads (embedded signature only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from watchfiles import Change

from patches.oms import bundle_path, ec_key_id, generate_ec_keypair, load_trusted_key, sign_bundle
from tests.server.test_admin import ADMIN, Env, applied, make_env, start, upload


@pytest.fixture
def env(model_dir: Path, tmp_path: Path) -> Env:
    """test_admin's set-up: trusted Ed25519 keys, three tenants, ``safety@1`` natively signed."""
    return make_env(model_dir, tmp_path)


def trust_ec_key(env: Env) -> tuple[object, str]:
    """An EC key pair ``oms`` whose public key joins the trust dir; returns (private key path, key id)."""
    private, public = generate_ec_keypair(env.root / "ec-keys", "oms")
    (env.root / "trust" / public.name).write_bytes(public.read_bytes())
    return private, ec_key_id(load_trusted_key(public))  # type: ignore[arg-type]


def drop_bundled(env: Env, version: int, key: object) -> None:
    """``safety-v<version>`` without an embedded signature, with its OMS bundle beside it."""
    path = env.patch_dir / f"safety-v{version}.safetensors"
    path.write_bytes(env.patch_bytes(version, key=None))
    sign_bundle(path, key)  # type: ignore[arg-type]


def test_bundled_file_serves_and_lists_its_ec_signer(env: Env) -> None:
    key, kid = trust_ec_key(env)
    drop_bundled(env, 2, key)
    http = start(env.settings())
    try:
        assert applied(http) == "safety@2"
        listing = http.get("/admin/patches", headers=ADMIN).json()
        assert [(p["version"], p["signer"].split(":")[0]) for p in listing["patches"]] == [(1, "ed25519"), (2, "ecdsa")]
        assert listing["patches"][1]["signer"] == kid and listing["rejections"] == []
    finally:
        http.__exit__(None, None, None)


def test_watcher_treats_a_bundle_change_as_a_change_of_its_patch(env: Env) -> None:
    key, kid = trust_ec_key(env)
    http = start(env.settings())
    try:
        watcher = http.app.state.watcher
        path = env.patch_dir / "safety-v2.safetensors"
        path.write_bytes(env.patch_bytes(2, key=None))
        watcher.apply({(Change.added, str(path))})
        assert applied(http) == "safety@1"  # no embedded signature and no bundle yet
        assert watcher.relevant(Change.added, str(bundle_path(path)))
        assert not watcher.relevant(Change.added, str(env.patch_dir / ".safetensors-v2.safetensors.sig.1.tmp"))
        sign_bundle(path, key)  # type: ignore[arg-type]
        watcher.apply({(Change.added, str(bundle_path(path)))})
        assert applied(http) == "safety@2"

        # A bundle change that no event reported (the watcher was down) is caught by the rescan.
        drop_bundled(env, 3, key)
        bundle_path(env.patch_dir / "safety-v3.safetensors").unlink()
        watcher.rescan()
        assert applied(http) == "safety@2"
        sign_bundle(env.patch_dir / "safety-v3.safetensors", key)  # type: ignore[arg-type]
        watcher.rescan()
        assert applied(http) == "safety@3"

        revocations = env.root / "revocations.yaml"
        revocations.write_text(yaml.safe_dump({"revoked_keys": [kid]}))
        watcher.apply({(Change.modified, str(revocations))})
        assert applied(http) == "safety@1"  # every version the revoked EC key signed is gone
        listing = http.get("/admin/patches", headers=ADMIN).json()
        assert [p["version"] for p in listing["patches"]] == [1]
    finally:
        http.__exit__(None, None, None)


def test_unload_removes_the_bundle_with_the_file(env: Env) -> None:
    key, _ = trust_ec_key(env)
    drop_bundled(env, 2, key)
    drop_bundled(env, 3, key)
    http = start(env.settings())
    try:
        assert http.delete("/admin/patches/safety/2", headers=ADMIN).status_code == 204
        v2 = env.patch_dir / "safety-v2.safetensors"
        assert not v2.exists() and not bundle_path(v2).exists()
        assert bundle_path(env.patch_dir / "safety-v3.safetensors").exists()
    finally:
        http.__exit__(None, None, None)


def test_upload_needs_the_embedded_signature(env: Env) -> None:
    trust_ec_key(env)
    http = start(env.settings())
    try:
        response = upload(http, env.patch_bytes(2, key=None))
        assert response.status_code in (400, 403), response.text
        assert response.json()["error"]["param"] == "unsigned"
        assert upload(http, env.patch_bytes(2)).status_code == 201
    finally:
        http.__exit__(None, None, None)
