import math

import pytest

from durian.evaluation.promotion import decide

PRIMARY = ["psnr_attr", "ssim"]


def test_no_champion_yet_promotes():
    d = decide({"psnr_attr": 10.0, "ssim": 0.5}, None, PRIMARY)
    assert d.promote and "no champion" in d.reason


def test_better_on_all_promotes():
    d = decide({"psnr_attr": 11.0, "ssim": 0.6}, {"psnr_attr": 10.0, "ssim": 0.5}, PRIMARY)
    assert d.promote
    assert d.compared["ssim"] == (0.6, 0.5)


def test_worse_on_one_does_not_promote():
    d = decide({"psnr_attr": 11.0, "ssim": 0.4}, {"psnr_attr": 10.0, "ssim": 0.5}, PRIMARY)
    assert not d.promote and "ssim" in d.reason


def test_tie_does_not_promote():
    d = decide({"psnr_attr": 10.0, "ssim": 0.6}, {"psnr_attr": 10.0, "ssim": 0.5}, PRIMARY)
    assert not d.promote and "psnr_attr" in d.reason


@pytest.mark.parametrize("bad", [None, math.nan])
def test_missing_metric_does_not_promote(bad):
    cand = {"psnr_attr": 11.0}
    if bad is not None:
        cand["ssim"] = bad
    d = decide(cand, None, PRIMARY)
    assert not d.promote and "ssim" in d.reason


def test_lower_is_better():
    d = decide({"l1": 0.1}, {"l1": 0.2}, ["l1"], higher_is_better=False)
    assert d.promote
    d = decide({"l1": 0.3}, {"l1": 0.2}, ["l1"], higher_is_better=False)
    assert not d.promote
