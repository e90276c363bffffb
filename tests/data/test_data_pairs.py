import numpy as np
import pytest
import torch
from data_synth import make_clip

from durian.data.masks import BankExpander, attribute_mask, build_mask_bank
from durian.data.pairs import (
    NoAttributeError,
    PairConfig,
    collate_examples,
    make_example,
    sample_drops,
    sample_frames,
    to_torch,
)


def _min_distance(refs: list[int], targets: tuple[int, ...]) -> int:
    return min(abs(r - t) for r in refs for t in targets)


@pytest.mark.parametrize(("num_frames", "stride"), [(1, 1), (8, 2)])
def test_sample_frames_keeps_minimum_gap(num_frames: int, stride: int) -> None:
    for seed in range(200):
        c = sample_frames(100, num_frames, stride, 30, np.random.default_rng(seed))
        assert c.gap == 30 and len(c.target) == num_frames
        assert np.all(np.diff(c.target) == stride)
        assert _min_distance([c.identity, c.attribute], c.target) >= 30
        assert c.identity != c.attribute
        assert 0 <= min(c.target) and max(c.target) < 100


def test_sample_frames_clamps_for_short_clips() -> None:
    seen_targets = set()
    for seed in range(100):
        c = sample_frames(10, 1, 1, 30, np.random.default_rng(seed))
        assert c.gap == 9 and _min_distance([c.identity, c.attribute], c.target) >= 9
        seen_targets.add(c.target)
    assert seen_targets == {(0,), (9,)}
    c = sample_frames(12, 4, 4, 30, np.random.default_rng(0))  # stride shrinks to fit: 3
    assert np.all(np.diff(c.target) == 3) and max(c.target) <= 11
    c = sample_frames(3, 5, 2, 30, np.random.default_rng(0))  # shorter than the window
    assert len(c.target) == 5 and max(c.target) == 2 and c.gap == 0


def test_example_category_is_present_in_attribute_frame() -> None:
    clip = make_clip(num_frames=40, size=32, categories=("hair", "glasses"))
    cfg = PairConfig(resolution=(32, 32), min_gap=10, min_fraction=0.02, augment=False)
    cats = set()
    for seed in range(30):
        ex = make_example(clip, cfg, np.random.default_rng(seed))
        frame = ex["frames"]["attribute"]
        assert attribute_mask(clip.parsing[frame], ex["category"]).mean() >= 0.02
        assert _min_distance([frame, ex["frames"]["identity"]], ex["frames"]["target"]) >= 10
        cats.add(ex["category"])
    assert cats == {"hair", "glasses"}
    only = PairConfig(resolution=32, min_gap=10, categories=("glasses",), augment=False)
    assert make_example(clip, only, np.random.default_rng(0))["category"] == "glasses"
    # Above glasses' pixel fraction only hair remains.
    big = PairConfig(resolution=32, min_gap=10, min_fraction=0.1, augment=False)
    assert {make_example(clip, big, np.random.default_rng(s))["category"] for s in range(10)} == {
        "hair"
    }


def test_attribute_frame_skips_frames_without_attribute() -> None:
    clip = make_clip(num_frames=20, size=32, absent_frames=tuple(range(0, 19)))
    cfg = PairConfig(resolution=32, min_gap=3, augment=False)
    for seed in range(10):
        ex = make_example(clip, cfg, np.random.default_rng(seed))
        assert ex["frames"]["attribute"] == 19
    with pytest.raises(NoAttributeError):
        make_example(make_clip(categories=()), cfg, np.random.default_rng(0))


def test_references_complementary_and_expanded() -> None:
    clip = make_clip(num_frames=30, size=32, categories=("hair",), identity="me")
    others = [make_clip(num_frames=3, size=32, identity=f"o{i}", seed=i + 1) for i in range(3)]
    bank = build_mask_bank(others, 8, np.random.default_rng(0))
    expander = BankExpander(bank, n_union=2, dilation_range=(0.05, 0.1))
    cfg = PairConfig(resolution=(32, 32), min_gap=8, augment=False)
    for seed in range(5):
        ex = make_example(clip, cfg, np.random.default_rng(seed), expander)
        own = attribute_mask(clip.parsing[ex["frames"]["identity"]], ex["category"])
        m_port, m_attr = ex["identity_mask"], ex["attribute_mask"]
        assert (m_port >= own).all() and m_port.sum() > own.sum()
        assert not ex["identity_ref"][m_port].any()
        np.testing.assert_array_equal(
            ex["identity_ref"][~m_port], clip.frames[ex["frames"]["identity"]][~m_port]
        )
        assert not ex["attribute_ref"][~m_attr].any()
        np.testing.assert_array_equal(
            ex["attribute_ref"][m_attr], clip.frames[ex["frames"]["attribute"]][m_attr]
        )
        assert m_attr.any()


def test_augmented_references_stay_masked() -> None:
    clip = make_clip(num_frames=30, size=64, categories=("hair", "glasses"))
    cfg = PairConfig(resolution=(48, 48), min_gap=8, max_rotate=20.0, max_translate=0.1)
    for seed in range(5):
        ex = make_example(clip, cfg, np.random.default_rng(seed), BankExpander(None))
        assert ex["identity_ref"].shape == (48, 48, 3) and ex["identity_mask"].shape == (48, 48)
        assert not ex["identity_ref"][ex["identity_mask"]].any()
        assert not ex["attribute_ref"][~ex["attribute_mask"]].any()
        assert ex["attribute_mask"].any()


def test_example_is_deterministic_under_seed() -> None:
    clip = make_clip(num_frames=30, size=32, categories=("hair", "glasses"))
    cfg = PairConfig(resolution=32, num_frames=4, frame_stride=2, min_gap=5)
    a = make_example(clip, cfg, np.random.default_rng(7), BankExpander(None, 1, (0.0, 0.1)))
    b = make_example(clip, cfg, np.random.default_rng(7), BankExpander(None, 1, (0.0, 0.1)))
    for k in ("target", "identity_ref", "identity_mask", "attribute_ref", "keypoints"):
        np.testing.assert_array_equal(a[k], b[k])
    assert a["frames"] == b["frames"] and a["category"] == b["category"]


def test_drop_rates() -> None:
    cfg = PairConfig()
    rng = np.random.default_rng(0)
    draws = [sample_drops(cfg, rng) for _ in range(20000)]
    freq = {k: draws.count(k) / len(draws) for k in set(draws)}
    assert abs(freq[(True, True)] - 0.1) < 0.01
    assert abs(freq[(True, False)] - 0.05) < 0.01
    assert abs(freq[(False, True)] - 0.05) < 0.01
    never = PairConfig(drop_all_prob=0, drop_identity_prob=0, drop_attribute_prob=0)
    assert all(sample_drops(never, rng) == (False, False) for _ in range(100))
    with pytest.raises(ValueError):
        PairConfig(drop_all_prob=0.6, drop_identity_prob=0.3, drop_attribute_prob=0.2)


def test_torch_contract_shapes_and_ranges() -> None:
    clip = make_clip(num_frames=20, size=32, categories=("hair",))
    cfg = PairConfig(resolution=(24, 32), num_frames=3, frame_stride=2, min_gap=4)
    exs = [to_torch(make_example(clip, cfg, np.random.default_rng(s), key=f"k{s}")) for s in (1, 2)]
    batch = collate_examples(exs)
    assert batch["target"].shape == (2, 3, 3, 24, 32)
    assert batch["keypoints"].shape == (2, 3, 3, 24, 32)
    for k in ("identity_ref", "attribute_ref"):
        assert batch[k].shape == (2, 3, 24, 32)
    for k in ("identity_mask", "attribute_mask"):
        assert batch[k].shape == (2, 1, 24, 32)
        assert set(batch[k].unique().tolist()) <= {0.0, 1.0}
    for k in ("target", "identity_ref", "attribute_ref"):
        assert batch[k].dtype == torch.float32 and -1 <= batch[k].min() and batch[k].max() <= 1
    assert 0 <= batch["keypoints"].min() and batch["keypoints"].max() <= 1
    assert batch["keypoints"].max() > 0
    assert (batch["identity_ref"] * batch["identity_mask"] == -batch["identity_mask"]).all()
    assert (
        batch["attribute_ref"] * (1 - batch["attribute_mask"]) == batch["attribute_mask"] - 1
    ).all()
    assert batch["drop_identity"].dtype == torch.bool and batch["drop_identity"].shape == (2,)
    assert batch["key"] == ["k1", "k2"] and batch["category"] == ["hair", "hair"]


def test_unmasked_references_are_whole_frames_without_masks() -> None:
    """The shortcut ablation (mask_references=False): same frames, nothing removed or kept."""
    clip = make_clip(num_frames=40, size=32, categories=("hair",))
    masked = PairConfig(resolution=32, min_gap=10, augment=False)
    plain = PairConfig(resolution=32, min_gap=10, augment=False, mask_references=False)
    a = make_example(clip, masked, np.random.default_rng(3))
    b = make_example(clip, plain, np.random.default_rng(3))
    assert a["frames"] == b["frames"] and a["category"] == b["category"]
    assert a["identity_mask"].any() and not b["identity_mask"].any()
    assert b["attribute_mask"].all()
    assert np.array_equal(b["identity_ref"], clip.frames[b["frames"]["identity"]])
    assert np.array_equal(b["attribute_ref"], clip.frames[b["frames"]["attribute"]])
    # The masked example removed the attribute region from the identity reference.
    assert not np.array_equal(a["identity_ref"], b["identity_ref"])
