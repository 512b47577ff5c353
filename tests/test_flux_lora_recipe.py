"""recipes/flux_lora.py end to end on a tiny FLUX.1 written in BFL's layout and a folder of real digit images."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import dsf
from dsf.training.data import write_image_folder
from dsf.models import flux
from dsf.models.digits.training import digit_images
from dsf.models.flux.keys import DIT
from dsf.models.flux.pipeline import load_pipeline
from dsf.models.flux.training import recognize_tokenizers
from dsf.transforms import load_lora, lora, save_lora
from dsf.transforms.lora import linear_weight_shapes
from dsf.transforms.offload import count_transfers
from dsf.model_parts.lora_files import detect_lora_layout, read_lora
from dsf.weight import dense_tree
from tiny_flux import DIT_TINY, write_tiny_flux_bfl_files

ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny/FLUX.1-tiny"  # the hub repo id the tiny files are stored under
SIZE, TOKENS, ROWS = 32, 24, 6
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_recipe():
    spec = importlib.util.spec_from_file_location("flux_lora", ROOT / "recipes" / "flux_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flux_lora = load_recipe()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: thread start-up would dominate every op on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="module")
def tiny(hub) -> dict[str, Path]:
    return write_tiny_flux_bfl_files(hub / REPO)


def write_digits(folder: Path, rows: int, columns=lambda i: {}) -> Path:
    images, labels = digit_images(SIZE)
    rgb = [np.stack([image] * 3, axis=-1) for image in images[:rows]]
    return write_image_folder(folder, rgb, [{"prompt": f"a digit {WORDS[labels[i]]}", **columns(i)} for i in range(rows)])


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"), ROWS)


def model_paths(tiny, components=("dit", "vae", "clip", "t5")) -> str:
    return json.dumps([str(tiny[c]) for c in components])


def run(tiny, metadata: Path, output: Path, *flags: str, components=("dit", "vae", "clip", "t5")):
    argv = ["--dataset_base_path", str(metadata.parent), "--dataset_metadata_path", str(metadata),
            "--model_paths", model_paths(tiny, components),
            "--tokenizer_paths", f"{tiny['tokenizer_2']},{tiny['tokenizer']}",
            "--height", str(SIZE), "--width", str(SIZE), "--max_sequence_length", str(TOKENS),
            "--learning_rate", "1e-2", "--lora_rank", "4", "--max_steps", "3", "--output_path", str(output), *flags]
    return flux_lora.main(argv)


def log_rows(output: Path) -> list[dict]:
    with open(output / "log.csv", newline="") as file:
        return list(csv.DictReader(file))


def losses(output: Path) -> list[str]:
    return [row["loss"] for row in log_rows(output)]


def assert_same_file(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[k], second[k]) for k in first)


def base_dit(tiny):
    return flux.load_dit(tiny["dit"])


@pytest.fixture(scope="module")
def sft_run(tiny, digits, tmp_path_factory):
    output = tmp_path_factory.mktemp("sft")
    return output, run(tiny, digits, output, "--lora_layout", "diffusers")


# ----------------------------------------------------------------------------- LoRA into dsf and diffusers


def velocity_inputs() -> dict:
    gen = torch.Generator().manual_seed(7)
    return dict(latents=torch.randn(2, 16, 4, 4, generator=gen), timestep=torch.tensor([0.3, 0.9]),
                text_embeds=torch.randn(2, 5, 16, generator=gen), pooled_embeds=torch.randn(2, 16, generator=gen),
                guidance=torch.tensor([3.5, 1.0]))


def diffusers_velocity(tiny, lora_path: Path, inputs: dict) -> torch.Tensor:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    model = FluxTransformer2DModel(**DIT_TINY, guidance_embeds=True).eval()
    model.load_state_dict(DIT.to_ours(load_file(tiny["dit"]))[0])
    state_dict, alphas = FluxPipeline.lora_state_dict(str(lora_path), return_alphas=True)
    model.load_lora_adapter(state_dict, network_alphas=alphas, prefix="transformer", adapter_name="trained")
    latents = inputs["latents"]
    b, c, h, w = latents.shape
    text = inputs["text_embeds"]
    with torch.no_grad():
        out = model(hidden_states=FluxPipeline._pack_latents(latents, b, c, h, w), encoder_hidden_states=text,
                    pooled_projections=inputs["pooled_embeds"], timestep=inputs["timestep"],
                    img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype),
                    txt_ids=torch.zeros(text.shape[1], 3), guidance=inputs["guidance"], return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, vae_scale_factor=8)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
@pytest.mark.parametrize("layout, targets", [
    ("diffusers", None),
    # diffusers splits a kohya linear1 at FLUX.1-dev's sizes, not the tiny ones: leave it out for the comparison
    ("kohya", "img_attn.qkv,txt_attn.proj,img_mlp.0,txt_mod.lin,linear2,modulation.lin"),
])
def test_sft_lora_loads_into_dsf_and_diffusers_with_the_same_output(tiny, digits, sft_run, tmp_path, layout, targets):
    if layout == "diffusers":
        output, trained = sft_run
    else:
        output, trained = tmp_path, run(tiny, digits, tmp_path, "--lora_layout", layout, "--lora_target_modules", targets)
    assert len(losses(output)) == 3 and all(math.isfinite(float(loss)) for loss in losses(output))
    path = output / "step-3.safetensors"
    assert detect_lora_layout(load_file(path)) == layout
    dit, base = base_dit(tiny)
    inputs = velocity_inputs()
    with torch.no_grad():
        ours = dit(load_lora(base, path), **inputs)
        in_training = dit(trained["dit"], **inputs)
        plain = dit(base, **inputs)
    reference = diffusers_velocity(tiny, path, inputs)
    assert relative_error(ours, in_training) <= 1e-6
    assert relative_error(ours, reference) <= 1e-4
    assert relative_error(plain, reference) > 1e-2


# ----------------------------------------------------------------------------- what trains and how it is stored


def test_full_fine_tuning_saves_the_whole_dit(tiny, digits, tmp_path):
    trained = run(tiny, digits, tmp_path, "--trainable_models", "dit", "--max_steps", "2", "--learning_rate", "1e-3")
    saved = tmp_path / "step-2.safetensors"
    dit, reloaded = flux.load_dit(saved, config={"axes_dims_rope": list(DIT_TINY["axes_dims_rope"])})
    base_model, base = base_dit(tiny)
    assert dit.config == base_model.config
    flat_base, flat_saved = dsf.tree.flatten_dict(base), dsf.tree.flatten_dict(reloaded)
    assert sorted(flat_saved) == sorted(flat_base)
    assert all(not torch.equal(flat_saved[k], flat_base[k]) for k in ("x_embedder.weight", "proj_out.weight"))
    trained_flat = dsf.tree.flatten_dict(dense_tree(trained["dit"]))
    assert all(torch.equal(flat_saved[k], trained_flat[k]) for k in flat_saved)
    with pytest.raises(ValueError, match="full fine-tuning cannot train 'dit/"):
        run(tiny, digits, tmp_path / "fp8", "--trainable_models", "dit", "--fp8_models", "dit")


def test_lora_over_fp8_models(tiny, digits, sft_run, tmp_path):
    trained = run(tiny, digits, tmp_path, "--fp8_models", "dit,t5,clip")
    stored = trained["dit"]["transformer_blocks"][0]["attn"]["to_q"]["weight"]
    assert stored.data.dtype == torch.float8_e4m3fn and "adapt" in stored.stages
    assert trained["t5"]["encoder"]["block"][0]["layer"][0]["SelfAttention"]["q"]["weight"].data.dtype == torch.float8_e4m3fn
    first, reference = float(losses(tmp_path)[0]), float(losses(sft_run[0])[0])
    assert first != reference and first == pytest.approx(reference, rel=0.05)
    assert detect_lora_layout(load_file(tmp_path / "step-3.safetensors")) == "diffusers"


def test_block_offload_of_the_dit_and_t5_trains_the_same_lora(tiny, digits, sft_run, tmp_path):
    """--offload_models streams the DiT and T5 from the CPU one block at a time: the same numbers, bit for bit."""
    with count_transfers() as moved:
        run(tiny, digits, tmp_path, "--offload_models", "dit,t5")
    assert moved.blocks, "nothing was streamed"
    offloaded, resident = (load_file(folder / "step-3.safetensors") for folder in (tmp_path, sft_run[0]))
    assert offloaded.keys() == resident.keys() and all(torch.equal(offloaded[k], resident[k]) for k in resident)


@pytest.mark.parametrize("flag, hook", [
    ("--use_gradient_checkpointing", "torch.utils.checkpoint.checkpoint"),
    ("--use_gradient_checkpointing_offload", "torch.autograd.graph.save_on_cpu"),
])
def test_gradient_checkpointing_keeps_the_losses(tiny, digits, sft_run, tmp_path, monkeypatch, flag, hook):
    module_name, _, name = hook.rpartition(".")
    module = importlib.import_module(module_name)
    original, calls = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or original(*a, **k))
    run(tiny, digits, tmp_path, flag)
    assert calls, f"{flag} did not reach {hook}"
    assert losses(tmp_path) == losses(sft_run[0])


def test_preset_lora_is_merged_into_the_base(tiny, digits, tmp_path):
    _, base = base_dit(tiny)
    preset = lora(rank=2, alpha=3, targets="img_attn.qkv,linear2").init(base, dsf.random.key(5))
    preset = dsf.tree.map_with_path(lambda p, x: torch.randn_like(x) * 0.1 if p.endswith("/up") else x, preset)
    save_lora(preset, tmp_path / "preset.safetensors", "kohya")
    trained = run(tiny, digits, tmp_path / "out", "--preset_lora_path", str(tmp_path / "preset.safetensors"),
                  "--max_steps", "1")
    merged = {path: w.data if isinstance(w, dsf.Weight) else w
              for path, w in dsf.tree.leaves_with_paths(trained["dit"], is_leaf=lambda x: isinstance(x, dsf.Weight))}
    deltas = read_lora(tmp_path / "preset.safetensors", linear_weight_shapes(base))
    assert len(deltas) == 4  # to_q, to_k, to_v of the double block and the single block's proj_out
    for path, original in dsf.tree.leaves_with_paths(base):
        if path in deltas:
            f = deltas[path]
            torch.testing.assert_close(merged[path], original + f.scale * (f.up @ f.down), rtol=0, atol=1e-6)
            assert not torch.equal(merged[path], original)
        else:
            assert torch.equal(merged[path], original), path
    saved = read_lora(tmp_path / "out" / "step-1.safetensors", linear_weight_shapes(base))
    assert len(saved) == 20  # the trained LoRA alone, on DiffSynth's targets


def test_lora_checkpoint_continues_a_lora_file(tiny, digits, sft_run, tmp_path):
    saved = sft_run[0] / "step-3.safetensors"
    run(tiny, digits, tmp_path, "--lora_checkpoint", str(saved), "--learning_rate", "0", "--max_steps", "1")
    assert_same_file(tmp_path / "step-1.safetensors", saved)
    assert losses(tmp_path)[0] != losses(sft_run[0])[0]  # a fresh LoRA would start from the base model's loss


# ----------------------------------------------------------------------------- split training, distillation, resume


def test_split_training_gives_the_unsplit_losses(tiny, digits, sft_run, tmp_path):
    cache = run(tiny, digits, tmp_path / "cache", "--task", "sft:data_process", components=("vae", "clip", "t5"))
    assert sorted(p.name for p in cache.iterdir()) == ["index.json", "shard-00000.safetensors"]
    argv = ["--task", "sft:train", "--dataset_base_path", str(cache), "--model_paths", model_paths(tiny, ("dit",)),
            "--learning_rate", "1e-2", "--lora_rank", "4", "--max_steps", "3", "--lora_layout", "diffusers",
            "--output_path", str(tmp_path / "train")]
    flux_lora.main(argv)
    unsplit, split = log_rows(sft_run[0]), log_rows(tmp_path / "train")
    assert [(r["loss"], r["grad_norm"]) for r in split] == [(r["loss"], r["grad_norm"]) for r in unsplit]
    assert_same_file(tmp_path / "train" / "step-3.safetensors", sft_run[0] / "step-3.safetensors")


def test_direct_distill_matches_the_student_sampler(tiny, tmp_path):
    columns = [{"seed": 11, "num_inference_steps": 2, "cfg_scale": 1}, {"seed": 12, "num_inference_steps": 3, "cfg_scale": 1}]
    metadata = write_digits(tmp_path / "teacher", 2, lambda i: columns[i])
    run(tiny, metadata, tmp_path / "out", "--task", "direct_distill", "--batch_size", "2", "--max_steps", "2")
    first_loss = float(losses(tmp_path / "out")[0])
    assert first_loss != float(losses(tmp_path / "out")[1])

    pipe = load_pipeline(dit=tiny["dit"], vae=tiny["vae"], text_encoder=tiny["clip"], text_encoder_2=tiny["t5"],
                         tokenizer=tiny["tokenizer"], tokenizer_2=tiny["tokenizer_2"], max_sequence_length=TOKENS)
    images, labels = digit_images(SIZE)
    errors = []
    with torch.no_grad():
        for i, column in enumerate(columns):
            image = torch.from_numpy(np.stack([images[i]] * 3)).float()[None] / 127.5 - 1
            target = pipe.vae.encode(pipe.vae_params, image)
            student = pipe.denoise(pipe.params, f"a digit {WORDS[labels[i]]}", seed=column["seed"], height=SIZE, width=SIZE,
                                   num_inference_steps=column["num_inference_steps"], embedded_guidance=1.0, progress=False)
            errors.append((student - target).square().mean())
    assert first_loss == pytest.approx(float(sum(errors) / 2), rel=1e-5)
    with pytest.raises(ValueError, match=r"teacher images' own size.*\(32x32\) would become 48x48"):
        run(tiny, metadata, tmp_path / "resized", "--task", "direct_distill", "--height", "48", "--width", "48")


def test_resume_continues_as_if_never_stopped(tiny, digits, sft_run, tmp_path):
    run(tiny, digits, tmp_path, "--lora_layout", "diffusers", "--max_steps", "2")
    run(tiny, digits, tmp_path, "--lora_layout", "diffusers", "--max_steps", "3", "--resume")
    assert losses(tmp_path) == losses(sft_run[0])
    assert_same_file(tmp_path / "step-3.safetensors", sft_run[0] / "step-3.safetensors")


# ----------------------------------------------------------------------------- recognizing files


def test_a_missing_component_is_named_with_what_was_found(tiny, digits, tmp_path):
    found = r"found DiT \(flux1-tiny.safetensors\), CLIP \(model.safetensors\), T5 \(model.safetensors\)"
    with pytest.raises(ValueError, match=rf"no VAE among --model_paths/--model_id_with_origin_paths: {found}"):
        run(tiny, digits, tmp_path, components=("t5", "dit", "clip"))
    with pytest.raises(ValueError, match=r"two DiTs among the model files"):
        run(tiny, digits, tmp_path, components=("dit", "vae", "clip", "t5", "dit"))
    save_file({"conv.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r"other.safetensors holds no FLUX.1 component.*\['conv.weight'\]"):
        flux_lora.main(["--dataset_base_path", str(digits.parent), "--dataset_metadata_path", str(digits),
                        "--model_paths", json.dumps([str(tmp_path / "other.safetensors")])])


def test_tokenizers_are_recognized_by_their_files(tiny, tmp_path):
    assert recognize_tokenizers([tiny["tokenizer_2"], tiny["tokenizer"]]) == {"t5": tiny["tokenizer_2"], "clip": tiny["tokenizer"]}
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=r"neither a CLIP tokenizer .* nor a T5 tokenizer .*\['notes.txt'\]"):
        recognize_tokenizers([tiny["tokenizer"], tmp_path])
    with pytest.raises(ValueError, match="no T5 tokenizer among the tokenizer folders"):
        recognize_tokenizers([tiny["tokenizer"]])


def test_hub_models_with_their_tokenizers(tiny, digits, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("DSF_MODEL_BASE_PATH", str(hub))
    monkeypatch.setenv("DSF_SKIP_DOWNLOAD", "1")
    origins = ",".join(f"{REPO}:{folder}/*.safetensors" for folder in ("t5", "dit", "clip", "vae"))
    flux_lora.main(["--dataset_base_path", str(digits.parent), "--dataset_metadata_path", str(digits),
                    "--model_id_with_origin_paths", origins, "--height", str(SIZE), "--width", str(SIZE),
                    "--max_sequence_length", str(TOKENS), "--lora_rank", "4", "--max_steps", "1",
                    "--output_path", str(tmp_path)])
    assert len(losses(tmp_path)) == 1 and (tmp_path / "step-1.safetensors").is_file()


def test_sharded_runs_load_the_dit_to_the_cpu_so_only_shards_reach_a_gpu():
    from argparse import Namespace

    from dsf.cli.lora_recipe import dit_load_device, load_devices
    from dsf.training.distributed import World

    gpu = torch.device("cuda", 0)
    assert dit_load_device(Namespace(shard=True), World(rank=1, size=8), gpu) == torch.device("cpu")
    assert dit_load_device(Namespace(shard=True), World(), gpu) == gpu  # one process: nothing to split
    assert dit_load_device(Namespace(shard=False), World(rank=1, size=8), gpu) == gpu
    chosen = load_devices(Namespace(shard=True, offload_models="t5"), ("dit", "vae", "t5"), (), World(rank=1, size=8), gpu)
    assert chosen == {"dit": torch.device("cpu"), "vae": gpu, "t5": "cpu"}
