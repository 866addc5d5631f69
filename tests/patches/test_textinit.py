"""Text initialisation of patch rows: trimming or repeating token ids, copying embedding rows."""

from __future__ import annotations

import pytest
import torch

from patches.textinit import text_init_ids, text_init_rows


class TestTextInitIds:
    def test_longer_text_is_trimmed_to_its_first_ids(self):
        assert text_init_ids([10, 11, 12, 13, 14], 3) == [10, 11, 12]

    def test_exact_length_is_unchanged(self):
        assert text_init_ids([10, 11, 12], 3) == [10, 11, 12]

    def test_shorter_text_is_repeated_cyclically_then_cut(self):
        assert text_init_ids([10, 11, 12], 7) == [10, 11, 12, 10, 11, 12, 10]

    def test_exact_multiple_repeats_whole_text(self):
        assert text_init_ids([10, 11], 6) == [10, 11, 10, 11, 10, 11]

    def test_single_id_fills_every_position(self):
        assert text_init_ids([5], 4) == [5, 5, 5, 5]

    @pytest.mark.parametrize("n_tokens", [1, 2, 3, 4, 5, 9, 50])
    @pytest.mark.parametrize("n_ids", [1, 3, 4, 7])
    def test_always_exactly_n_tokens_in_text_order(self, n_ids, n_tokens):
        token_ids = list(range(100, 100 + n_ids))
        out = text_init_ids(token_ids, n_tokens)
        assert len(out) == n_tokens
        assert out == [token_ids[i % n_ids] for i in range(n_tokens)]

    def test_input_list_is_not_modified(self):
        token_ids = [1, 2]
        text_init_ids(token_ids, 5)
        text_init_ids(token_ids, 1)
        assert token_ids == [1, 2]

    def test_empty_ids_raise_value_error(self):
        with pytest.raises(ValueError, match="non-empty init text"):
            text_init_ids([], 4)


class TestTextInitRows:
    @pytest.fixture
    def embedding(self) -> torch.Tensor:
        return torch.randn(20, 6, generator=torch.Generator().manual_seed(0))

    def test_rows_are_the_embedding_rows_of_the_ids(self, embedding):
        rows = text_init_rows(embedding, [3, 7], 5)
        assert rows.shape == (5, 6)
        assert torch.equal(rows, embedding[[3, 7, 3, 7, 3]])

    def test_bfloat16_embedding_gives_exact_float32_rows(self, embedding):
        bf16 = embedding.to(torch.bfloat16)
        rows = text_init_rows(bf16, [1, 2, 3], 2)
        assert rows.dtype == torch.float32
        assert torch.equal(rows, bf16[[1, 2]].to(torch.float32))

    def test_rows_are_detached_from_the_embedding(self, embedding):
        trainable = embedding.clone().requires_grad_(True)
        rows = text_init_rows(trainable, [0, 1], 2)
        assert not rows.requires_grad
        assert rows.grad_fn is None

    def test_rows_are_a_copy(self, embedding):
        before = embedding.clone()
        rows = text_init_rows(embedding, [4], 3)
        rows += 1.0
        assert torch.equal(embedding, before)

    def test_empty_ids_raise_value_error(self, embedding):
        with pytest.raises(ValueError):
            text_init_rows(embedding, [], 3)

    def test_out_of_vocabulary_id_raises(self, embedding):
        with pytest.raises(IndexError):
            text_init_rows(embedding, [20], 1)
