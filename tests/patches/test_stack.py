"""Patch stacks: parsing ``a,b@2`` specs and the layout of prefix and suffix patches around a prompt."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from patches.errors import StackError
from patches.stack import MAX_STACK_DEPTH, PatchRef, Placement, compose_stack, inputs_embeds, parse_stack


@dataclass(frozen=True)
class Rows:
    rows: torch.Tensor
    placement: Placement = Placement.prefix


def rows(n: int, hidden: int = 4, *, start: float = 1.0, placement: Placement = Placement.prefix) -> Rows:
    """Distinct, non-zero rows: ``start, start+1, …`` laid out ``[n, hidden]``."""
    return Rows(torch.arange(n * hidden, dtype=torch.float32).reshape(n, hidden) + start, placement)


@pytest.fixture
def embedding() -> torch.nn.Embedding:
    """A small seeded embedding table (16 ids, width 4)."""
    torch.manual_seed(0)
    return torch.nn.Embedding(16, 4)


class TestParseStack:
    @pytest.mark.parametrize(
        ("spec", "expected"),
        [
            ("a", [PatchRef("a")]),
            ("a,b@2", [PatchRef("a"), PatchRef("b", 2)]),
            ("  refusal , pii@3 ,x.y_z-1  ", [PatchRef("refusal"), PatchRef("pii", 3), PatchRef("x.y_z-1")]),
            ("b,a", [PatchRef("b"), PatchRef("a")]),
            ("a@007", [PatchRef("a", 7)]),
        ],
    )
    def test_valid_specs_keep_order(self, spec, expected):
        assert parse_stack(spec) == expected

    @pytest.mark.parametrize("spec", ["none", " none ", "NONE", "\tNone\n"])
    def test_none_is_the_empty_stack(self, spec):
        assert parse_stack(spec) == []

    def test_exactly_max_depth_is_allowed(self):
        names = [f"p{i}" for i in range(MAX_STACK_DEPTH)]
        assert [r.name for r in parse_stack(",".join(names))] == names

    @pytest.mark.parametrize(
        "spec",
        ["", "   ", "a,,b", "a,", ",a", "A", "Refusal", "a@x", "a@", "@2", "a@-1", "a@1@2", "a b", "-a"],
        ids=repr,
    )
    def test_invalid_specs_raise_stack_error(self, spec):
        with pytest.raises(StackError):
            parse_stack(spec)

    def test_invalid_item_is_named_in_the_message(self):
        with pytest.raises(StackError, match="'a@x'"):
            parse_stack("ok,a@x")

    @pytest.mark.parametrize("spec", ["a,a", "a,a@2", "a@1,b,a@1"])
    def test_duplicate_names_raise(self, spec):
        with pytest.raises(StackError, match="twice"):
            parse_stack(spec)

    def test_more_than_max_depth_raises(self):
        spec = ",".join(f"p{i}" for i in range(MAX_STACK_DEPTH + 1))
        with pytest.raises(StackError, match=str(MAX_STACK_DEPTH)):
            parse_stack(spec)

    @pytest.mark.parametrize(("ref", "text"), [(PatchRef("a"), "a"), (PatchRef("a", 2), "a@2")])
    def test_ref_str_round_trips(self, ref, text):
        assert str(ref) == text
        assert PatchRef.parse(text) == ref


def _prefix(patches: list[Rows], **kwargs: int):
    """The prefix segment of a stack of prefix patches (None for the empty stack)."""
    layout = compose_stack(patches, **kwargs)
    if layout is None:
        return None
    assert layout.suffix is None
    return layout.prefix


class TestComposePrefix:
    def test_empty_stack_is_none(self):
        assert _prefix([], separator_id=5) is None

    def test_single_patch_has_no_separator(self):
        p = rows(3)
        prefix = _prefix([p], separator_id=5, placeholder_id=0)
        assert prefix.token_ids == [0, 0, 0]
        assert prefix.is_token == [False, False, False]
        assert torch.equal(prefix.embeds, p.rows)
        assert (len(prefix), prefix.n_patch_tokens) == (3, 3)

    def test_separators_only_between_patches(self):
        p1, p2, p3 = rows(2), rows(1, start=100.0), rows(3, start=200.0)
        prefix = _prefix([p1, p2, p3], separator_id=7, placeholder_id=9)
        assert prefix.token_ids == [9, 9, 7, 9, 7, 9, 9, 9]
        assert prefix.is_token == [False, False, True, False, True, False, False, False]
        assert (len(prefix), prefix.n_patch_tokens) == (8, 6)
        zero = torch.zeros(1, 4)
        assert torch.equal(prefix.embeds, torch.cat([p1.rows, zero, p2.rows, zero, p3.rows]))

    def test_prefix_keeps_patch_order(self):
        p1, p2 = rows(1), rows(1, start=50.0)
        forward = _prefix([p1, p2], separator_id=1)
        backward = _prefix([p2, p1], separator_id=1)
        assert torch.equal(forward.embeds[0], p1.rows[0])
        assert torch.equal(backward.embeds[0], p2.rows[0])


class TestPrefixInputsEmbeds:
    def test_matches_manual_concatenation(self, embedding):
        p1, p2 = rows(2), rows(3, start=100.0)
        sep, prompt = 11, [3, 4, 5, 0]
        prefix = compose_stack([p1, p2], separator_id=sep, placeholder_id=0)
        weight = embedding.weight.detach()
        expected = torch.cat([p1.rows, weight[[sep]], p2.rows, weight[prompt]])
        actual = inputs_embeds(prefix, prompt, embedding)
        assert actual.shape == (2 + 1 + 3 + 4, 4)
        assert torch.equal(actual.detach(), expected)

    def test_placeholder_id_does_not_leak_into_patch_rows(self, embedding):
        p = rows(2)
        with_zero = inputs_embeds(compose_stack([p], separator_id=1, placeholder_id=0), [2], embedding)
        with_nine = inputs_embeds(compose_stack([p], separator_id=1, placeholder_id=9), [2], embedding)
        assert torch.equal(with_zero, with_nine)

    def test_without_prefix_is_plain_embedding(self, embedding):
        prompt = [1, 2, 3]
        assert torch.equal(inputs_embeds(None, prompt, embedding), embedding(torch.tensor(prompt)))

    def test_gradients_reach_patch_rows_and_embedding(self, embedding):
        trainable = Rows(torch.zeros(2, 4, requires_grad=True))
        prefix = compose_stack([trainable, rows(1)], separator_id=3)
        inputs_embeds(prefix, [4, 5], embedding).sum().backward()
        assert torch.equal(trainable.rows.grad, torch.ones(2, 4))
        used = embedding.weight.grad.abs().sum(dim=1).nonzero().flatten().tolist()
        assert used == [3, 4, 5]  # separator and prompt tokens, never the placeholder id 0


class TestSuffixLayout:
    def test_suffix_rows_follow_the_prompt(self, embedding):
        s = rows(2, placement=Placement.suffix)
        layout = compose_stack([s], separator_id=7, placeholder_id=0)
        assert layout.prefix is None and (len(layout), layout.n_patch_tokens, layout.n_prefix) == (2, 2, 0)
        prompt = [3, 4, 5]
        assert layout.token_ids(prompt) == [3, 4, 5, 0, 0]
        assert layout.is_token(3) == [True, True, True, False, False]
        weight = embedding.weight.detach()
        assert torch.equal(inputs_embeds(layout, prompt, embedding).detach(), torch.cat([weight[prompt], s.rows]))

    def test_mixed_stack_splits_by_placement_and_keeps_order_within_each(self, embedding):
        p1, p2 = rows(1), rows(2, start=10.0)
        s1, s2 = rows(1, start=100.0, placement=Placement.suffix), rows(1, start=200.0, placement=Placement.suffix)
        layout = compose_stack([s1, p1, s2, p2], separator_id=7, placeholder_id=0)
        prompt = [3, 4]
        assert layout.token_ids(prompt) == [0, 7, 0, 0, 3, 4, 0, 7, 0]
        assert layout.is_token(2) == [False, True, False, False, True, True, False, True, False]
        assert (len(layout), layout.n_patch_tokens, layout.n_prefix) == (7, 5, 4)
        w = embedding.weight.detach()
        expected = torch.cat([p1.rows, w[[7]], p2.rows, w[prompt], s1.rows, w[[7]], s2.rows])
        assert torch.equal(inputs_embeds(layout, prompt, embedding).detach(), expected)
        engine = layout.embeds(len(prompt))  # what the server sends: rows in place, zeros at token positions
        is_row = ~torch.tensor(layout.is_token(len(prompt)))
        assert torch.equal(engine[is_row], expected[is_row]) and not engine[~is_row].any()
        # The invariant the engine's prefix-cache key relies on (it hashes embeddings, not the mask, vLLM
        # #56655): with no all-zero patch row (refused at load), a position is a token iff its embedding is 0.
        assert ((engine == 0).all(dim=1) == torch.tensor(layout.is_token(len(prompt)))).all()

    def test_gradients_reach_suffix_rows(self, embedding):
        trainable = Rows(torch.zeros(2, 4, requires_grad=True), Placement.suffix)
        inputs_embeds(compose_stack([trainable], separator_id=3), [4, 5], embedding).sum().backward()
        assert torch.equal(trainable.rows.grad, torch.ones(2, 4))
