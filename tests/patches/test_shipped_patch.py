"""The patch `make run` ships: signed by the demo key, made for the embedded model, servable."""

from __future__ import annotations

from pathlib import Path

from patches.fingerprint import model_spec
from patches.signing import Verifier, key_id, load_public_key
from patches.tenants import load_tenants
from patches.trust import TrustStore

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "demo"


def test_shipped_refusal_patches_verify_against_the_embedded_model(model_dir: Path) -> None:
    trust = TrustStore.load(DEMO / "trust")
    paths = sorted((DEMO / "patches").glob("refusal-v*.safetensors"))
    patches = [Verifier(trust).verify_file(path, expect=model_spec(model_dir)) for path in paths]
    # refusal@3 (prefix) and refusal@10 (suffix), the earlier ones, kept selectable, and refusal@22 (suffix),
    # which demo-patched serves
    assert sorted((p.version, p.placement.value) for p in patches) == [(3, "prefix"), (10, "suffix"), (22, "suffix")]
    for patch in patches:
        assert patch.name == "refusal" and patch.n_tokens == 50
        assert patch.meta.signer == key_id(load_public_key(DEMO / "trust" / "demo-signer.pub"))


def test_shipped_fairness_patch_verifies_against_the_embedded_model(model_dir: Path) -> None:
    trust = TrustStore.load(DEMO / "trust")
    (path,) = sorted((DEMO / "patches").glob("fairness-v*.safetensors"))
    patch = Verifier(trust).verify_file(path, expect=model_spec(model_dir))
    assert (patch.name, patch.placement.value, patch.n_tokens) == ("fairness", "prefix", 50)


def test_demo_tenants_use_it() -> None:
    tenants = {t.id: t for t in load_tenants(DEMO / "tenants.yaml").tenants}
    assert [str(r) for r in tenants["demo-patched"].default_refs] == ["refusal"]
    assert tenants["demo-base"].default_refs == [] and tenants["demo-base"].allow_unpatched
    assert [str(r) for r in tenants["demo-fair"].default_refs] == ["fairness"]
    assert [str(r) for r in tenants["demo-family"].default_refs] == ["refusal", "fairness"]  # a real stack
    assert not tenants["demo-family"].allow_unpatched
    assert set(tenants["demo-base"].allowed_patches) == {"refusal", "fairness"}
