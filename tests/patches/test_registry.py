"""The patch registry: loading a directory, recording refusals, and resolving references."""

from __future__ import annotations

import json
import struct
from functools import partial

import pytest
import torch

from patches.errors import PatchNotFound, PatchRejected, RejectReason
from patches.format import parse_patch
from patches.registry import PatchRegistry
from patches.stack import PatchRef
from tests.patches.conftest import HIDDEN, OTHER_FINGERPRINT


@pytest.fixture
def registry(spec) -> PatchRegistry:
    return PatchRegistry(partial(parse_patch, expect=spec))


class TestLoadDir:
    def test_loads_valid_files_and_records_invalid_ones(self, registry, write_patch, patch_dir):
        write_patch("refusal", 1)
        write_patch("pii", 2)
        write_patch("foreign", 1, base_model=OTHER_FINGERPRINT)
        write_patch("nan", 1, rows=torch.full((2, HIDDEN), float("nan")))
        (patch_dir / "cut.safetensors").write_bytes(b"\x10\x00")
        (patch_dir / "notes.txt").write_text("not a patch")

        loaded = registry.load_dir(patch_dir)

        assert sorted(p.ref for p in loaded) == ["pii@2", "refusal@1"]
        assert registry.names() == {"pii", "refusal"}
        assert [(r.source, r.reason) for r in registry.rejections()] == [
            ("cut.safetensors", "truncated"),
            ("foreign-v1.safetensors", "wrong_model"),
            ("nan-v1.safetensors", "non_finite"),
        ]
        assert all(r.message for r in registry.rejections())

    def test_empty_directory_loads_nothing(self, registry, patch_dir):
        assert registry.load_dir(patch_dir) == []
        assert registry.entries() == []
        assert registry.rejections() == []

    def test_unreadable_entry_is_recorded_as_truncated(self, registry, write_patch, patch_dir):
        write_patch("refusal", 1)
        (patch_dir / "dir.safetensors").mkdir()
        assert [p.ref for p in registry.load_dir(patch_dir)] == ["refusal@1"]
        [rejection] = registry.rejections()
        assert (rejection.source, rejection.reason) == ("dir.safetensors", "truncated")
        assert str(patch_dir) not in rejection.message

    def test_malformed_header_does_not_abort_the_directory(self, registry, write_patch, patch_dir):
        data = write_patch("bad", 1).read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        header["patch"]["data_offsets"] = None
        raw = json.dumps(header).encode()
        (patch_dir / "bad-v1.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])
        write_patch("refusal", 1)
        assert [p.ref for p in registry.load_dir(patch_dir)] == ["refusal@1"]
        assert [r.reason for r in registry.rejections()] == ["bad_format"]


class TestLoadFile:
    def test_refusal_is_recorded_and_reraised(self, registry, write_patch):
        path = write_patch("foreign", 1, base_model=OTHER_FINGERPRINT)
        with pytest.raises(PatchRejected) as info:
            registry.load_file(path)
        assert info.value.reason == RejectReason.wrong_model
        assert [r.source for r in registry.rejections()] == [path.name]
        assert registry.entries() == []

    def test_fixed_file_clears_its_rejection(self, registry, write_patch, make_rows):
        bad = write_patch("refusal", 1, rows=torch.full((2, HIDDEN), float("inf")))
        with pytest.raises(PatchRejected):
            registry.load_file(bad)
        good = write_patch("refusal", 1, rows=make_rows())
        assert good == bad
        assert registry.load_file(good).ref == "refusal@1"
        assert registry.rejections() == []

    def test_entries_record_source_and_are_sorted(self, registry, write_patch):
        for name, version in [("b", 1), ("a", 1), ("a", 2)]:
            registry.load_file(write_patch(name, version))
        assert [(e.patch.ref, e.source) for e in registry.entries()] == [
            ("a@1", "a-v1.safetensors"),
            ("a@2", "a-v2.safetensors"),
            ("b@1", "b-v1.safetensors"),
        ]


class TestResolve:
    @pytest.fixture
    def loaded(self, registry, write_patch, patch_dir) -> PatchRegistry:
        for version in (1, 2, 10):
            write_patch("refusal", version)
        write_patch("pii", 3)
        registry.load_dir(patch_dir)
        return registry

    def test_bare_name_resolves_to_numerically_newest_version(self, loaded):
        assert loaded.resolve(PatchRef("refusal")).version == 10

    @pytest.mark.parametrize("version", [1, 2, 10])
    def test_exact_version(self, loaded, version):
        patch = loaded.resolve(PatchRef("refusal", version))
        assert patch.ref == f"refusal@{version}"

    def test_unknown_name(self, loaded):
        with pytest.raises(PatchNotFound, match="'tone'"):
            loaded.resolve(PatchRef("tone"))

    def test_unknown_version_lists_loaded_versions(self, loaded):
        with pytest.raises(PatchNotFound, match=r"refusal@3 .*\[1, 2, 10\]"):
            loaded.resolve(PatchRef("refusal", 3))

    def test_rejected_newer_file_leaves_older_version_serving(self, loaded, write_patch):
        before = loaded.resolve(PatchRef("refusal"))
        newer = write_patch("refusal", 11, rows=torch.zeros(2, HIDDEN + 1))
        with pytest.raises(PatchRejected):
            loaded.load_file(newer)
        assert loaded.resolve(PatchRef("refusal")) is before
        with pytest.raises(PatchNotFound):
            loaded.resolve(PatchRef("refusal", 11))
        assert [(r.source, r.reason) for r in loaded.rejections()] == [("refusal-v11.safetensors", "bad_shape")]

    def test_accepted_newer_file_takes_over_bare_name(self, loaded, write_patch):
        loaded.load_file(write_patch("refusal", 11))
        assert loaded.resolve(PatchRef("refusal")).version == 11
        assert loaded.resolve(PatchRef("refusal", 10)).version == 10

    def test_resolve_all_keeps_stack_order(self, loaded):
        patches = loaded.resolve_all([PatchRef("pii"), PatchRef("refusal", 1), PatchRef("refusal")])
        assert [p.ref for p in patches] == ["pii@3", "refusal@1", "refusal@10"]

    def test_resolve_all_of_empty_stack(self, loaded):
        assert loaded.resolve_all([]) == []

    def test_resolve_all_fails_if_any_ref_is_missing(self, loaded):
        with pytest.raises(PatchNotFound, match="'tone'"):
            loaded.resolve_all([PatchRef("pii"), PatchRef("tone")])

    def test_resolved_rows_match_file_contents(self, loaded, make_rows):
        assert torch.equal(loaded.resolve(PatchRef("refusal", 2)).rows, make_rows(seed=2))
