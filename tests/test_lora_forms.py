"""LoRA files in the forms trainers write them: each hand-written in its form loads, merges and clears exactly, and
every form we write is read by ComfyUI's key rules (written here as data, with where they come from)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

import dsf
from dsf.models import flux, wan
from dsf.models.flux.keys import ours_to_bfl
from dsf.models.wan.keys import ours_to_original
from dsf.model_parts.lora_files import detect_lora_layout
from dsf.transforms.lora import clear_lora, load_lora, merge_lora, param_shapes, save_lora
from dsf.weight import dense_tree

HIDDEN = 32
CFG = flux.FluxConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=2,
                      num_single_blocks=2, context_dim=32, pooled_dim=16)
RANK = 4

# ----------------------------------------------------------------------------- ComfyUI's key rules, as data
# comfy/lora.py, model_lora_keys_unet: for every key K of ComfyUI's FLUX.1 state dict (BFL names):
#   "lora_unet_" + K[:-len(".weight")].replace(".", "_") and "diffusion_model." + K[:-len(".weight")] for weights,
#   "diffusion_model." + K for other tensors (norm scales);
# and for every diffusers name D of comfy/utils.py flux_to_diffusers ("Diffusers lora Flux"):
#   "transformer." + D, "lycoris_" + D with "_", "lora_transformer_" + D with "_" (OneTrainer),
# each naming a BFL weight, a row range of one ((0, start, length) offsets in units of hidden_size here),
# or a weight whose change is applied with swap_scale_shift.
COMFY_DOUBLE = {  # flux_to_diffusers, double blocks: diffusers module -> (BFL module, first row / hidden, rows / hidden)
    "attn.to_q": ("img_attn.qkv", 0, 1), "attn.to_k": ("img_attn.qkv", 1, 1), "attn.to_v": ("img_attn.qkv", 2, 1),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 1), "attn.add_k_proj": ("txt_attn.qkv", 1, 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 1),
    "attn.to_out.0": ("img_attn.proj",), "norm1.linear": ("img_mod.lin",), "norm1_context.linear": ("txt_mod.lin",),
    "attn.to_add_out": ("txt_attn.proj",), "ff.net.0.proj": ("img_mlp.0",), "ff.net.2": ("img_mlp.2",),
    "ff_context.net.0.proj": ("txt_mlp.0",), "ff_context.net.2": ("txt_mlp.2",),
}
COMFY_SINGLE = {  # flux_to_diffusers, single blocks (proj_mlp: rows 3·hidden to 7·hidden, FLUX's mlp ratio 4)
    "attn.to_q": ("linear1", 0, 1), "attn.to_k": ("linear1", 1, 1), "attn.to_v": ("linear1", 2, 1),
    "proj_mlp": ("linear1", 3, 4), "norm.linear": ("modulation.lin",), "proj_out": ("linear2",),
}
COMFY_GLOBAL = {  # flux_to_diffusers, MAP_BASIC (norm_out.linear with swap_scale_shift)
    "x_embedder": ("img_in",), "context_embedder": ("txt_in",), "proj_out": ("final_layer.linear",),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer",),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer",),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer",),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer",),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer",),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer",),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", "swap"),
}
# comfy/weight_adapter/lora.py (LoRAAdapter.load): up/down key pairs it reads; comfy/lora.py load_lora: ".alpha",
# ".diff" (added to the weight), ".diff_b" (added to the bias); scale = alpha / rows of down, 1 without alpha.
COMFY_PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"),
               (".lora_B.default.weight", ".lora_A.default.weight"))


def _comfy_targets() -> dict[str, tuple[str, tuple[int, int] | None, bool]]:
    """``{diffusers module: (BFL weight, row range or None, swap)}`` of flux_to_diffusers for CFG."""
    targets = {}
    for scope, bfl, table, count in (("transformer_blocks", "double_blocks", COMFY_DOUBLE, CFG.num_double_blocks),
                                     ("single_transformer_blocks", "single_blocks", COMFY_SINGLE, CFG.num_single_blocks)):
        for i in range(count):
            for module, (native, *rows) in table.items():
                span = (rows[0] * HIDDEN, rows[1] * HIDDEN) if rows else None
                targets[f"{scope}.{i}.{module}"] = (f"{bfl}.{i}.{native}.weight", span, False)
    for module, (native, *swap) in COMFY_GLOBAL.items():
        targets[module] = (f"{native}.weight", None, bool(swap))
    return targets


def comfy_key_map(bfl_keys) -> dict[str, tuple[str, tuple[int, int] | None, bool]]:
    key_map = {}
    for key in bfl_keys:
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            key_map["lora_unet_" + module.replace(".", "_")] = (key, None, False)
            key_map["diffusion_model." + module] = (key, None, False)
        else:
            key_map["diffusion_model." + key] = (key, None, False)
    for module, target in _comfy_targets().items():
        for name in ("transformer." + module, "lycoris_" + module.replace(".", "_"),
                     "lora_transformer_" + module.replace(".", "_")):
            key_map[name] = target
    return key_map


def _swap(tensor):
    shift, scale = tensor.chunk(2, dim=0)
    return torch.cat([scale, shift])


def comfy_patch(bfl: dict, file: dict) -> tuple[dict, set]:
    """ComfyUI's patched weights (by its key rules above) and the file keys it leaves unloaded."""
    patched, loaded = {k: v.clone() for k, v in bfl.items()}, set()
    for x, (key, rows, swap) in comfy_key_map(bfl).items():
        target = patched[key] if rows is None else patched[key][rows[0]: rows[0] + rows[1]]
        alpha = file.get(x + ".alpha")
        for up_suffix, down_suffix in COMFY_PAIRS:
            if x + up_suffix in file:
                up, down = file[x + up_suffix], file[x + down_suffix]
                scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
                change = scale * (up @ down)
                target += _swap(change) if swap else change
                loaded |= {x + up_suffix, x + down_suffix} | ({x + ".alpha"} if alpha is not None else set())
        if x + ".diff" in file:
            target += file[x + ".diff"]
            loaded.add(x + ".diff")
        if x + ".diff_b" in file:
            patched[key.removesuffix(".weight") + ".bias"] += file[x + ".diff_b"]
            loaded.add(x + ".diff_b")
    return patched, set(file) - loaded


# ----------------------------------------------------------------------------- files in each form


@pytest.fixture(scope="module")
def base():
    return flux.init_dit(CFG, dsf.random.key(0))


def _bfl_factors(base, seed: int) -> dict:
    """Random factors and alphas on every 2-D BFL weight: ``{BFL module: (down, up, alpha)}``."""
    gen = torch.Generator().manual_seed(seed)
    return {
        key.removesuffix(".weight"): (torch.randn(RANK, w.shape[1], generator=gen), torch.randn(w.shape[0], RANK, generator=gen),
                                      torch.tensor(float(1 + i % 3)))
        for i, (key, w) in enumerate(ours_to_bfl(base).items()) if w.ndim == 2
    }


def _ours_factors(base, seed: int) -> dict:
    """Random factors and alphas on every 2-D weight, named by our (diffusers) modules."""
    gen = torch.Generator().manual_seed(seed)
    return {
        key.removesuffix(".weight"): (torch.randn(RANK, w.shape[1], generator=gen), torch.randn(w.shape[0], RANK, generator=gen),
                                      torch.tensor(float(1 + i % 3)))
        for i, (key, w) in enumerate(dsf.tree.flatten_dict(base).items()) if w.ndim == 2
    }


def _file(factors: dict, prefix: str, down: str, up: str, underscores: bool = False, alpha: bool = True) -> dict:
    tensors = {}
    for module, (d, u, a) in factors.items():
        name = prefix + (module.replace(".", "_") if underscores else module)
        tensors[name + down], tensors[name + up] = d, u
        if alpha:
            tensors[name + ".alpha"] = a
    return tensors


# DiffSynth-Studio's FluxDiT names of BFL modules (diffsynth/utils/state_dict_converters/flux_dit.py)
DIFFSYNTH_FLUX = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "final_proj_out",
                  "final_layer.adaLN_modulation.1": "final_norm_out.linear",
                  "time_in.in_layer": "time_embedder.timestep_embedder.0", "time_in.out_layer": "time_embedder.timestep_embedder.2",
                  "guidance_in.in_layer": "guidance_embedder.timestep_embedder.0",
                  "guidance_in.out_layer": "guidance_embedder.timestep_embedder.2",
                  "vector_in.in_layer": "pooled_text_embedder.0", "vector_in.out_layer": "pooled_text_embedder.2"}
DIFFSYNTH_FLUX_DOUBLE = {"img_mod.lin": "norm1_a.linear", "txt_mod.lin": "norm1_b.linear", "img_attn.qkv": "attn.a_to_qkv",
                         "txt_attn.qkv": "attn.b_to_qkv", "img_attn.proj": "attn.a_to_out", "txt_attn.proj": "attn.b_to_out",
                         "img_mlp.0": "ff_a.0", "img_mlp.2": "ff_a.2", "txt_mlp.0": "ff_b.0", "txt_mlp.2": "ff_b.2"}
DIFFSYNTH_FLUX_SINGLE = {"linear1": "to_qkv_mlp", "linear2": "proj_out", "modulation.lin": "norm.linear"}


def _diffsynth_name(bfl_module: str) -> str:
    scope, _, rest = bfl_module.partition(".")
    if scope in ("double_blocks", "single_blocks"):
        index, _, local = rest.partition(".")
        table = DIFFSYNTH_FLUX_DOUBLE if scope == "double_blocks" else DIFFSYNTH_FLUX_SINGLE
        return f"{'blocks' if scope == 'double_blocks' else 'single_blocks'}.{index}.{table[local]}"
    return DIFFSYNTH_FLUX[bfl_module]


def _as_comfy(factors: dict, alpha: bool = True) -> dict:
    return _file(factors, "diffusion_model.", ".lora_down.weight", ".lora_up.weight", alpha=alpha)


FORMS = {  # form -> (file, the same change as ComfyUI reads it (None: the file itself), form detected)
    "kohya": lambda b, o: (_file(b, "lora_unet_", ".lora_down.weight", ".lora_up.weight", underscores=True), None),
    "comfyui": lambda b, o: (_as_comfy(b), None),
    "bare BFL": lambda b, o: (_file(b, "", ".lora_A.weight", ".lora_B.weight"), _as_comfy(b)),
    "diffusers": lambda b, o: (_file(o, "transformer.", ".lora_A.weight", ".lora_B.weight"), None),
    "PEFT": lambda b, o: (_file(o, "", ".lora_A.default.weight", ".lora_B.default.weight"),
                          _file(o, "transformer.", ".lora_A.weight", ".lora_B.weight")),
    "OneTrainer": lambda b, o: (_file(o, "lora_transformer_", ".lora_down.weight", ".lora_up.weight", underscores=True), None),
    "LyCORIS": lambda b, o: (_file(o, "lycoris_", ".lora_down.weight", ".lora_up.weight", underscores=True), None),
    "DiffSynth-Studio": lambda b, o: (
        _file({_diffsynth_name(m): f for m, f in b.items()}, "", ".lora_A.default.weight", ".lora_B.default.weight", alpha=False),
        _as_comfy(b, alpha=False)),
}
DETECTED = {"kohya": "kohya", "comfyui": "comfyui", "bare BFL": "native", "diffusers": "diffusers", "PEFT": "diffusers",
            "OneTrainer": "onetrainer", "LyCORIS": "lycoris", "DiffSynth-Studio": "diffsynth"}


def _merged_bfl(params) -> dict:
    return ours_to_bfl(dense_tree(merge_lora(params)))


def _assert_cleared(loaded, base) -> None:
    cleared, original = dsf.tree.flatten_dict(clear_lora(loaded)), dsf.tree.flatten_dict(base)
    assert sorted(cleared) == sorted(original)
    assert all(type(cleared[k]) is torch.Tensor and torch.equal(cleared[k], original[k]) for k in original)


def _assert_close(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-5), key


@pytest.mark.parametrize("form", FORMS)
def test_each_form_loads_merges_and_clears_as_comfyui_applies_it(form, base):
    file, as_comfy = FORMS[form](_bfl_factors(base, seed=1), _ours_factors(base, seed=2))
    assert detect_lora_layout(file, param_shapes(base)) == DETECTED[form]
    expected, unloaded = comfy_patch(ours_to_bfl(base), file if as_comfy is None else as_comfy)
    assert not unloaded
    loaded = load_lora(base, file, name="x")
    _assert_close(_merged_bfl(loaded), expected)
    assert sum(not torch.equal(expected[k], v) for k, v in ours_to_bfl(base).items()) >= 20  # the change is not nil
    _assert_cleared(loaded, base)


def _training_node_file(base, seed: int) -> dict:
    """What ComfyUI's TrainLoraNode saves (comfy_extras/nodes_train.py): for each module with a weight,
    ``lora_up``/``lora_down``/``alpha`` (2-D) or ``.diff`` (other weights), and ``.diff_b`` for its bias."""
    gen = torch.Generator().manual_seed(seed)
    tensors = _as_comfy(_bfl_factors(base, seed))
    for key, tensor in ours_to_bfl(base).items():
        module, _, leaf = key.rpartition(".")
        if leaf == "bias":
            tensors[f"diffusion_model.{module}.diff_b"] = torch.randn(tensor.shape, generator=gen)
        elif tensor.ndim == 1:  # norm scales: ComfyUI names them by the tensor, "<key>.diff"
            tensors[f"diffusion_model.{key}.diff"] = torch.randn(tensor.shape, generator=gen)
    whole = "diffusion_model.double_blocks.1.img_mlp.2"  # a full-weight difference instead of factors
    for suffix in (".lora_up.weight", ".lora_down.weight", ".alpha"):
        del tensors[whole + suffix]
    tensors[whole + ".diff"] = torch.randn(ours_to_bfl(base)["double_blocks.1.img_mlp.2.weight"].shape, generator=gen)
    return tensors


def test_comfyui_training_node_files_with_dense_differences(base, tmp_path):
    file = _training_node_file(base, seed=3)
    assert any(k.endswith(".diff_b") for k in file) and any(k.endswith("query_norm.scale.diff") for k in file)
    expected, unloaded = comfy_patch(ours_to_bfl(base), file)
    assert not unloaded
    loaded = load_lora(base, file, scale=1.0, name="node")
    _assert_close(_merged_bfl(loaded), expected)
    _assert_cleared(loaded, base)
    # hot (added at use) and merged give the same model
    dit, inputs = flux.FluxDiT(CFG), _inputs()
    with torch.no_grad():
        hot, cold, plain = (dit(p, **inputs) for p in (loaded, merge_lora(loaded), base))
    assert _relative(hot, cold) <= 1e-5 and _relative(plain, hot) > 1e-2
    # written back in ComfyUI's form, ComfyUI reads every key to the same weights
    save_lora(loaded, tmp_path / "node.safetensors", "comfyui", name="node")
    again, unloaded = comfy_patch(ours_to_bfl(base), load_file(tmp_path / "node.safetensors"))
    assert not unloaded
    _assert_close(again, expected)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _inputs() -> dict:
    gen = torch.Generator().manual_seed(7)
    return dict(latents=torch.randn(1, 16, 4, 4, generator=gen), timestep=torch.tensor([0.4]),
                text_embeds=torch.randn(1, 3, 32, generator=gen), pooled_embeds=torch.randn(1, 16, generator=gen),
                guidance=torch.tensor([3.5]))


@pytest.mark.parametrize("layout", ["comfyui", "kohya", "diffusers"])
def test_every_written_form_is_read_by_comfyui_in_full(layout, base, tmp_path):
    """Per-module alphas (1, 2, 3) make fused modules stack their parts' ranks: still every key loads, exactly."""
    file = _file(_ours_factors(base, seed=5), "transformer.", ".lora_A.weight", ".lora_B.weight")
    for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha"):  # a fused part without a LoRA
        del file["transformer.single_transformer_blocks.1.attn.to_k" + suffix]
    loaded = load_lora(base, file, name="x")
    save_lora(loaded, tmp_path / "x.safetensors", layout, name="x")
    written = load_file(tmp_path / "x.safetensors")
    patched, unloaded = comfy_patch(ours_to_bfl(base), written)
    assert not unloaded
    _assert_close(patched, _merged_bfl(loaded))


# ----------------------------------------------------------------------------- text encoders


def _text_encoder_file(pipe, seed: int) -> dict:
    """kohya's CLIP-L (lora_te1_) and T5 (lora_te3_) keys, OneTrainer's T5 (lora_te2_) keys, and one DiT module."""
    gen = torch.Generator().manual_seed(seed)
    names = {"lora_te1_text_model_encoder_layers_0_mlp_fc1": (32, 16), "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (16, 16),
             "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (16, 16),
             "lora_te2_encoder_block_0_layer_1_DenseReluDense_wo": (16, 32), "lora_unet_img_in": (32, 64)}
    tensors = {}
    for name, (out, inp) in names.items():
        tensors[name + ".lora_down.weight"] = torch.randn(2, inp, generator=gen)
        tensors[name + ".lora_up.weight"] = torch.randn(out, 2, generator=gen)
        tensors[name + ".alpha"] = torch.tensor(1.0)
    return tensors


def test_text_encoder_keys_apply_to_a_pipelines_text_encoders(tmp_path):
    from dsf.models.flux.tiny import tiny_pipeline

    pipe = tiny_pipeline()
    params = pipe.params
    file = _text_encoder_file(pipe, seed=6)
    loaded = load_lora(params, file, name="te")
    merged = dense_tree(merge_lora(loaded))
    for name, path in (("lora_te1_text_model_encoder_layers_0_mlp_fc1", "clip/text_model/encoder/layers/0/mlp/fc1/weight"),
                       ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "t5/encoder/block/0/layer/0/SelfAttention/q/weight"),
                       ("lora_te2_encoder_block_0_layer_1_DenseReluDense_wo", "t5/encoder/block/0/layer/1/DenseReluDense/wo/weight"),
                       ("lora_unet_img_in", "dit/x_embedder/weight")):
        by_hand = dsf.tree.flatten_dict(params, sep="/")[path] + 0.5 * file[name + ".lora_up.weight"] @ file[name + ".lora_down.weight"]
        assert torch.allclose(dsf.tree.flatten_dict(merged, sep="/")[path], by_hand, rtol=1e-6, atol=1e-6), path
    with torch.no_grad():
        hot, cold, plain = (pipe.encode_prompts(p, ["abc"])["text_embeds"] for p in (loaded, merged, params))
    assert _relative(hot, cold) <= 1e-5 and _relative(plain, hot) > 1e-3
    _assert_cleared(loaded, params)


def test_text_encoder_keys_without_text_encoders_are_skipped_with_one_warning(base):
    from dsf.models.flux.tiny import tiny_pipeline

    file = _text_encoder_file(tiny_pipeline(), seed=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_lora(base, file, name="te")
    assert [str(w.message)[:42] for w in caught] == ["skipped 4 text-encoder LoRA modules (e.g. "]
    assert sorted(path for path, w in dsf.tree.leaves_with_paths(loaded, is_leaf=lambda x: isinstance(x, dsf.Weight))
                  if isinstance(w, dsf.Weight)) == ["x_embedder/weight"]


# ----------------------------------------------------------------------------- Wan


WAN_CFG = wan.WanConfig(num_heads=1, head_dim=12, ffn_dim=8, num_layers=2, text_dim=8)


def test_wan_diffsynth_and_comfyui_files_use_the_original_names(tmp_path):
    """DiffSynth-Studio's WanModel names are Wan's original ones (its checkpoints load without a converter), as are
    ComfyUI's (``diffusion_model.`` + the original key) and musubi-tuner's (``lora_unet_``)."""
    base = wan.init_dit(WAN_CFG, dsf.random.key(0))
    original = ours_to_original(base)
    gen = torch.Generator().manual_seed(8)
    modules = ["blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.0", "head.head", "text_embedding.0"]
    file = {}
    for module in modules:
        out, inp = original[module + ".weight"].shape
        file[module + ".lora_A.default.weight"] = torch.randn(RANK, inp, generator=gen)
        file[module + ".lora_B.default.weight"] = torch.randn(out, RANK, generator=gen)
    assert detect_lora_layout(file, param_shapes(base)) == "diffsynth"
    loaded = load_lora(base, file, name="ds")
    merged = ours_to_original(dense_tree(merge_lora(loaded)))
    for key, weight in original.items():
        module = key.removesuffix(".weight")
        by_hand = weight + file[module + ".lora_B.default.weight"] @ file[module + ".lora_A.default.weight"] \
            if module in modules and key.endswith(".weight") else weight
        assert torch.allclose(merged[key], by_hand, rtol=1e-6, atol=1e-6), key
    _assert_cleared(loaded, base)
    for layout, prefix in (("comfyui", "diffusion_model."), ("kohya", "lora_unet_"), ("diffsynth", "")):
        save_lora(loaded, tmp_path / f"{layout}.safetensors", layout, name="ds")
        keys = load_file(tmp_path / f"{layout}.safetensors")
        names = {prefix + (m.replace(".", "_") if layout == "kohya" else m) for m in modules}
        assert {k.split(".lora_")[0].removesuffix(".alpha") for k in keys} == names, layout
        back = load_lora(base, tmp_path / f"{layout}.safetensors", name="back")
        _assert_close(dsf.tree.flatten_dict(dense_tree(merge_lora(back))), dsf.tree.flatten_dict(dense_tree(merge_lora(loaded))))
