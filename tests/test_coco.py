"""preprocessing/prepare.py --captions: an MS-COCO split -> shards with SD-VAE moments, encoder
features and the CLIP text features of every caption, plus the empty caption's (tiny stand-ins
on a toy COCO layout written here)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_preprocessing import make_image, reference_crop

from dataset import LatentDataset
from preprocessing.prepare import main, parse_args
from preprocessing.sources import SourceError
from urepa import shards
from urepa.encoders import ENCODER_STANDIN, load_encoder
from urepa.text_encoders import TEXT_ENCODER_STANDIN, load_text_encoder
from urepa.utils import ReportedError
from urepa.vae import load_vae

RES = 32
# file name -> captions in annotation-id order (ids are given out of order in the JSON)
CAPTIONS = {
    "COCO_train2014_000000000009.jpg": ["A red circle.", "a circle that is red"],
    "COCO_train2014_000000000025.jpg": ["two squares", "A blue square\n", "squares, blue."],
    "COCO_train2014_000000000030.jpg": ["a green triangle"],
    "COCO_train2014_000000000034.jpg": ["", "an empty caption came first"],
}
UNCAPTIONED = "COCO_train2014_000000000036.jpg"


def write_coco(root) -> tuple[str, str]:
    """COCO-2014's layout: train2014/ and annotations/captions_train2014.json."""
    images = root / "train2014"
    images.mkdir(parents=True)
    for k, name in enumerate([*CAPTIONS, UNCAPTIONED]):
        (images / name).write_bytes(make_image(40 + 7 * k, 35, "RGB", "JPEG", seed=k))
    ids = {name: 9 + 10 * k for k, name in enumerate(CAPTIONS)}
    annotations = [
        {"id": 1000 - 10 * k - j, "image_id": ids[name], "caption": caption}
        for k, (name, captions) in enumerate(CAPTIONS.items())
        for j, caption in enumerate(reversed(captions))  # higher ids first in the file
    ]
    coco = {
        "images": [{"id": i, "file_name": n} for n, i in ids.items()]
        + [{"id": 36, "file_name": UNCAPTIONED}],
        "annotations": annotations[::-1],
    }
    (root / "annotations").mkdir()
    captions_file = root / "annotations" / "captions_train2014.json"
    captions_file.write_text(json.dumps(coco))
    return str(images), str(captions_file)


def prepare_coco(source: str, captions: str, dest: str, *extra: str) -> dict:
    flags = f"--vae tiny-random --enc-type {ENCODER_STANDIN} --resolution {RES} --shard-size 3"
    flags += f" --batch-size 2 --num-workers 0 --text-encoder {TEXT_ENCODER_STANDIN}"
    argv = ["--source", source, "--captions", captions, "--dest", dest, *flags.split(), *extra]
    manifest = main(parse_args(argv))
    assert manifest is not None
    return manifest


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    source, captions = write_coco(root)
    dest = str(root / "coco32")
    return source, captions, dest, prepare_coco(source, captions, dest)


def test_each_caption_is_stored_as_the_text_encoder_gives_it_alone(coco):
    """Every caption encoded on its own (batches of one), against the batched shards."""
    source, _, dest, manifest = coco
    order = sorted(CAPTIONS)
    assert manifest["num_samples"] == 4 and manifest["captions"]["max_per_image"] == 3
    assert manifest["captions"]["total"] == 8
    text = load_text_encoder(TEXT_ENCODER_STANDIN)
    reader = shards.ShardReader(dest, manifest, ["caption_counts", f"text-{TEXT_ENCODER_STANDIN}"])
    features = reader.read_all(f"text-{TEXT_ENCODER_STANDIN}")  # (4, 3, 77, 32)
    assert features.shape == (4, 3, 77, 32) and features.dtype == np.float16
    assert reader.read_all("caption_counts").tolist() == [len(CAPTIONS[n]) for n in order]
    for i, name in enumerate(order):
        for j, caption in enumerate(CAPTIONS[name]):
            alone = text([caption])[0].half().numpy()
            np.testing.assert_allclose(features[i, j], alone, rtol=2e-3, atol=2e-3)
        assert not features[i, len(CAPTIONS[name]) :].any()  # no caption: zero rows
    sidecars = [shards.read_json(shards.sidecar_path(dest, s)) for s in range(2)]
    assert [c for s in sidecars for c in s["captions"]] == [CAPTIONS[n] for n in order]


def test_images_moments_features_and_the_empty_caption(coco):
    source, _, dest, manifest = coco
    order = sorted(CAPTIONS)
    assert [e["path"] for e in manifest["excluded"]] == [UNCAPTIONED]
    crops = [reference_crop(Image.open(os.path.join(source, n)), RES) for n in order]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    moments = load_vae("tiny-random").encode_moments(x)
    features = load_encoder(ENCODER_STANDIN, resolution=RES)(x).half()
    ds = LatentDataset(dest)
    for i in range(len(order)):
        torch.testing.assert_close(ds[i]["moments"], moments[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ds[i]["features"][0], features[i], rtol=2e-3, atol=2e-3)
    entry = manifest["captions"]["empty_caption"]
    empty = np.load(os.path.join(dest, entry["file"]))
    expected = load_text_encoder(TEXT_ENCODER_STANDIN)([""])[0].half().numpy()
    np.testing.assert_array_equal(empty, expected)
    ds.verify()


def test_a_rerun_resumes_and_other_captions_are_refused(coco, tmp_path):
    source, captions, dest, manifest = coco
    assert prepare_coco(source, captions, dest) == manifest  # complete: nothing rewritten
    with open(captions) as f:
        edited = json.load(f)
    edited["annotations"][0]["caption"] = "another caption"
    other = tmp_path / "captions.json"
    other.write_text(json.dumps(edited))
    with pytest.raises(ReportedError, match="other settings"):
        prepare_coco(source, str(other), dest)


def test_bad_captions_input_is_a_one_line_error(coco, tmp_path):
    source, captions, _, _ = coco
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(SourceError, match="not a COCO captions file"):
        prepare_coco(source, str(bad), str(tmp_path / "d"))
    with pytest.raises(SystemExit):
        parse_args(["--source", source, "--dest", "d", "--captions", captions, "--labels", "x"])
    with pytest.raises(SystemExit):
        parse_args(["--source", source, "--dest", "d", "--captions", captions,
                    "--text-encoder", "no-such-encoder"])  # fmt: skip


def test_standin_tokenizer_is_clips_with_a_character_vocabulary():
    """The real CLIPTokenizer pipeline: lower case, start/end tokens, padding to 77 with the
    end token, one token per character with CLIP's end-of-word marker on the last."""
    tokenizer = load_text_encoder(TEXT_ENCODER_STANDIN).tokenizer
    ids = tokenizer(["A Cat"], padding="max_length", max_length=77)["input_ids"][0]
    tokens = tokenizer.convert_ids_to_tokens(ids[:8])
    assert tokens == ["<|startoftext|>", "a</w>", "c", "a", "t</w>"] + ["<|endoftext|>"] * 3
    assert len(ids) == 77
    long_caption = " ".join(["word"] * 100)
    assert len(tokenizer([long_caption], truncation=True, max_length=77)["input_ids"][0]) == 77
