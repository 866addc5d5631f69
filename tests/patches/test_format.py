"""Patch file format v1: round trip, content digest, and one test per rejection reason."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from patches.errors import PatchRejected, RejectReason
from patches.fingerprint import ModelSpec
from patches.format import (
    FORMAT_V1,
    REQUIRED_FIELDS,
    content_digest,
    dump_patch,
    load_patch,
    parse_patch,
    read_patch,
    save_patch,
)
from patches.stack import Placement
from tests.patches.conftest import HIDDEN, MAX_ROWS, OTHER_FINGERPRINT

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors buffer as (header dict, tensor bytes)."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def build(header: dict | bytes, payload: bytes, **dumps_kwargs: object) -> bytes:
    """A safetensors buffer from a header (dict, or raw header bytes) and tensor bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header, **dumps_kwargs).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def expect_rejection(tmp_path: Path, data: bytes, spec: ModelSpec, reason: RejectReason, *needles: str) -> str:
    """Write ``data`` to a file, load it, and check the reason, the message's content, and that no path leaks."""
    path = tmp_path / "candidate.safetensors"
    path.write_bytes(data)
    with pytest.raises(PatchRejected) as info:
        load_patch(path, expect=spec)
    message = str(info.value)
    assert info.value.reason == reason, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert str(tmp_path) not in message
    assert path.name not in message
    return message


class TestRoundTrip:
    def test_save_then_load_preserves_metadata_rows_and_ref(self, tmp_path, spec, make_meta, make_rows):
        meta, rows = make_meta(), make_rows(3)
        path = save_patch(tmp_path / "refusal.safetensors", rows, meta)
        patch = load_patch(path, expect=spec)
        assert patch.meta == meta
        assert (patch.name, patch.version, patch.ref, patch.n_tokens) == ("refusal", 3, "refusal@3", 3)
        assert patch.rows.dtype == torch.float32
        assert not patch.rows.requires_grad
        assert torch.equal(patch.rows, rows)
        assert DIGEST_RE.fullmatch(patch.digest)
        assert [p.name for p in tmp_path.iterdir()] == ["refusal.safetensors"]  # no temporary file left behind

    def test_signer_and_signature_survive_round_trip(self, spec, make_meta, make_rows):
        meta = make_meta(signer="ops-key-1", signature="ed25519:abc")
        patch = parse_patch(dump_patch(make_rows(), meta), expect=spec)
        assert (patch.meta.signer, patch.meta.signature) == ("ops-key-1", "ed25519:abc")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_precision_file_loads_as_exact_float32_rows(self, spec, make_meta, make_rows, dtype):
        rows = make_rows(dtype=dtype)
        patch = parse_patch(dump_patch(rows, make_meta()), expect=spec)
        assert patch.rows.dtype == torch.float32
        assert torch.equal(patch.rows, rows.to(torch.float32))


class TestDigest:
    def test_stable_when_loaded_patch_is_serialised_again(self, spec, make_meta, make_rows):
        first = parse_patch(dump_patch(make_rows(), make_meta()), expect=spec)
        second = parse_patch(dump_patch(first.rows, first.meta), expect=spec)
        assert second.digest == first.digest

    def test_independent_of_header_key_order_and_whitespace(self, spec, make_meta, make_rows):
        data = dump_patch(make_rows(), make_meta())
        header, payload = split(data)
        reordered = {"patch": header["patch"], "__metadata__": dict(reversed(header["__metadata__"].items()))}
        rewritten = build(reordered, payload, indent=4)
        assert rewritten != data
        assert parse_patch(rewritten, expect=spec).digest == parse_patch(data, expect=spec).digest

    @pytest.mark.parametrize(
        "changes",
        [
            {"name": "refusal2"},
            {"version": 4},
            {"domain": "privacy"},
            {"description": "other"},
            {"created": "2025-01-02T03:04:06Z"},
            {"signer": "ops-key-1"},
            {"base_model": OTHER_FINGERPRINT},
        ],
        ids=lambda c: next(iter(c)),
    )
    def test_changes_with_any_metadata_field(self, spec, make_meta, make_rows, changes):
        rows = make_rows()
        base = parse_patch(dump_patch(rows, make_meta()), expect=spec)
        changed_spec = dataclasses.replace(spec, fingerprint=changes.get("base_model", spec.fingerprint))
        changed = parse_patch(dump_patch(rows, make_meta(**changes)), expect=changed_spec)
        assert changed.digest != base.digest

    @pytest.mark.parametrize("position", [(0, 0), (1, HIDDEN - 1), (0, 3)])
    def test_changes_with_any_tensor_value(self, spec, make_meta, make_rows, position):
        rows = make_rows()
        nudged = rows.clone()
        nudged[position] = torch.nextafter(rows[position], torch.tensor(float("inf")))
        digest = parse_patch(dump_patch(rows, make_meta()), expect=spec).digest
        assert parse_patch(dump_patch(nudged, make_meta()), expect=spec).digest != digest

    def test_changes_with_tensor_dtype_even_for_equal_values(self, spec, make_meta, make_rows):
        rows = make_rows(dtype=torch.bfloat16)
        as_bf16 = parse_patch(dump_patch(rows, make_meta()), expect=spec)
        as_f32 = parse_patch(dump_patch(rows.to(torch.float32), make_meta()), expect=spec)
        assert torch.equal(as_bf16.rows, as_f32.rows)
        assert as_bf16.digest != as_f32.digest

    def test_covers_dtype_and_shape_not_only_bytes(self, make_meta, make_rows):
        header, rows = make_meta().to_header(), make_rows(dtype=torch.bfloat16)
        digests = {content_digest(header, t) for t in (rows, rows.view(torch.float16), rows.reshape(HIDDEN, 2))}
        assert len(digests) == 3

    def test_signature_field_is_excluded(self, spec, make_meta, make_rows):
        rows = make_rows()
        digests = {
            parse_patch(dump_patch(rows, make_meta(signer="k", signature=signature)), expect=spec).digest
            for signature in (None, "sig-one", "sig-two")
        }
        assert len(digests) == 1

    def test_content_digest_matches_parsed_digest(self, spec, make_meta, make_rows):
        rows, meta = make_rows(), make_meta()
        assert content_digest(meta.to_header(), rows) == parse_patch(dump_patch(rows, meta), expect=spec).digest


class TestRejections:
    @pytest.mark.parametrize("name", ["Refusal", "../etc/passwd", "-lead", ".hidden", "a b", "x" * 65, ""])
    def test_bad_name_in_file_metadata(self, tmp_path, spec, make_meta, make_rows, name):
        header = {**make_meta().to_header(), "name": name}
        data = st_save({"patch": make_rows()}, metadata=header)
        expect_rejection(tmp_path, data, spec, RejectReason.bad_name, repr(name))

    def test_bad_name_refused_when_saving(self, tmp_path, make_meta, make_rows):
        with pytest.raises(PatchRejected) as info:
            save_patch(tmp_path / "x.safetensors", make_rows(), make_meta(name="Bad Name"))
        assert info.value.reason == RejectReason.bad_name
        assert not list(tmp_path.iterdir())

    @pytest.mark.parametrize("missing", REQUIRED_FIELDS)
    def test_bad_format_missing_metadata_field(self, tmp_path, spec, make_meta, make_rows, missing):
        header = {k: v for k, v in make_meta().to_header().items() if k != missing}
        data = st_save({"patch": make_rows()}, metadata=header)
        expect_rejection(tmp_path, data, spec, RejectReason.bad_format, missing)

    def test_bad_format_no_metadata_at_all(self, tmp_path, spec, make_rows):
        expect_rejection(tmp_path, st_save({"patch": make_rows()}), spec, RejectReason.bad_format, "metadata")

    @pytest.mark.parametrize("fmt", ["patchserve.patch/v2", "", "PATCHSERVE.PATCH/V1"])
    def test_bad_format_wrong_format_string(self, tmp_path, spec, make_meta, make_rows, fmt):
        data = st_save({"patch": make_rows()}, metadata={**make_meta().to_header(), "format": fmt})
        expect_rejection(tmp_path, data, spec, RejectReason.bad_format, repr(fmt), FORMAT_V1)

    @pytest.mark.parametrize("version", ["1.5", "v2", "two", "0", "-1", "", "1e3", "1234567890"])
    def test_bad_format_non_integer_version(self, tmp_path, spec, make_meta, make_rows, version):
        data = st_save({"patch": make_rows()}, metadata={**make_meta().to_header(), "version": version})
        expect_rejection(tmp_path, data, spec, RejectReason.bad_format, repr(version))

    def test_bad_format_two_tensors(self, tmp_path, spec, make_meta, make_rows):
        data = st_save({"patch": make_rows(), "extra": make_rows()}, metadata=make_meta().to_header())
        expect_rejection(tmp_path, data, spec, RejectReason.bad_format, "'extra'", "'patch'")

    def test_bad_format_wrong_tensor_key(self, tmp_path, spec, make_meta, make_rows):
        data = st_save({"prompt": make_rows()}, metadata=make_meta().to_header())
        expect_rejection(tmp_path, data, spec, RejectReason.bad_format, "'prompt'")

    @pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00", b"[1, 2, 3]", b'"patch"'], ids=str)
    def test_bad_format_header_not_a_json_object(self, tmp_path, spec, raw):
        expect_rejection(tmp_path, build(raw, b"\0" * 64), spec, RejectReason.bad_format, "JSON")

    def test_bad_format_header_length_over_limit(self, tmp_path, spec):
        data = struct.pack("<Q", 10**9) + b"{}"
        expect_rejection(tmp_path, data, spec, RejectReason.bad_format, str(10**9))

    def test_bad_format_undecodable_tensor(self, tmp_path, spec, make_meta, make_rows):
        header, payload = split(dump_patch(make_rows(), make_meta()))
        header["patch"]["dtype"] = "NOT_A_DTYPE"
        expect_rejection(tmp_path, build(header, payload), spec, RejectReason.bad_format, "cannot be decoded")

    @pytest.mark.parametrize("offsets", [64, None, [0], "0,64"], ids=repr)
    def test_bad_format_malformed_data_offsets(self, tmp_path, spec, make_meta, make_rows, offsets):
        header, payload = split(dump_patch(make_rows(), make_meta()))
        header["patch"]["data_offsets"] = offsets
        expect_rejection(tmp_path, build(header, payload), spec, RejectReason.bad_format)

    @pytest.mark.parametrize(
        ("cut_at", "needle"),
        [
            (lambda size, total: 0, "no safetensors header"),
            (lambda size, total: 3, "no safetensors header"),
            (lambda size, total: 7, "no safetensors header"),
            (lambda size, total: 9, "inside its header"),
            (lambda size, total: 8 + size - 1, "inside its header"),
            (lambda size, total: 8 + size, "'patch'"),
            (lambda size, total: 8 + size + 1, "'patch'"),
            (lambda size, total: total - 1, "'patch'"),
        ],
        ids=["empty", "length-3", "length-7", "header-start", "header-end", "data-empty", "data-start", "data-end"],
    )
    def test_truncated(self, tmp_path, spec, make_meta, make_rows, cut_at, needle):
        data = dump_patch(make_rows(), make_meta())
        (size,) = struct.unpack("<Q", data[:8])
        cut = cut_at(size, len(data))
        assert 0 <= cut < len(data)
        expect_rejection(tmp_path, data[:cut], spec, RejectReason.truncated, "truncated", needle)

    def test_oversized_raw_bytes(self, tmp_path, spec):
        limit = spec.max_rows * spec.hidden_size * 4 + 64 * 1024 + 8
        expect_rejection(tmp_path, b"\0" * (limit + 1), spec, RejectReason.oversized, str(limit + 1), str(limit))

    def test_oversized_file_with_huge_metadata(self, tmp_path, spec, make_meta, make_rows):
        data = dump_patch(make_rows(), make_meta(description="x" * 100_000))
        expect_rejection(tmp_path, data, spec, RejectReason.oversized, str(len(data)))

    @pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64, torch.uint8])
    def test_bad_dtype(self, tmp_path, spec, make_meta, dtype):
        data = st_save({"patch": torch.ones(2, HIDDEN, dtype=dtype)}, metadata=make_meta().to_header())
        expect_rejection(tmp_path, data, spec, RejectReason.bad_dtype, str(dtype))

    @pytest.mark.parametrize(
        ("shape", "needle"),
        [
            ((HIDDEN,), "[8]"),
            ((1, 2, HIDDEN), "[1, 2, 8]"),
            ((0, HIDDEN), "0 virtual tokens"),
            ((MAX_ROWS + 1, HIDDEN), f"{MAX_ROWS + 1} virtual tokens"),
            ((2, HIDDEN - 1), "width 7"),
            ((2, HIDDEN + 1), "width 9"),
        ],
        ids=["1-D", "3-D", "zero-rows", "too-many-rows", "too-narrow", "too-wide"],
    )
    def test_bad_shape(self, tmp_path, spec, make_meta, shape, needle):
        data = st_save({"patch": torch.zeros(shape)}, metadata=make_meta().to_header())
        expect_rejection(tmp_path, data, spec, RejectReason.bad_shape, needle)

    def test_max_rows_is_accepted(self, spec, make_meta, make_rows):
        assert parse_patch(dump_patch(make_rows(MAX_ROWS), make_meta()), expect=spec).n_tokens == MAX_ROWS

    def test_wrong_model(self, tmp_path, spec, make_meta, make_rows):
        data = dump_patch(make_rows(), make_meta(base_model=OTHER_FINGERPRINT))
        expect_rejection(
            tmp_path, data, spec, RejectReason.wrong_model, "refusal@3", OTHER_FINGERPRINT[:19], spec.fingerprint[:19]
        )

    @pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
    def test_non_finite_value(self, tmp_path, spec, make_meta, make_rows, value):
        rows = make_rows()
        rows[1, 2] = value
        expect_rejection(tmp_path, dump_patch(rows, make_meta()), spec, RejectReason.non_finite, "refusal@3")

    def test_non_finite_only_after_cast_to_float16(self, tmp_path, spec, make_meta, make_rows):
        rows = make_rows()
        rows[0, 0] = 1e5  # finite in float32 and bfloat16, inf in float16 (max 65504)
        data = dump_patch(rows, make_meta())
        assert parse_patch(data, expect=spec).rows[0, 0] == 1e5
        fp16 = dataclasses.replace(spec, dtype="float16")
        expect_rejection(tmp_path, data, fp16, RejectReason.non_finite, "refusal@3", "float16")

    def test_zero_row(self, tmp_path, spec, make_meta, make_rows):
        """Token positions carry zero embeddings in the engine input, so an all-zero patch row could share
        a prefix-cache block with a real token (vLLM #56655): refused."""
        rows = make_rows(3)
        rows[1] = 0.0
        expect_rejection(tmp_path, dump_patch(rows, make_meta()), spec, RejectReason.zero_row, "row 1")

    def test_zero_row_only_after_cast_to_float16(self, tmp_path, spec, make_meta, make_rows):
        rows = make_rows(2)
        rows[0] = 1e-9  # nonzero in float32 and bfloat16, zero in float16
        data = dump_patch(rows, make_meta())
        assert parse_patch(data, expect=spec).n_tokens == 2
        expect_rejection(tmp_path, data, dataclasses.replace(spec, dtype="float16"), RejectReason.zero_row, "row 0")

    @pytest.mark.parametrize("placement", list(Placement))
    def test_placement_round_trips_and_is_covered_by_the_digest(self, spec, make_meta, make_rows, placement):
        data = dump_patch(make_rows(), make_meta(placement=placement))
        patch = parse_patch(data, expect=spec)
        assert patch.placement == placement
        other = Placement.suffix if placement == Placement.prefix else Placement.prefix
        assert parse_patch(dump_patch(make_rows(), make_meta(placement=other)), expect=spec).digest != patch.digest

    def test_prefix_placement_is_not_written(self, make_meta, make_rows):
        """Files from before placements existed (no field) are prefix patches, byte for byte."""
        assert "placement" not in read_patch(dump_patch(make_rows(), make_meta()))[2]

    def test_unknown_placement(self, tmp_path, spec, make_meta, make_rows):
        header = {**make_meta().to_header(), "placement": "middle"}
        data = st_save({"patch": make_rows()}, metadata=header)
        expect_rejection(tmp_path, data, spec, RejectReason.bad_format, "middle")

    def test_checks_run_in_documented_order(self, tmp_path, spec, make_meta):
        """A file wrong in several ways is refused for the first failed check: dtype before model."""
        data = st_save(
            {"patch": torch.ones(2, HIDDEN, dtype=torch.int32)},
            metadata=make_meta(base_model=OTHER_FINGERPRINT).to_header(),
        )
        expect_rejection(tmp_path, data, spec, RejectReason.bad_dtype)
        bad_model_and_nan = dump_patch(torch.full((2, HIDDEN), float("nan")), make_meta(base_model=OTHER_FINGERPRINT))
        expect_rejection(tmp_path, bad_model_and_nan, spec, RejectReason.wrong_model)


class TestReadPatch:
    def test_returns_metadata_stored_tensor_and_raw_metadata(self, make_meta, make_rows):
        rows = make_rows(3, dtype=torch.bfloat16)
        meta, tensor, raw = read_patch(dump_patch(rows, make_meta()))
        assert meta == make_meta()
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, rows)
        assert raw == make_meta().to_header()

    def test_skips_model_checks(self, make_meta, make_rows):
        data = dump_patch(make_rows(MAX_ROWS + 5, width=HIDDEN * 3), make_meta(base_model=OTHER_FINGERPRINT))
        assert read_patch(data)[1].shape == (MAX_ROWS + 5, HIDDEN * 3)

    def test_keeps_format_checks(self, make_meta):
        data = st_save({"patch": torch.ones(2, HIDDEN, dtype=torch.int32)}, metadata=make_meta().to_header())
        with pytest.raises(PatchRejected) as info:
            read_patch(data)
        assert info.value.reason == RejectReason.bad_dtype
        with pytest.raises(PatchRejected) as info:
            read_patch(dump_patch(torch.ones(HIDDEN), make_meta()))
        assert info.value.reason == RejectReason.bad_shape
