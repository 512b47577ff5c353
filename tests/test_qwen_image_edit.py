"""Qwen-Image-Edit's prompt encoding with condition images against transformers' Qwen2_5_VLForConditionalGeneration
(vision tower, image states scattered into the embeddings, 3-D positions from get_rope_index), from a pipeline folder."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from PIL import Image

from dsf.models.qwen_image import edit
from dsf.models.qwen_image.text import QWEN25_VL_7B_CONFIG, load_text_encoder
from dsf.models.qwen_image.tiny import TEXT_TINY, VISION_TINY, tiny_edit_pipeline, tiny_tokenizer
from dsf.models.qwen_image.training import SampleEncoder

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor  # noqa: E402
from tiny_flux import randomize  # noqa: E402

PROMPTS = ["a red dog on the wall", "a sign"]
IMAGES = [Image.new("RGB", (56, 56), (200, 30, 30)), Image.radial_gradient("L").convert("RGB").resize((84, 56))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    config = Qwen2_5_VLConfig(text_config=QWEN25_VL_7B_CONFIG | TEXT_TINY | {"vocab_size": len(tokenizer)},
                              vision_config=VISION_TINY, image_token_id=tokenizer.convert_tokens_to_ids(edit.IMAGE_PAD))
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    randomize(model, seed=3)
    root = tmp_path_factory.mktemp("edit") / "Qwen-Image-Edit-2509"
    model.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    Qwen2VLImageProcessor().save_pretrained(root / "processor")
    (root / "model_index.json").write_text("{}")
    return root, model, tokenizer


def _reference(model, tokenizer, prompts, images, max_sequence_length):
    """transformers' forward on the Edit template with each image's pad token expanded to its merged patch count."""
    processed = Qwen2VLImageProcessor()(images=images, return_tensors="pt")
    grid = processed["image_grid_thw"]
    prefix = "".join(f"Picture {i + 1}: <|vision_start|>" + edit.IMAGE_PAD * int(g.prod() // 4) + "<|vision_end|>"
                     for i, g in enumerate(grid))
    batch = tokenizer([edit.EDIT_TEMPLATE.format(prefix + p) for p in prompts], padding=True, return_tensors="pt")
    is_image = (batch["input_ids"] == model.config.image_token_id).int()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], mm_token_type_ids=is_image,
                    pixel_values=processed["pixel_values"].repeat(len(prompts), 1), image_grid_thw=grid.repeat(len(prompts), 1),
                    output_hidden_states=True)
    keep = batch["attention_mask"].bool()
    hidden = out.hidden_states[-1]
    states = [h[k][edit.EDIT_DROP:][:max_sequence_length] for h, k in zip(hidden, keep)]
    return states


def test_edit_prompt_matches_transformers_with_3d_positions(folder):
    root, model, tokenizer = folder
    encoder = load_text_encoder(root, max_sequence_length=512)
    vision = edit.load_vision(root)
    embeds, mask = edit.edit_prompt(encoder, vision, {"text_encoder": encoder.params, "vision": vision.params}, PROMPTS,
                                    IMAGES)
    expected = _reference(model, tokenizer, PROMPTS, IMAGES, 512)
    assert mask.sum(1).tolist() == [len(e) for e in expected]
    scale = max(float(e.abs().max()) for e in expected)
    for ours, valid, theirs in zip(embeds, mask, expected):
        assert float((ours[valid] - theirs).abs().max()) / scale <= 1e-5
        assert not ours[~valid].any()


def test_positions_matter_the_comparison_sees_them(folder):
    """1-D positions (what diffusers 0.42.1 gets from transformers 5.25, which infers no 3-D positions without
    mm_token_type_ids) give other states: the parity above checks the 3-D ones."""
    root, model, tokenizer = folder
    encoder = load_text_encoder(root, max_sequence_length=512)
    vision = edit.load_vision(root)
    flat = type(vision.positions)  # the positions' owner, its get_rope_index replaced by plain 1-D positions

    class OneD:
        def get_rope_index(self, ids, mm_token_type_ids, image_grid_thw, attention_mask):
            return torch.arange(ids.shape[1]).expand(3, *ids.shape), None

    one_d = edit.QwenVision(vision.params, vision.visual, OneD(), vision.image_processor, vision.image_token_id,
                            vision.frequencies)
    embeds, mask = edit.edit_prompt(encoder, one_d, {"text_encoder": encoder.params, "vision": vision.params}, PROMPTS, IMAGES)
    expected = _reference(model, tokenizer, PROMPTS, IMAGES, 512)
    assert flat.__name__ == "Qwen2_5_VLModel"
    assert float((embeds[0][mask[0]] - expected[0]).abs().max()) > 1e-3


def test_area_size_is_diffusers_calculate_dimensions():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    for width, height in [(1200, 800), (640, 1536), (1024, 1024), (333, 777)]:
        for area in (edit.CONDITION_AREA, edit.VAE_AREA):
            assert edit.area_size(area, width, height) == calculate_dimensions(area, width / height)


# ----------------------------------------------------------------------------- the Edit-2509/2511 pipeline

diffusers = pytest.importorskip("diffusers")
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus  # noqa: E402
from tiny_qwen_image import write_tiny_qwen_image_pipeline  # noqa: E402

CONDITION_AREA, VAE_AREA, HEIGHT, WIDTH = 56 * 56, 64 * 64, 64, 96


class Processor:
    """What Qwen2VLProcessor does for these pipelines (it needs torchvision, absent here): each ``<|image_pad|>``
    expanded to its image's merged patch count, the texts tokenized, the images through Qwen's image processor."""

    def __init__(self, tokenizer):
        self.tokenizer, self.image_processor = tokenizer, Qwen2VLImageProcessor()

    def __call__(self, text, images, padding, return_tensors):
        from transformers import BatchFeature

        processed = self.image_processor(images=images, return_tensors=return_tensors)
        counts = iter((processed["image_grid_thw"].prod(-1) // 4).tolist())
        expanded = []
        for t in text:
            parts = t.split(edit.IMAGE_PAD)
            expanded.append(parts[0] + "".join(edit.IMAGE_PAD * next(counts) + part for part in parts[1:]))
        batch = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**batch, **processed})


def with_3d_positions(model):
    """The text encoder given ``mm_token_type_ids``: diffusers 0.42.1 does not pass them, and transformers 5.25 then
    runs Qwen2.5-VL at 1-D positions; the model was trained, and dsf runs it, at 3-D ones."""
    forward = model.forward

    def forward_3d(input_ids=None, **kwargs):
        return forward(input_ids=input_ids, mm_token_type_ids=(input_ids == model.config.image_token_id).int(), **kwargs)

    model.forward = forward_3d
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["edit-2509", "edit-2511"])
def edit_repo(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("edit") / "Qwen-Image-Edit"
    pipe = write_tiny_qwen_image_pipeline(root, zero_cond_t=request.param)
    Qwen2VLImageProcessor().save_pretrained(root / "processor")
    reference = QwenImageEditPlusPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=with_3d_positions(pipe.text_encoder),
                                          tokenizer=pipe.tokenizer, processor=Processor(pipe.tokenizer),
                                          transformer=pipe.transformer)
    return root, reference


def test_edit_pipeline_matches_diffusers(edit_repo, monkeypatch):
    root, reference = edit_repo
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", CONDITION_AREA)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", VAE_AREA)
    ours = edit.load_edit_pipeline(root)
    ours = type(ours)(**{name: getattr(ours, name) for name in ours.__dataclass_fields__} | {
        "condition_area": CONDITION_AREA, "vae_area": VAE_AREA})
    assert ours.dit.config.zero_cond_t == reference.transformer.config.zero_cond_t
    assert (reference.prompt_template_encode, reference.prompt_template_encode_start_idx) == (edit.EDIT_TEMPLATE, edit.EDIT_DROP)
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(image=IMAGES, prompt="a red dog", negative_prompt=" ", true_cfg_scale=4.0, height=HEIGHT,
                             width=WIDTH, num_inference_steps=2, output_type="pt",
                             latents=QwenImageEditPlusPipeline._pack_latents(noise, 1, 16, HEIGHT // 8, WIDTH // 8)).images
        images = ours.decode(ours.params, ours.denoise(ours.params, "a red dog", images=IMAGES, noise=noise, height=HEIGHT,
                                                       width=WIDTH, num_inference_steps=2, progress=False)) / 2 + 0.5
    assert images.shape == expected.shape == (1, 3, HEIGHT, WIDTH)
    assert float((images - expected).abs().max()) <= 1e-4


def test_t2i_recipe_edits_with_condition_images(edit_repo, tmp_path):
    import importlib.util
    from pathlib import Path

    import numpy as np

    root, _ = edit_repo
    spec = importlib.util.spec_from_file_location("qwen_image_t2i", Path(__file__).resolve().parents[1] / "recipes" / "qwen_image_t2i.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    for index, image in enumerate(IMAGES):
        image.save(tmp_path / f"{index}.png")
    recipe.main(["--model_path", str(root), "--prompt", "a red dog", "--seed", "3", "--num_inference_steps", "2",
                 "--height", str(HEIGHT), "--width", str(WIDTH), "--dtype", "float32", "--device", "cpu",
                 "--edit_image", str(tmp_path / "0.png"), "--edit_image", str(tmp_path / "1.png"), "--out", str(tmp_path / "out.png")])
    pipe = edit.load_edit_pipeline(root)
    expected = pipe.generate(pipe.params, "a red dog", images=[Image.open(tmp_path / f"{i}.png").convert("RGB") for i in range(2)],
                             seed=3, height=HEIGHT, width=WIDTH, num_inference_steps=2, progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(expected))


def test_edit_lora_training_sees_the_condition_images(edit_repo, tmp_path, monkeypatch):
    import csv
    import dataclasses
    import importlib.util
    import json
    from pathlib import Path

    root, _ = edit_repo
    spec = importlib.util.spec_from_file_location("qwen_image_lora", Path(__file__).resolve().parents[1] / "recipes" / "qwen_image_lora.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    small = lambda *args, **kwargs: dataclasses.replace(edit.load_edit_pipeline(*args, **kwargs), condition_area=CONDITION_AREA,
                                                        vae_area=VAE_AREA)
    monkeypatch.setattr(recipe, "load_edit_pipeline", small)
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32), (200, 20, 20)).save(data / "target.png")
    for index, image in enumerate(IMAGES):
        image.save(data / f"{index}.png")

    def run(name, edit_images, *flags):
        (data / f"{name}.jsonl").write_text(json.dumps({"image": "target.png", "prompt": "make it red", "edit_image": edit_images}))
        recipe.main(["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / f"{name}.jsonl"),
                     "--model_path", str(root), "--height", "32", "--width", "32", "--max_sequence_length", "64",
                     "--lora_rank", "4", "--device", "cpu", "--max_steps", "1", "--output_path", str(tmp_path / name), *flags])
        with open(tmp_path / name / "log.csv", newline="") as file:
            return float(next(csv.DictReader(file))["loss"])

    first, second, both = (run(name, images, "--extra_inputs", "edit_image")
                           for name, images in [("first", ["0.png"]), ("second", ["1.png"]), ("both", ["0.png", "1.png"])])
    assert len({first, second, both}) == 3  # the condition images reach the DiT and the prompt encoding
    with pytest.raises(ValueError, match="a sample with 'edit_image' trains a Qwen-Image-Edit model"):
        run("plain", ["0.png"])

    # split training: the condition images encoded once into the cache, then trained on without the encoders
    recipe.main(["--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "both.jsonl"),
                 "--model_path", str(root), "--height", "32", "--width", "32", "--max_sequence_length", "64",
                 "--device", "cpu", "--extra_inputs", "edit_image", "--task", "sft:data_process",
                 "--output_path", str(tmp_path / "cache")])
    recipe.main(["--dataset_base_path", str(tmp_path / "cache"), "--model_path", str(root), "--max_sequence_length", "64",
                 "--lora_rank", "4", "--device", "cpu", "--max_steps", "1", "--task", "sft:train",
                 "--output_path", str(tmp_path / "split")])
    with open(tmp_path / "split" / "log.csv", newline="") as file:
        assert float(next(csv.DictReader(file))["loss"]) == both
    one_stage, split = (load_file(tmp_path / name / "step-1.safetensors") for name in ("both", "split"))
    assert one_stage.keys() == split.keys() and all(torch.equal(one_stage[k], split[k]) for k in one_stage)


def test_the_first_edit_models_pipeline_matches_diffusers(edit_repo):
    """Qwen/Qwen-Image-Edit: one image, its tokens inside the template, seen at about 1024² pixels by both encoders."""
    root, plus = edit_repo
    if plus.transformer.config.zero_cond_t:
        pytest.skip("the first Qwen-Image-Edit has no zero_cond_t")
    reference = QwenImageEditPipeline(scheduler=plus.scheduler, vae=plus.vae, text_encoder=plus.text_encoder,
                                      tokenizer=plus.tokenizer, processor=plus.processor, transformer=plus.transformer)
    assert (reference.prompt_template_encode, reference.prompt_template_encode_start_idx) == (edit.EDIT_SINGLE_TEMPLATE,
                                                                                              edit.EDIT_DROP)
    ours = edit.load_edit_pipeline(root, single=True)
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = reference(image=IMAGES[1], prompt="a red dog", negative_prompt=" ", true_cfg_scale=4.0, height=HEIGHT,
                             width=WIDTH, num_inference_steps=2, output_type="pt",
                             latents=QwenImageEditPipeline._pack_latents(noise, 1, 16, HEIGHT // 8, WIDTH // 8)).images
        images = ours.decode(ours.params, ours.denoise(ours.params, "a red dog", images=IMAGES[1:], noise=noise, height=HEIGHT,
                                                       width=WIDTH, num_inference_steps=2, progress=False)) / 2 + 0.5
    assert float((images - expected).abs().max()) <= 1e-4
    with pytest.raises(ValueError, match="takes 1 to 1 condition images, got 2"):
        ours.denoise(ours.params, "a red dog", images=IMAGES, height=HEIGHT, width=WIDTH, num_inference_steps=1)


def test_an_edit_training_sample_keeps_prompt_states_beyond_max_sequence_length(tmp_path):
    pipe = tiny_edit_pipeline()
    pipe = dataclasses.replace(pipe, text_encoder=dataclasses.replace(pipe.text_encoder, max_sequence_length=8))
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "condition.png")
    item = {"image": torch.zeros(3, 32, 32), "prompt": "make it blue", "edit_image": "condition.png"}
    encoded = SampleEncoder(pipe, str(tmp_path))(pipe.params, item)
    expected = pipe.encode_edit_prompts(pipe.params, ["make it blue"], [Image.open(tmp_path / "condition.png").convert("RGB")])
    assert expected["text_embeds"].shape[1] > 8  # the image's states alone outrun the prompt limit
    assert torch.equal(encoded["text_embeds"], expected["text_embeds"][0])
    assert bool(encoded["text_mask"].all())
