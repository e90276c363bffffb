"""The synthetic renderer: determinism, labels vs pixels, landmarks vs pose, occlusion."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from preprocessing.labels import CLASS, FACE_CLASSES
from synthetic import (
    FLAT_PALETTE,
    Attributes,
    Background,
    Beard,
    Glasses,
    Hair,
    Hat,
    Identity,
    Pose,
    random_attributes,
    random_identity,
    random_motion,
    render_frame,
    render_video,
)
from synthetic.mesh import N_MESH, canonical_mesh, topology
from synthetic.render import block_labels

EVERYTHING = Attributes(
    hair=Hair(style="long", fringe="straight", color=(150, 65, 35)),
    glasses=Glasses(shape="rect", frame=(20, 20, 20), opacity=0.2),
    hat=Hat(style="fedora", color=(40, 90, 160), band=(200, 200, 40)),
    beard=Beard(style="full", color=(60, 40, 30)),
)
IDENTITY = Identity()
FEATURES = {CLASS[c] for c in ("l_brow", "r_brow", "l_eye", "r_eye", "nose", "mouth", "u_lip",
                               "l_lip")}


def _poly_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    fixed = np.round((points[:, :2] - 0.5) * 16).astype(np.int32)
    cv2.fillPoly(mask, [fixed], 1, cv2.LINE_8, 4)
    return mask.astype(bool)


def test_canonical_mesh_and_topology():
    vertices, triangles = canonical_mesh()
    assert vertices.shape == (N_MESH, 3) and triangles.shape == (898, 3)
    topo = topology()
    assert len(topo.face_oval) == 36
    assert len(topo.left_eye) == 16 and len(topo.right_eye) == 16
    # mediapipe's "left" is the subject's left: positive x in the canonical model.
    assert vertices[list(topo.left_eye), 0].min() > 0 > vertices[list(topo.right_eye), 0].max()
    # Upper lid above lower lid, upper lip above lower lip.
    assert (vertices[list(topo.left_eye_upper), 1].mean()
            > vertices[list(topo.left_eye_lower), 1].mean())
    assert (vertices[list(topo.lips_outer_upper), 1].mean()
            > vertices[list(topo.lips_outer_lower), 1].mean())


def test_render_is_deterministic_and_seeded():
    def draw(seed):
        rng = np.random.default_rng(seed)
        identity, attributes = random_identity(rng), random_attributes(rng)
        return render_video(identity, attributes, random_motion(rng, 3), 64, seed)

    a, b, c = draw(5), draw(5), draw(6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    frames, labels, landmarks = a
    assert frames.shape == (3, 64, 64, 3) and frames.dtype == np.uint8
    assert labels.shape == (3, 64, 64) and labels.dtype == np.uint8
    assert landmarks.shape == (3, 478, 3) and landmarks.dtype == np.float32


def _mode_reference(hi: np.ndarray, k: int) -> np.ndarray:
    """Independent block majority: np.unique per block, ties to the centre sample."""
    h, w = hi.shape[0] // k, hi.shape[1] // k
    out = np.empty((h, w), np.uint8)
    for i in range(h):
        for j in range(w):
            block = hi[i * k:(i + 1) * k, j * k:(j + 1) * k].ravel()
            values, counts = np.unique(block, return_counts=True)
            best = values[counts == counts.max()]
            centre = block[(k // 2) * k + k // 2]
            out[i, j] = centre if centre in best else best[0]
    return out


@pytest.mark.parametrize("pose", [Pose(), Pose(yaw=18, pitch=-8, roll=10, mouth_open=0.8,
                                                blink_left=0.5, gaze_x=0.7)])
def test_labels_cover_exactly_the_pixels_drawn_with_their_class(pose):
    n, k = 40, 3
    # At full resolution every pixel's flat colour is its label's colour, and nothing else.
    hi_img, hi_labels, hi_lm = render_frame(IDENTITY, EVERYTHING, pose, n * k, 1,
                                            supersample=1, flat=True)
    np.testing.assert_array_equal(hi_img, FLAT_PALETTE[hi_labels])
    present = set(np.unique(hi_labels).tolist())
    assert {CLASS[c] for c in ("hair", "hat", "eye_g", "beard", "skin", "cloth")} <= present
    # Supersampled: colours are the block means of those pixels, labels their majority.
    img, labels, lm = render_frame(IDENTITY, EVERYTHING, pose, n, 1, supersample=k, flat=True)
    expected = FLAT_PALETTE[hi_labels].astype(np.float64).reshape(n, k, n, k, 3).mean((1, 3))
    assert np.abs(img.astype(np.float64) - expected).max() <= 0.5 + 1e-9
    np.testing.assert_array_equal(labels, _mode_reference(hi_labels, k))
    np.testing.assert_array_equal(labels, block_labels(hi_labels, k))
    np.testing.assert_allclose(lm[:, :2] * k, hi_lm[:, :2], atol=1e-3)
    # The shaded render has exactly the same labels: colouring never moves a class.
    _, shaded_labels, _ = render_frame(IDENTITY, EVERYTHING, pose, n, 1, supersample=k)
    np.testing.assert_array_equal(shaded_labels, labels)


def test_shaded_pixels_have_their_class_colour_and_no_others_do():
    # Distinctive colours, grey surroundings, no anti-aliasing: every pixel is one material.
    identity = replace(IDENTITY, cloth=(200, 200, 200), cloth_stripes=False)
    attributes = Attributes(
        hair=Hair(style="bob", color=(30, 170, 60)),
        glasses=Glasses(frame=(20, 20, 20), tint=(200, 200, 200), opacity=0.2),
        hat=Hat(style="cap", color=(40, 60, 200), band=(40, 60, 200)),
        beard=Beard(style="goatee", color=(170, 40, 170)),
    )
    grey = Background(kind="flat", colors=((128, 128, 128),) * 3)
    img, labels, _ = render_frame(identity, attributes, Pose(yaw=10), 128, grey, supersample=1)
    img = img.astype(np.float64) + 1e-6
    for name, color in (("hair", (30, 170, 60)), ("hat", (40, 60, 200)),
                        ("beard", (170, 40, 170))):
        unit = np.asarray(color, np.float64) / np.linalg.norm(color)
        matches = (img @ unit) / np.linalg.norm(img, axis=2) > 0.995
        labelled = labels == CLASS[name]
        assert labelled.sum() > 30, name
        # Shading scales a colour, so its direction identifies the material's class exactly.
        np.testing.assert_array_equal(matches, labelled, err_msg=name)


def test_landmarks_move_with_translation():
    size = 100
    a_img, a_lab, a = render_frame(IDENTITY, Attributes(), Pose(), size, 1)
    b_img, b_lab, b = render_frame(IDENTITY, Attributes(), replace(Pose(), tx=0.6), size, 1)
    np.testing.assert_allclose(b[:, 0] - a[:, 0], 10.0, atol=1e-3)
    np.testing.assert_allclose(b[:, 1:], a[:, 1:], atol=1e-3)
    # The drawn face moves with its landmarks: the feature classes shift by exactly 10 px.
    for c in FEATURES:
        np.testing.assert_array_equal(b_lab[:, 10:] == c, a_lab[:, :-10] == c)


def test_landmarks_rotate_with_roll_and_follow_yaw_pitch_scale():
    size, theta = 128, 20.0
    base = Pose()
    a = render_frame(IDENTITY, Attributes(), base, size, 1)[2]
    b = render_frame(IDENTITY, Attributes(), replace(base, roll=theta), size, 1)[2]
    pivot = np.array([base.tx * size, base.ty * size])
    t = np.radians(theta)
    # Counter-clockwise on screen (y points down).
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    np.testing.assert_allclose((a[:, :2] - pivot) @ rot.T + pivot, b[:, :2], atol=1e-3)

    nose_tip, oval = 1, list(topology().face_oval)

    def nose_offset(pose):
        lm = render_frame(IDENTITY, Attributes(), pose, size, 1)[2]
        return lm[nose_tip, :2] - lm[oval, :2].mean(0)

    assert nose_offset(replace(base, yaw=20))[0] > 2 > -2 > nose_offset(replace(base, yaw=-20))[0]
    assert nose_offset(replace(base, pitch=15))[1] - nose_offset(replace(base, pitch=-15))[1] > 3
    small = render_frame(IDENTITY, Attributes(), replace(base, scale=0.3), size, 1)[2]
    np.testing.assert_allclose(np.ptp(small[:N_MESH, :2], 0) / np.ptp(a[:N_MESH, :2], 0),
                               0.3 / base.scale, rtol=1e-4)


def test_blink_and_mouth_change_landmarks_and_labels():
    open_img, open_lab, open_lm = render_frame(IDENTITY, Attributes(), Pose(), 192, 1)
    shut = replace(Pose(), blink_left=1.0, blink_right=1.0, mouth_open=1.0)
    _, shut_lab, shut_lm = render_frame(IDENTITY, Attributes(), shut, 192, 1)
    topo = topology()
    for upper, lower, cls in ((topo.left_eye_upper, topo.left_eye_lower, "l_eye"),
                              (topo.right_eye_upper, topo.right_eye_lower, "r_eye")):
        gap_open = (open_lm[list(lower), 1] - open_lm[list(upper), 1]).max()
        gap_shut = (shut_lm[list(lower), 1] - shut_lm[list(upper), 1]).max()
        assert gap_shut < 0.2 * gap_open
        assert (shut_lab == CLASS[cls]).sum() < 0.3 * (open_lab == CLASS[cls]).sum()
    # The canonical mouth is barely parted; opening the jaw shows several times more mouth.
    assert (shut_lab == CLASS["mouth"]).sum() > 3 * (open_lab == CLASS["mouth"]).sum() > 0


def test_landmark_polygons_agree_with_the_label_map():
    pose = Pose(yaw=12, roll=-8, pitch=5)
    _, labels, lm = render_frame(IDENTITY, Attributes(), pose, 224, 4)
    topo = topology()
    oval = _poly_mask(lm[list(topo.face_oval)], labels.shape)
    inner = cv2.erode(oval.astype(np.uint8), np.ones((5, 5))).astype(bool)
    # Inside the oval: only skin and facial features (ears and hair sit outside it).
    assert set(np.unique(labels[inner]).tolist()) <= set(FACE_CLASSES)
    # The oval holds the skin∪features pixels of the face; features never leave it.
    face = np.isin(labels, list(FACE_CLASSES))
    assert face[inner].all()
    assert not np.isin(labels, list(FEATURES))[~oval].any()
    # Eye and lip polygons from the landmarks are labelled as such (their interiors).
    for idx, cls in ((topo.left_eye, "l_eye"), (topo.right_eye, "r_eye")):
        mask = cv2.erode(_poly_mask(lm[list(idx)], labels.shape).astype(np.uint8),
                         np.ones((3, 3))).astype(bool)
        assert mask.sum() > 5 and (labels[mask] == CLASS[cls]).all()
    upper = _poly_mask(lm[list(topo.lips_outer_upper) + list(topo.lips_inner_upper[::-1])],
                       labels.shape)
    upper = cv2.erode(upper.astype(np.uint8), np.ones((3, 3))).astype(bool)
    assert upper.sum() > 3 and (labels[upper] == CLASS["u_lip"]).all()


def test_glasses_occlude_eyes_and_hat_occludes_hair():
    pose = Pose(yaw=8)
    plain = Attributes(hair=Hair(style="short", volume=1.5))
    _, lab_plain, _ = render_frame(IDENTITY, plain, pose, 192, 1)
    _, lab_glasses, _ = render_frame(IDENTITY, replace(plain, glasses=Glasses()), pose, 192, 1)
    _, lab_hat, _ = render_frame(IDENTITY, replace(plain, hat=Hat(style="beanie")), pose, 192, 1)
    eyes = np.isin(lab_plain, [CLASS["l_eye"], CLASS["r_eye"]])
    assert eyes.sum() > 30
    assert (lab_glasses[eyes] == CLASS["eye_g"]).all()
    assert not np.isin(lab_glasses, [CLASS["l_eye"], CLASS["r_eye"]]).any()
    hair = lab_plain == CLASS["hair"]
    hat = lab_hat == CLASS["hat"]
    assert (hair & hat).sum() > 0.5 * hair.sum()  # the hat sits over most of the short hair
    assert (lab_hat == CLASS["hair"]).sum() < hair.sum()
    # Only hair, skin and background (around the crown) may be covered by the hat.
    assert set(np.unique(lab_plain[hat]).tolist()) <= {CLASS["hair"], CLASS["skin"],
                                                       CLASS["background"]}


def test_any_resolution_and_aspect():
    rng = np.random.default_rng(0)
    identity, attributes = random_identity(rng), random_attributes(rng)
    img, labels, lm = render_frame(identity, attributes, Pose(), (96, 72), 3)
    assert img.shape == (96, 72, 3) and labels.shape == (96, 72)
    big = render_frame(identity, attributes, Pose(), (192, 144), 3)[2]
    np.testing.assert_allclose(big[:, :2], lm[:, :2] * 2, atol=1e-3)
    # Background kinds differ between seeds and fill what the portrait leaves free.
    other = render_frame(identity, attributes, Pose(), (96, 72), 4)[0]
    bg = labels == CLASS["background"]
    assert bg.any() and not np.array_equal(img[bg], other[bg])
