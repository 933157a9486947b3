import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spa_viz.layers.packing import pack, plan_packing, unpack


@st.composite
def keep_masks(draw) -> torch.Tensor:
    batch = draw(st.integers(1, 6))
    tokens = draw(st.integers(1, 40))
    pattern = draw(st.sampled_from(["random", "one", "all", "mixed"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    if pattern == "all":
        return torch.ones(batch, tokens, dtype=torch.bool)
    keep = torch.rand(batch, tokens, generator=gen) < draw(st.floats(0.05, 0.95))
    if pattern in ("one", "mixed"):
        keep[0] = False
        keep[0, draw(st.integers(0, tokens - 1))] = True
    if pattern == "mixed" and batch > 1:
        keep[-1] = True
    keep[keep.sum(1) == 0, 0] = True  # min_keep = 1
    return keep


def _check_identity(keep: torch.Tensor, policy: str, row_len: int | None) -> None:
    batch, tokens = keep.shape
    x = torch.randn(batch, tokens, 3)
    base = torch.full_like(x, -7.0)
    plan = plan_packing(keep, policy, row_len)
    packed = pack(x, plan)
    assert packed.shape == (plan.num_rows, plan.row_len, 3)
    assert torch.all(packed[~plan.valid] == 0)
    out = unpack(packed, plan, base)
    assert torch.equal(out[keep], x[keep])
    assert torch.equal(out[~keep], base[~keep])
    # every kept token sits in exactly one slot, and slots point where they say
    assert plan.num_kept == int(keep.sum())
    assert sorted(plan.valid_sources.tolist()) == keep.reshape(-1).nonzero().squeeze(1).tolist()
    assert torch.equal(plan.kept_counts, keep.sum(1))
    v = plan.valid
    assert torch.equal(packed[v], x[plan.slot_image[v], plan.slot_token[v]])


@settings(max_examples=60, deadline=None)
@given(keep=keep_masks(), row_len=st.integers(1, 30))
def test_container_roundtrip_and_layout(keep: torch.Tensor, row_len: int) -> None:
    _check_identity(keep, "container", row_len)
    plan = plan_packing(keep, "container", row_len)
    total = int(keep.sum())
    assert plan.row_len == row_len
    assert plan.num_rows == -(-total // row_len)
    flat_valid = plan.valid.reshape(-1)
    assert flat_valid[:total].all() and not flat_valid[total:].any(), "only the tail of the last container is padding"
    sources = plan.slot_source.reshape(-1)[:total]
    assert torch.all(sources[1:] > sources[:-1]), "raster order within images, images in batch order"


@settings(max_examples=60, deadline=None)
@given(keep=keep_masks(), row_len=st.one_of(st.none(), st.integers(1, 60)))
def test_image_policy_roundtrip_and_whole_images(keep: torch.Tensor, row_len: int | None) -> None:
    _check_identity(keep, "image", row_len)
    plan = plan_packing(keep, "image", row_len)
    counts = keep.sum(1)
    assert plan.row_len == max(row_len or 0, int(counts.max()))
    assert plan.num_rows <= keep.shape[0]
    for image in range(keep.shape[0]):
        rows = (plan.slot_image == image).any(1).nonzero().squeeze(1)
        assert rows.numel() == 1, "an image never spans two rows"
        slots = (plan.slot_image[rows[0]] == image).nonzero().squeeze(1)
        assert slots.numel() == counts[image]
        assert torch.all(slots[1:] - slots[:-1] == 1), "an image's tokens are contiguous"


def test_first_fit_decreasing_fills_rows() -> None:
    keep = torch.zeros(4, 10, dtype=torch.bool)
    for image, count in enumerate([6, 4, 5, 5]):
        keep[image, :count] = True
    plan = plan_packing(keep, "image", row_len=10)
    assert plan.num_rows == 2
    assert plan.fill_ratio == 1.0
    assert sorted(map(tuple, plan.segments[:, [0, 2, 3]].tolist())) == [(0, 4, 1), (0, 6, 0), (1, 5, 2), (1, 5, 3)]


def test_container_segments_split_images_across_containers() -> None:
    keep = torch.ones(2, 5, dtype=torch.bool)
    plan = plan_packing(keep, "container", row_len=4)
    # 10 tokens in containers of 4: [a a a a] [a b b b] [b b - -]
    assert plan.segments.tolist() == [[0, 0, 4, 0], [1, 0, 1, 0], [1, 1, 3, 1], [2, 0, 2, 1]]
    assert plan.fill_ratio == pytest.approx(10 / 12)
    mask = plan.attention_mask[1, 0]
    assert not mask[0, 1] and not mask[0, 3] and mask[1, 2] and mask[1, 3] and mask[0, 0]


def test_pack_unpack_gradcheck() -> None:
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    plan = plan_packing(keep, "container", row_len=3)
    x = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: unpack(pack(a, plan) * 2.0, plan, b), (x, base))


@pytest.mark.parametrize(
    "keep, policy, row_len, message",
    [
        (torch.ones(2, 3), "image", None, "bool"),
        (torch.ones(2, 3, 1, dtype=torch.bool), "image", None, r"\(B, T\)"),
        (torch.ones(2, 3, dtype=torch.bool), "rows", None, "unknown packing policy"),
        (torch.ones(2, 3, dtype=torch.bool), "container", 0, "L must be >= 1"),
        (torch.ones(2, 3, dtype=torch.bool), "container", None, "needs a container length"),
    ],
)
def test_bad_input_raises(keep, policy, row_len, message) -> None:
    with pytest.raises(ValueError, match=message):
        plan_packing(keep, policy, row_len)


def test_pack_rejects_mismatched_tensor() -> None:
    plan = plan_packing(torch.ones(2, 3, dtype=torch.bool), "image")
    with pytest.raises(ValueError, match="plan is for"):
        pack(torch.zeros(2, 4, 1), plan)


def test_flat_position_inverts_the_sources() -> None:
    keep = torch.tensor([[True, False, True, True], [False, True, False, True]])
    for policy, row_len in (("image", None), ("container", 3)):
        plan = plan_packing(keep, policy, row_len)
        position = plan.flat_position
        assert torch.equal(position[plan.sources], torch.arange(plan.num_kept))
        assert torch.equal(position >= 0, keep.reshape(-1))
