"""The trained face parsers load the checkpoints people hold, with random weights under the real
tensor names and shapes (tests/fixtures/parsers/*.json, written from the published facts, never
from our modules): face-parsing.PyTorch's BiSeNet ``79999_iter.pth`` and the Hugging Face SegFormer
``jonathandinu/face-parsing``. Each loads strictly, gives label maps in our schema (with the
derived beard class), remaps exactly, and a wrong or truncated checkpoint fails naming the file
and what does not match."""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing import mp_models
from preprocessing.bisenet import BiSeNet, BiSeNetParser, CheckpointError
from preprocessing.labels import CLASS, LABELS
from preprocessing.parsing import TorchScriptParser, load_parser, unseen_categories
from preprocessing.torch_parser import TorchParser, files_sha256, labels_from_logits

FIXTURES = Path(__file__).parents[1] / "fixtures" / "parsers"
BISENET = json.loads((FIXTURES / "bisenet_79999_keys.json").read_text())
SEGFORMER = json.loads((FIXTURES / "segformer_face_parsing.json").read_text())


def random_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the checkpoint's names and shapes (BatchNorm statistics sane)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(80000, dtype=torch.int64)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g) * 0.1
    return state


def frames_and_landmarks(n: int = 2, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), np.zeros((n, 478, 3))


# --- BiSeNet: face-parsing.PyTorch's 79999_iter.pth -------------------------------------------


def test_bisenet_has_the_published_tensor_names_shapes_and_order() -> None:
    published = BISENET["tensors"]
    ours = {k: list(v.shape) for k, v in BiSeNet().state_dict().items()}
    assert len(published) == 191  # 36 bias-free convs + 31 BatchNorms of 5 tensors each
    assert list(ours) == list(published)
    assert ours == published


@pytest.fixture(scope="module")
def bisenet_file(tmp_path_factory) -> Path:
    """Random weights saved in the legacy (non-zip) format of 2019's ``torch.save``, as the
    published file is."""
    path = tmp_path_factory.mktemp("bisenet") / "79999_iter.pth"
    torch.save(random_state(BISENET["tensors"]), path, _use_new_zipfile_serialization=False)
    return path


def test_bisenet_checkpoint_loads_strictly_and_parses_into_our_schema(bisenet_file) -> None:
    parser = load_parser("bisenet", bisenet_file)
    assert isinstance(parser, BiSeNetParser) and parser.name == "bisenet"
    assert parser.version == files_sha256(bisenet_file)[:12]
    # Every tensor of the file is what the module holds.
    saved = torch.load(bisenet_file, weights_only=True)
    held = parser.module.state_dict()
    assert set(held) == set(saved) and all(torch.equal(held[k], saved[k]) for k in saved)
    assert parser.input_size == 512 and parser.classes == list(LABELS)

    small = BiSeNetParser(bisenet_file, input_size=64)  # the architecture runs at any 32k
    frames, lms = frames_and_landmarks(3, 40)
    labels = small.parse(frames, lms)
    assert labels.shape == (3, 40, 40) and labels.dtype == np.uint8
    assert labels.max() < len(LABELS)
    # The map is the argmax of the network's logits, resized back to the frame.
    x = torch.from_numpy(small_input(frames, 64))
    with torch.inference_mode():
        logits = small.module(x)
    assert logits.shape == (3, 19, 64, 64)
    assert np.array_equal(labels, labels_from_logits(logits, None, (40, 40)))


def small_input(frames: np.ndarray, size: int) -> np.ndarray:
    import cv2

    x = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR) for f in frames])
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((x / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)


def test_a_zip_format_state_dict_and_a_pickled_parser_load_too(bisenet_file, tmp_path) -> None:
    zipped = tmp_path / "resaved.pth"
    torch.save({f"module.{k}": v for k, v in torch.load(bisenet_file).items()}, zipped)
    parser = load_parser("bisenet", zipped)  # DataParallel's prefix is dropped
    assert isinstance(parser, BiSeNetParser)
    clone = pickle.loads(pickle.dumps(parser))  # Ray/spawn: reloaded from the file
    assert clone.version == parser.version and clone.module is not parser.module


def test_a_20_class_bisenet_outputs_beard_itself(tmp_path) -> None:
    shapes = dict(BISENET["tensors"])
    for head in ("conv_out", "conv_out16", "conv_out32"):
        key = f"{head}.conv_out.weight"
        shapes[key] = [20, *shapes[key][1:]]
    torch.save(random_state(shapes), tmp_path / "twenty.pth")
    parser = BiSeNetParser(tmp_path / "twenty.pth", input_size=32)
    assert parser.classes == list(LABELS) and not parser.derive_beard


def test_a_wrong_bisenet_checkpoint_names_the_file_and_the_mismatch(bisenet_file, tmp_path):
    state = torch.load(bisenet_file, weights_only=True)
    del state["ffm.conv1.weight"]
    state["sp.conv1.conv.weight"] = torch.zeros(64, 3, 7, 7)  # CoinCheung's BiSeNet has a sp
    state["cp.arm16.conv.conv.weight"] = torch.zeros(128, 512, 3, 3)
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as err:
        load_parser("bisenet", tmp_path / "other.pth")
    msg = str(err.value)
    assert msg.startswith("other.pth is not a face-parsing.PyTorch BiSeNet")
    assert "1 missing tensors: ffm.conv1.weight" in msg
    assert "1 unexpected tensors: sp.conv1.conv.weight" in msg
    assert "cp.arm16.conv.conv.weight (128, 512, 3, 3) instead of (128, 256, 3, 3)" in msg


def test_a_truncated_bisenet_checkpoint_names_the_file(bisenet_file, tmp_path) -> None:
    for fmt, name in ((False, "legacy.pth"), (True, "zip.pth")):
        full = tmp_path / f"full-{name}"
        torch.save(torch.load(bisenet_file), full, _use_new_zipfile_serialization=fmt)
        data = full.read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=rf"^{name}: not a readable torch state dict"):
            load_parser("bisenet", tmp_path / name)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_parser("bisenet", tmp_path / "absent.pth")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_exports_still_load_as_exports(bisenet_file, tmp_path) -> None:
    net = BiSeNetParser(bisenet_file, input_size=32).module
    scripted = torch.jit.trace(net, torch.zeros(1, 3, 32, 32))
    scripted.save(str(tmp_path / "bisenet_ts.pt"))
    parser = load_parser("bisenet", tmp_path / "bisenet_ts.pt")
    assert isinstance(parser, TorchScriptParser) and parser.classes == list(LABELS)


# --- SegFormer: jonathandinu/face-parsing ----------------------------------------------------

# Our id of each of the model's ids, written by hand from its config.json's id2label.
SEGFORMER_TO_OURS = [0, 1, 10, 6, 4, 5, 2, 3, 7, 8, 11, 12, 13, 17, 18, 9, 15, 14, 16]
# A small encoder (same layout: 4 stages, sequence reduction where sr > 1, 2 blocks in stage 3).
TINY = {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 2, 1],
        "num_attention_heads": [1, 1, 1, 1], "decoder_hidden_size": 16}  # fmt: skip


def write_segformer(folder: Path, id2label: dict[str, str], size: int = 64, seed: int = 0) -> Path:
    """A small random-weight SegFormer folder with the published config's label map."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = {k: v for k, v in SEGFORMER["config"].items() if not k.startswith("_")}
    config.update(TINY, id2label=id2label, label2id={v: int(k) for k, v in id2label.items()})
    torch.manual_seed(seed)
    SegformerForSemanticSegmentation(SegformerConfig(**config)).eval().save_pretrained(folder)
    pre = {**SEGFORMER["preprocessor_config"], "size": {"height": size, "width": size}}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


@pytest.fixture(scope="module")
def segformer_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return write_segformer(tmp_path_factory.mktemp("face-parsing"), SEGFORMER["config"]["id2label"])


def name_pattern(key: str) -> str:
    return re.sub(r"\.\d+", ".#", key)


def test_transformers_reads_and_writes_the_published_segformer_layout(segformer_dir) -> None:
    from safetensors.torch import load_file
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    published = SEGFORMER["tensors"]
    written = load_file(segformer_dir / "model.safetensors")
    # The folder the tests use holds the published checkpoint's tensor names...
    assert {name_pattern(k) for k in written} == {name_pattern(k) for k in published}
    # ... and the real mit-b5 config builds exactly the published number and shapes of tensors.
    config = SegformerConfig(**{k: v for k, v in SEGFORMER["config"].items() if k[0] != "_"})
    with torch.device("meta"):
        model = SegformerForSemanticSegmentation(config)
    shapes = sorted(tuple(v.shape) for v in model.state_dict().values())
    assert len(shapes) == len(published) == 1172
    assert shapes == sorted(tuple(s) for s in published.values())


def test_segformer_folder_loads_strictly_and_maps_its_labels_to_ours(segformer_dir) -> None:
    from preprocessing.segformer import SegFormerParser

    parser = load_parser("segformer", segformer_dir)
    assert isinstance(parser, SegFormerParser) and parser.name == "segformer"
    assert parser.classes == list(LABELS) and parser.input_size == 64
    assert parser.class_map.tolist() == SEGFORMER_TO_OURS
    frames, lms = frames_and_landmarks(2, 40)
    labels = parser.parse(frames, lms)
    assert labels.shape == (2, 40, 40) and labels.dtype == np.uint8
    # The parse is the model's own prediction (logits at 1/4, resized), in our ids.
    x = torch.from_numpy(small_input(frames, 64))
    with torch.inference_mode():
        logits = parser.module(pixel_values=x).logits
    assert logits.shape == (2, 19, 16, 16)
    expected = np.array(SEGFORMER_TO_OURS, np.uint8)[labels_from_logits(logits, None, (40, 40))]
    assert np.array_equal(labels, expected)
    clone = pickle.loads(pickle.dumps(parser))
    assert clone.version == parser.version and clone.class_map.tolist() == SEGFORMER_TO_OURS


def test_label_remapping_is_exact_on_hand_made_logits() -> None:
    logits = torch.full((1, 19, 4, 5), -1.0)
    model_ids = np.arange(20).reshape(4, 5) % 19  # every SegFormer id at a known pixel
    for (y, x), k in np.ndenumerate(model_ids):
        logits[0, k, y, x] = 5.0
    out = labels_from_logits(logits, np.array(SEGFORMER_TO_OURS, np.uint8))
    by_name = [CLASS[SEGFORMER["config"]["id2label"][str(k)]] for k in model_ids.ravel()]
    assert out[0].ravel().tolist() == by_name
    assert out[0, 0, 3] == CLASS["eye_g"] == 6 and out[0, 2, 3] == CLASS["hair"] == 17
    assert out[0, 2, 4] == CLASS["hat"] and out[0, 3, 2] == CLASS["neck"]


def test_the_pre_fix_label_list_is_replaced_by_its_correction(tmp_path, caplog) -> None:
    pytest.importorskip("transformers")
    folder = write_segformer(tmp_path / "old", SEGFORMER["pre_fix_id2label"], size=32)
    with caplog.at_level(logging.WARNING, logger="preprocessing.segformer"):
        parser = load_parser("segformer", folder)
    assert parser.class_map.tolist() == SEGFORMER_TO_OURS
    assert "Fix labels" in caplog.text


def test_a_wrong_segformer_folder_names_the_file_and_the_mismatch(segformer_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(segformer_dir, bad)
    state = load_file(bad / "model.safetensors")
    state["decode_head.classifier.weight"] = torch.zeros(5, 16, 1, 1)
    del state["decode_head.linear_fuse.weight"]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_parser("segformer", bad)
    msg = str(err.value)
    assert msg.startswith("bad/model.safetensors does not match its config.json")
    assert "1 missing tensors: decode_head.linear_fuse.weight" in msg
    assert "decode_head.classifier.weight (5, 16, 1, 1) instead of (19, 16, 1, 1)" in msg

    cut = tmp_path / "cut"
    shutil.copytree(segformer_dir, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"^cut/model.safetensors: not loadable"):
        load_parser("segformer", cut)

    odd = tmp_path / "odd"
    write_segformer(odd, {**SEGFORMER["config"]["id2label"], "3": "glasses"}, size=32)
    with pytest.raises(ValueError, match="does not know: 'glasses'"):
        load_parser("segformer", odd)
    with pytest.raises(FileNotFoundError, match="folder .* not found"):
        load_parser("segformer", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="needs local weights.*'landmarks'"):
        load_parser("segformer")


# --- what the parsers can see, for the Preparer and the app ----------------------------------


def test_trained_parsers_see_every_category_the_offline_one_not_all(bisenet_file) -> None:
    from preprocessing.parsing import LandmarkBeardParser, LandmarkParser

    assert unseen_categories(BiSeNetParser(bisenet_file, input_size=32)) == []
    # An export whose class map sends hats to hair cannot see hats.
    hat_is_hair = [*range(18), CLASS["hair"]]
    assert unseen_categories(TorchParser(torch.nn.Identity(), name="x", version="0",
                                         class_map=hat_is_hair)) == ["hat"]  # fmt: skip
    assert LandmarkBeardParser.classes == list(LABELS)
    assert issubclass(LandmarkBeardParser, LandmarkParser)
    assert unseen_categories(LandmarkBeardParser) == ["glasses", "hat", "earrings"]


def test_animate_and_app_take_the_projects_parser_setting(tmp_path, monkeypatch) -> None:
    from flows.animate import parser_setting

    (tmp_path / "params.yaml").write_text(
        "preprocess:\n  parser: bisenet\n  parser_weights: weights/79999_iter.pth\n"
    )
    monkeypatch.setenv("DURIAN_PARAMS", str(tmp_path / "params.yaml"))
    monkeypatch.setenv("DURIAN_PROJECT_DIR", str(tmp_path))
    name, weights = parser_setting(None, None)
    assert name == "bisenet" and Path(weights).name == "79999_iter.pth"
    assert parser_setting("landmarks", None) == ("landmarks", None)
    assert parser_setting(None, str(tmp_path)) == ("segformer", str(tmp_path))
    monkeypatch.setenv("DURIAN_PARAMS", str(tmp_path / "absent.yaml"))
    assert parser_setting(None, None) == ("landmarks", None)


@pytest.mark.skipif(
    not all(v == "ok" for v in mp_models.check().values()), reason="mediapipe models missing"
)
def test_the_preparer_and_the_app_say_what_the_offline_parser_cannot_see(tmp_path) -> None:
    import PIL.Image
    from skimage import data

    from durian.inference.errors import DurianInputError
    from durian.inference.prepare import Preparer
    from flows.app import parser_line

    PIL.Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    with Preparer(64) as prep:
        assert prep.unseen_categories() == ["glasses", "hat", "earrings"]
        with pytest.raises(DurianInputError, match="face parser 'landmarks' cannot see hat"):
            prep.attribute(tmp_path / "astronaut.png", "hat")
        line = parser_line(prep.parser)
    assert line.startswith("Face parser: **landmarks** — ") and "glasses, hat, earrings" in line
    with pytest.raises(DurianInputError, match="face parser: .*needs local weights"):
        _ = Preparer(64, parser="bisenet").parser
