import numpy as np
import pytest

from bd3jax import masks


def brute_force_training_mask(L, Lb):
  out = np.zeros((2 * L, 2 * L), bool)
  for q in range(2 * L):
    for k in range(2 * L):
      q_x0, k_x0 = q >= L, k >= L
      qb, kb = (q % L) // Lb, (k % L) // Lb
      if q_x0 == k_x0 and qb == kb:
        out[q, k] = True
      elif not q_x0 and k_x0 and kb < qb:
        out[q, k] = True
      elif q_x0 and k_x0 and kb <= qb:
        out[q, k] = True
  return out


@pytest.mark.parametrize("L,Lb", [(8, 1), (8, 2), (8, 4), (8, 8), (12, 3), (16, 16)])
def test_training_mask_matches_brute_force(L, Lb):
  mask = masks.training_mask(L, Lb)
  np.testing.assert_array_equal(mask, brute_force_training_mask(L, Lb))
  assert not mask[L:, :L].any(), "x_0 queries must never see x_t"


@pytest.mark.parametrize("L,Lb", [(8, 1), (8, 4), (8, 8)])
def test_block_causal_mask(L, Lb):
  mask = masks.block_causal_mask(L, Lb)
  expected = np.array([[k // Lb <= q // Lb for k in range(L)] for q in range(L)])
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(masks.causal_mask(L), np.tril(np.ones((L, L), bool)))


def test_density_matches_reference():
  assert masks.density(masks.training_mask(1024, 16)) == pytest.approx(0.254, abs=5e-4)


def test_block_size_must_divide_length():
  with pytest.raises(ValueError, match="block_size 5 does not divide length 16"):
    masks.training_mask(16, 5)


@pytest.mark.parametrize("tile", [2, 4, 8])
def test_tile_map(tile):
  mask = masks.training_mask(16, 4)
  tiles = masks.tile_map(mask, tile, tile)
  for i in range(tiles.shape[0]):
    for j in range(tiles.shape[1]):
      block = mask[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
      expected = (masks.Tile.EMPTY if not block.any() else
                  masks.Tile.FULL if block.all() else masks.Tile.PARTIAL)
      assert tiles[i, j] == expected
  with pytest.raises(ValueError, match="do not divide"):
    masks.tile_map(mask, 3, 4)


def test_attention_mask_spec():
  spec = masks.AttentionMask(masks.MaskKind.TRAINING, 16, 4)
  assert spec.num_tokens == 32 and hash(spec) == hash(masks.AttentionMask(masks.MaskKind.TRAINING, 16, 4))
  np.testing.assert_array_equal(spec.dense(), masks.training_mask(16, 4))
  assert masks.AttentionMask(masks.MaskKind.FULL, 8, 8).dense().all()
